//! The compose `monitoring` profile's Prometheus configuration and Grafana dashboard, against
//! a real Prometheus (Debian's `prometheus`, which `.ci/run` installs) scraping a real
//! gateway and worker: both targets up, and every query of the dashboard answered with data.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use offload_tests::{InProcessWorker, TestGateway, TestQueue, amqp_url, eventually, free_port};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// The services of `deploy/docker-compose.yml` that run `offload-worker`.
fn compose_worker_services() -> Vec<String> {
    let compose = std::fs::read_to_string(deploy("docker-compose.yml"))
        .expect("read deploy/docker-compose.yml");
    let mut services = Vec::new();
    let mut current = None;
    for line in compose.lines() {
        // A service: two spaces, a name, a colon, nothing else.
        if let Some(name) = line
            .strip_prefix("  ")
            .and_then(|rest| rest.strip_suffix(':'))
            .filter(|name| !name.starts_with(' ') && !name.contains(' '))
        {
            current = Some(name.to_owned());
        } else if line
            .trim_start()
            .starts_with("command: [\"offload-worker\"")
            && let Some(service) = current.take()
        {
            services.push(service);
        }
    }
    services
}

/// Prometheus finds every worker service of the compose stack, the `targets` profile's too:
/// a worker it does not scrape has its deaths and its queue depth seen by nobody.
#[test]
fn every_compose_service_that_runs_a_worker_is_scraped() {
    let workers = compose_worker_services();
    assert!(
        workers.len() >= 2,
        "the compose file runs `worker` and `target-worker`: {workers:?}"
    );
    let shipped = std::fs::read_to_string(deploy("prometheus/prometheus.yml"))
        .expect("read deploy/prometheus/prometheus.yml");
    let names = shipped
        .lines()
        .find_map(|line| line.trim().strip_prefix("- names: "))
        .expect("the workers are found through DNS names");
    for worker in &workers {
        assert!(
            names.contains(&format!("\"{worker}\"")),
            "Prometheus does not scrape compose service `{worker}`: {names}"
        );
    }
}

/// `deploy/prometheus/prometheus.yml` with the compose network's names replaced by this
/// test's addresses, and a faster scrape.
fn prometheus_config(gateway: &str, worker: &str) -> String {
    let shipped = std::fs::read_to_string(deploy("prometheus/prometheus.yml"))
        .expect("read deploy/prometheus/prometheus.yml");
    let workers = shipped
        .find("    dns_sd_configs:")
        .expect("the workers are found through DNS");
    let config = format!(
        "{}    static_configs:\n      - targets: [\"{worker}\"]\n",
        &shipped[..workers]
    );
    config
        .replace(
            "/run/secrets/metrics_key",
            &deploy("secrets/metrics_key").display().to_string(),
        )
        .replace("\"api:8080\"", &format!("\"{gateway}\""))
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A GET of Prometheus' API, as JSON; `None` until it answers.
async fn get_json(client: &reqwest::Client, url: &str, query: &[(&str, &str)]) -> Option<Value> {
    client
        .get(url)
        .query(query)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// One instant query: its status and how many series answered.
async fn query(client: &reqwest::Client, base: &str, expr: &str) -> Option<(String, usize)> {
    let answer = get_json(client, &format!("{base}/api/v1/query"), &[("query", expr)]).await?;
    Some((
        answer["status"].as_str()?.to_owned(),
        answer["data"]["result"].as_array().map_or(0, Vec::len),
    ))
}

#[tokio::test]
async fn prometheus_scrapes_both_and_every_dashboard_query_has_data() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "monitoring", 5).await;
    let mut config = offload_api::Config::new(&url, queue.name());
    config.api_keys_file = Some(deploy("secrets/api_keys"));
    let gateway = TestGateway::spawn(config).await;
    let worker_port = free_port();
    let mut worker_config = offload_worker::Config::new(&url, queue.name());
    worker_config.http_bind = Some(([127, 0, 0, 1], worker_port).into());
    worker_config.sleep_unit = Duration::from_millis(10);
    let _worker = InProcessWorker::start(
        worker_config.clone(),
        offload_worker::handlers::builtin(&worker_config),
    );

    let dir = tempfile::tempdir().expect("a temporary directory");
    let config_file = dir.path().join("prometheus.yml");
    std::fs::write(
        &config_file,
        prometheus_config(
            &gateway.addr().to_string(),
            &format!("127.0.0.1:{worker_port}"),
        ),
    )
    .expect("write the configuration");
    let port = free_port();
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Prometheus is installed (Debian's `prometheus`; .ci/run installs it)"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    // Tasks that succeed, one that is dead (a payload that does not fit), one refused.
    for (task, expected) in [
        (
            serde_json::json!({"kind": "sleep", "payload": {"message": "a."}}),
            202,
        ),
        (
            serde_json::json!({"kind": "sleep", "payload": {"message": "b.."}}),
            202,
        ),
        (
            serde_json::json!({"kind": "sleep", "payload": "not an object"}),
            202,
        ),
        (serde_json::json!({"kind": "nobody-runs-this"}), 422),
    ] {
        let response = gateway
            .client()
            .post(gateway.url("/tasks"))
            .bearer_auth("dev-key-change-me")
            .json(&task)
            .send()
            .await
            .expect("an answer");
        assert_eq!(response.status(), expected, "{task}");
    }
    eventually(DEADLINE, "both targets to be scraped", || async {
        let answer = get_json(&client, &format!("{base}/api/v1/targets"), &[]).await?;
        let targets = answer["data"]["activeTargets"].as_array()?;
        (targets.len() == 2 && targets.iter().all(|target| target["health"] == "up")).then_some(())
    })
    .await;

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/dashboards/offload.json"))
            .expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        eventually(DEADLINE, &format!("data for {expr}"), || async {
            query(&client, &base, expr)
                .await
                .filter(|(status, series)| status == "success" && *series > 0)
        })
        .await;
    }
}
