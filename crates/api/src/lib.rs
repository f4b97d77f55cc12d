//! The offload HTTP gateway as a library: [`Application::build`] binds the listener and
//! connects to the broker, [`Application::run_until_stopped`] serves until the shutdown future
//! resolves. The `offload-api` binary is a thin wrapper; tests start the same thing on port 0.

mod config;
mod error;
mod publisher;
mod routes;

use std::{future::Future, net::SocketAddr};

use axum::{Router, extract::DefaultBodyLimit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{
    Config, DEFAULT_CONFIRM_TIMEOUT, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RETRY_AFTER_SECS,
};
pub use error::ApiError;
pub use publisher::{BrokerState, PublishError, Publisher};

/// What every request handler can reach. Cloned for every request, so it holds the
/// publisher behind one `Arc` rather than cloning its parts.
#[derive(Clone)]
pub struct AppState {
    publisher: std::sync::Arc<Publisher>,
    retry_after_secs: u32,
}

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The queues exist with other settings.
    #[error(transparent)]
    Topology(#[from] offload_common::TopologyError),
    /// The server failed while running.
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// A gateway that is bound and connected (or trying to connect), ready to serve.
pub struct Application {
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    supervisor: tokio::task::JoinHandle<()>,
}

impl Application {
    /// Binds `config.bind`, connects to the broker and declares the topology.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.bind,
                source,
            })?;
        let shutdown = CancellationToken::new();
        let (publisher, supervisor) = Publisher::start(
            config.broker,
            config.confirm_timeout,
            config.max_in_flight,
            shutdown.clone(),
        )
        .await?;
        let state = AppState {
            publisher: std::sync::Arc::new(publisher),
            retry_after_secs: config.retry_after_secs,
        };
        let router = routes::router(state).layer(DefaultBodyLimit::max(config.max_body_bytes));
        Ok(Self {
            listener,
            router,
            shutdown,
            supervisor,
        })
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// Serves until `shutdown` resolves, then finishes the requests in flight (each bounded
    /// by the confirm timeout) and closes the broker connection.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        tracing::info!(addr = %self.local_addr(), "offload-api listening");
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await;
        self.shutdown.cancel();
        let _ = self.supervisor.await;
        tracing::info!("offload-api stopped");
        served.map_err(StartError::Serve)
    }
}
