//! Hostile clients for the memory measurement: connections that each send a request head or
//! a body that never ends, a byte at a time.

use std::{net::SocketAddr, time::Duration};

use tokio::{io::AsyncWriteExt, net::TcpStream, task::JoinSet};

/// What the slow clients hold the gateway's connections with.
#[derive(Debug, Clone, Copy)]
pub enum Attack {
    /// A request head just under `max_header_bytes`, then one more byte a second, for ever.
    Header {
        /// The gateway's MAX_HEADER_BYTES.
        max_header_bytes: usize,
    },
    /// A task body announced at `max_body_bytes`, all but its last bytes sent at once, then
    /// one more byte a second.
    Body {
        /// The gateway's MAX_BODY_BYTES.
        max_body_bytes: usize,
    },
}

/// `connections` slow clients against `addr`, each on its own connection, dripping until the
/// returned set is dropped. Returns once every client has sent its bulk.
pub async fn hold(addr: SocketAddr, connections: usize, attack: Attack) -> JoinSet<()> {
    let mut clients = JoinSet::new();
    let (bulk_sent, mut bulk_done) = tokio::sync::mpsc::channel::<()>(connections);
    for _ in 0..connections {
        let bulk_sent = bulk_sent.clone();
        clients.spawn(async move {
            let Ok(mut stream) = TcpStream::connect(addr).await else {
                let _ = bulk_sent.send(()).await;
                return;
            };
            let bulk = match attack {
                Attack::Header { max_header_bytes } => {
                    let mut head = b"POST /tasks HTTP/1.1\r\nHost: bench\r\nX-Slow: ".to_vec();
                    head.resize(max_header_bytes.saturating_sub(64), b'a');
                    head
                }
                Attack::Body { max_body_bytes } => {
                    let mut request = format!(
                        "POST /tasks HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
                         Content-Length: {max_body_bytes}\r\n\r\n{{\"kind\":\"sleep\",\"payload\":\""
                    )
                    .into_bytes();
                    request.resize(request.len() + max_body_bytes.saturating_sub(64), b'a');
                    request
                }
            };
            let _ = stream.write_all(&bulk).await;
            let _ = bulk_sent.send(()).await;
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            loop {
                ticks.tick().await;
                if stream.write_all(b"a").await.is_err() {
                    return;
                }
            }
        });
    }
    drop(bulk_sent);
    for _ in 0..connections {
        if bulk_done.recv().await.is_none() {
            break;
        }
    }
    clients
}
