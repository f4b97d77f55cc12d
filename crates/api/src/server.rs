//! The HTTP/1.1 server loop: hyper, configured for clients that may be hostile.
//!
//! `axum::serve` offers none of the knobs this needs, so the gateway accepts connections
//! itself (the pattern of axum's `serve-with-hyper` example):
//!
//! - at most `MAX_CONNECTIONS` connections are served at once; past it a new connection is
//!   answered with a canned 503 and closed, so the gateway stays quick to say no and its
//!   memory stays bounded;
//! - hyper's header-read timer closes a connection that has not sent a complete request head
//!   within `HEADER_TIMEOUT` of opening or of its last response (which makes it the idle
//!   keep-alive timeout too);
//! - the request head is bounded by `MAX_HEADER_BYTES` (431 past it); the body's size and
//!   time are bounded where it is read ([`crate::routes::Json`]).
//!
//! Per connection, memory is then at most about `CONNECTION_OVERHEAD` + `MAX_HEADER_BYTES`
//! while headers arrive, or + `MAX_BODY_BYTES` while a body does (docs/SECURITY.md).

use std::{future::Future, sync::Arc, time::Duration};

use axum::Router;
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tower::Service;

use crate::error::ApiError;

/// Most connections being turned away at once; past it they are closed without a word.
const MAX_REJECTING: usize = 256;
/// How long a turned-away connection is kept to deliver its 503.
const REJECT_LINGER: Duration = Duration::from_secs(1);
/// How long to wait after a failed `accept` (typically the file-descriptor limit).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The limits the server loop enforces.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub retry_after_secs: u32,
    /// The longest a request may still take once shutdown begins.
    pub drain: Duration,
    /// Counts connections open and turned away.
    pub metrics: Arc<crate::metrics_registry::Metrics>,
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the requests in flight
/// finish (within `limits.drain`).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    let too_many: Arc<[u8]> = canned_503(limits.retry_after_secs).into();
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout((!limits.header_timeout.is_zero()).then_some(limits.header_timeout))
        .max_header_size(limits.max_header_bytes)
        // hyper's read buffer holds the request head; its floor is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8 * 1024));

    let mut shutdown = std::pin::pin!(shutdown);
    let mut accept_errors_logged = 0u32;
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // EMFILE and friends: say so (not on every spin), and do not spin.
                    if accept_errors_logged.is_power_of_two() {
                        tracing::error!(
                            "accepting a connection failed: {error} ({accept_errors_logged} so far); \
                             if that is the file-descriptor limit, raise it above MAX_CONNECTIONS"
                        );
                    }
                    accept_errors_logged = accept_errors_logged.saturating_add(1);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            limits.metrics.refused(TOO_MANY_CONNECTIONS);
            turn_away(stream, &rejecting, &too_many);
            continue;
        };
        let open = limits.metrics.connections();
        open.inc();
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            router.clone().call(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                // Timeouts, resets and malformed requests from clients: theirs, not ours.
                tracing::debug!("connection ended: {error}");
            }
            drop(permit);
            open.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the drain period; closing them");
    }
}

/// Answers a connection over the cap with a 503 and closes it.
///
/// The answer waits for the request head (or the first 4 KiB of it, or the linger time):
/// an HTTP client that receives a response before it has sent its request may discard it as
/// unsolicited. Then, after the answer, the rest is read until the client closes: closing
/// with its request unread would send a reset, which can destroy the 503 before the client
/// has read it.
fn turn_away(mut stream: TcpStream, rejecting: &Arc<Semaphore>, response: &Arc<[u8]>) {
    let Ok(permit) = Arc::clone(rejecting).try_acquire_owned() else {
        return;
    };
    let response = Arc::clone(response);
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(REJECT_LINGER, async {
            let mut head = [0u8; 4096];
            let mut read = 0;
            while read < head.len() && !head[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut head[read..]).await? {
                    0 => break,
                    n => read += n,
                }
            }
            stream.write_all(&response).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// The whole response to a connection over the cap, body from [`ApiError`] like any other.
/// The code of the canned 503, for the refusals metric.
const TOO_MANY_CONNECTIONS: &str = "too_many_connections";

fn canned_503(retry_after_secs: u32) -> Vec<u8> {
    let refusal = ApiError::TooManyConnections {
        retry_after: retry_after_secs,
    };
    debug_assert_eq!(refusal.code(), TOO_MANY_CONNECTIONS);
    let body = refusal.body_bytes();
    let mut response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {retry_after_secs}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    response
}
