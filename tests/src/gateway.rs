//! The gateway, started in-process on port 0, with a client that speaks to it.

use offload_api::{Application, Config};
use reqwest::{Response, header::CONTENT_TYPE};
use tokio::{sync::oneshot, task::JoinHandle};

/// A running gateway. Stopped on [`TestGateway::stop`] or when dropped.
pub struct TestGateway {
    addr: std::net::SocketAddr,
    base: String,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// Starts a gateway with `config` (its `bind` should be port 0).
    pub async fn spawn(config: Config) -> Self {
        crate::show_logs_of_failed_tests();
        let app = Application::build(config).await.expect("gateway starts");
        let addr = app.local_addr();
        let base = format!("http://{addr}");
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            app.run_until_stopped(async {
                let _ = stopped.await;
            })
            .await
            .expect("gateway runs");
        });
        Self {
            addr,
            base,
            client: reqwest::Client::new(),
            stop: Some(stop),
            served: Some(served),
        }
    }

    /// Starts a gateway on port 0 publishing to `queue` on the broker at `url`.
    pub async fn start(url: &str, queue: &str) -> Self {
        Self::spawn(Config::new(url, queue)).await
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The address it listens on, for tests that speak raw TCP.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The HTTP client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `GET /tasks/{id}<query>`: the status code and the JSON body.
    pub async fn task(
        &self,
        id: impl std::fmt::Display,
        query: &str,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let response = self
            .client
            .get(self.url(&format!("/tasks/{id}{query}")))
            .send()
            .await
            .expect("answer");
        let status = response.status();
        (status, response.json().await.expect("JSON"))
    }

    /// `POST /tasks` with `body` as JSON.
    pub async fn post_task(&self, body: &serde_json::Value) -> Response {
        self.post_raw(body.to_string(), Some("application/json"))
            .await
    }

    /// `POST /tasks` with the given body and content type.
    pub async fn post_raw(
        &self,
        body: impl Into<reqwest::Body>,
        content_type: Option<&str>,
    ) -> Response {
        let mut request = self.client.post(self.url("/tasks")).body(body);
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        request.send().await.expect("gateway answers")
    }

    /// Posts a `sleep` task with `message` and returns its id, asserting a 202.
    pub async fn submit_sleep(&self, message: &str) -> uuid::Uuid {
        self.submit(&serde_json::json!({"kind": "sleep", "payload": {"message": message}}))
            .await
    }

    /// Posts `body` as a task and returns its id, asserting a 202.
    pub async fn submit(&self, body: &serde_json::Value) -> uuid::Uuid {
        let response = self.post_task(body).await;
        assert_eq!(response.status(), 202, "task accepted");
        let body: serde_json::Value = response.json().await.expect("JSON body");
        body["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("the 202 body has a task id")
    }

    /// Posts `body` again and again until the gateway accepts it (202), for a test waiting
    /// on a broker that is coming back; the accepted task's id.
    pub async fn submit_once_accepted(
        &self,
        body: &serde_json::Value,
        deadline: std::time::Duration,
    ) -> uuid::Uuid {
        crate::eventually(deadline, "a 202", || async {
            let response = self.post_task(body).await;
            if response.status() != reqwest::StatusCode::ACCEPTED {
                return None;
            }
            let body: serde_json::Value = response.json().await.ok()?;
            body["id"].as_str()?.parse().ok()
        })
        .await
    }

    /// Waits (with the API's own `?wait=`) until task `id` has ended (`succeeded`, `dead`,
    /// `cancelled`, `expired`), and returns its status.
    pub async fn finished(
        &self,
        id: uuid::Uuid,
        deadline: std::time::Duration,
    ) -> serde_json::Value {
        crate::eventually(deadline, &format!("task {id} to end"), || async {
            let (code, body) = self.task(id, "?wait=5s").await;
            (code == reqwest::StatusCode::OK
                && matches!(
                    body["status"].as_str(),
                    Some("succeeded" | "dead" | "cancelled" | "expired")
                ))
            .then_some(body)
        })
        .await
    }

    /// `POST <path>` with no body: the status code and the JSON body.
    pub async fn post(&self, path: &str) -> (reqwest::StatusCode, serde_json::Value) {
        let response = self
            .client
            .post(self.url(path))
            .send()
            .await
            .expect("gateway answers");
        let status = response.status();
        (status, response.json().await.expect("JSON"))
    }

    /// `POST /tasks/{id}/cancel`: the status code and the JSON body.
    pub async fn cancel(&self, id: uuid::Uuid) -> (reqwest::StatusCode, serde_json::Value) {
        self.post(&format!("/tasks/{id}/cancel")).await
    }

    /// `GET /health`.
    pub async fn health(&self) -> Response {
        self.client
            .get(self.url("/health"))
            .send()
            .await
            .expect("gateway answers")
    }

    /// Waits until `/health` says the status view has read the events stream to its end.
    pub async fn live(&self, deadline: std::time::Duration) {
        crate::eventually(deadline, "the gateway's status view to be live", || async {
            let body: serde_json::Value = self.health().await.json().await.ok()?;
            (body["events"] == "live").then_some(())
        })
        .await;
    }

    /// Stops the gateway gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.expect("gateway task ends");
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// `offload-api` as a real child process, for tests that kill it. Killed when dropped.
pub struct GatewayProcess {
    child: std::process::Child,
    port: u16,
}

impl GatewayProcess {
    /// Starts the gateway on `port` with the given environment (`AMQP_URL`, `QUEUE`, ...)
    /// and waits until it answers `/health` with 200.
    pub async fn start(port: u16, env: &[(&str, String)]) -> Self {
        Self::start_binary(&crate::binary("offload-api-under-test"), port, env).await
    }

    /// [`GatewayProcess::start`] with the gateway binary at `binary`: the benchmark runs its
    /// own build of it.
    pub async fn start_binary(binary: &std::path::Path, port: u16, env: &[(&str, String)]) -> Self {
        // OFFLOAD_TEST_LOGS=<dir> keeps its log (at `info`) in <dir>/gateway-<port>.log, to
        // see what a scenario's gateway did.
        let (log_level, stdout) = match std::env::var_os("OFFLOAD_TEST_LOGS") {
            Some(dir) => {
                let path = std::path::Path::new(&dir).join(format!("gateway-{port}.log"));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .expect("open the gateway's log file in OFFLOAD_TEST_LOGS");
                ("info", std::process::Stdio::from(file))
            }
            None => ("warn", std::process::Stdio::null()),
        };
        let child = std::process::Command::new(binary)
            .env("BIND", format!("127.0.0.1:{port}"))
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", log_level)
            .envs(env.iter().map(|(key, value)| (key, value)))
            .stdout(stdout)
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start offload-api");
        let gateway = Self { child, port };
        let client = reqwest::Client::new();
        let health = gateway.url("/health");
        crate::eventually(
            std::time::Duration::from_secs(30),
            "the gateway process to report healthy",
            || async {
                let response = client.get(&health).send().await.ok()?;
                response.status().is_success().then_some(())
            },
        )
        .await;
        gateway
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The OS process id: `<host>-<pid>` names it in its `scheduler` events.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process dies at once, mid-request.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
