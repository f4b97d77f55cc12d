//! An HTTP target that answers at once (or holds every call until released), for the
//! benchmark of HTTP-target tasks; and the same target under a client load of its own.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, routing::post};
use tokio::sync::watch;

use crate::broker::measure_rate;

/// A target on a loopback port, answering `200 {}`.
pub struct Target {
    url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

struct Shared {
    calls: AtomicU64,
    in_flight: AtomicU64,
    /// While `true`, calls wait before answering.
    hold: watch::Sender<bool>,
}

async fn answer(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    shared.in_flight.fetch_add(1, Ordering::Relaxed);
    let mut hold = shared.hold.subscribe();
    let _ = hold.wait_for(|hold| !*hold).await;
    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    shared.calls.fetch_add(1, Ordering::Relaxed);
    (StatusCode::OK, "{}")
}

impl Target {
    /// Starts the target on a free port.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            hold: watch::channel(false).0,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let url = format!(
            "http://{}/work",
            listener.local_addr().expect("a bound address")
        );
        let app = Router::new()
            .route("/work", post(answer))
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            shared,
            server,
        }
    }

    /// The URL to map a kind to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Calls answered so far.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::Relaxed)
    }

    /// Calls received and not answered yet.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Holds every call (`true`) until released (`false`).
    pub fn hold(&self, hold: bool) {
        self.shared.hold.send_replace(hold);
    }

    /// The target alone: `callers` concurrent callers on one pooled client (as a worker at
    /// that prefetch calls it), posting a task-sized JSON body back to back for `length`.
    /// Returns calls per second.
    pub async fn alone(&self, callers: usize, length: Duration) -> f64 {
        let client = reqwest::Client::new();
        let answered = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let body = serde_json::json!({
            "id": uuid::Uuid::new_v4(), "kind": "http", "payload": {"message": "bench"},
            "attempt": 1, "submitted_at": "2026-11-30T00:00:00.000Z",
        })
        .to_string();
        let mut tasks = Vec::new();
        for _ in 0..callers {
            let (client, url, body, answered, running) = (
                client.clone(),
                self.url.clone(),
                body.clone(),
                Arc::clone(&answered),
                Arc::clone(&running),
            );
            tasks.push(tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    let sent = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    if let Ok(response) = sent
                        && response.bytes().await.is_ok()
                    {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let rate = measure_rate(&answered, length).await;
        running.store(false, Ordering::Relaxed);
        for task in tasks {
            let _ = task.await;
        }
        rate
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.hold(false);
        self.server.abort();
    }
}
