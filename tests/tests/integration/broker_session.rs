//! The broker session both binaries stand on: real TLS, several URLs, queues that heal, and a
//! worker that never runs more than PREFETCH tasks whatever the broker sends.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use lapin::options::QueueDeleteOptions;
use offload_api::Config as GatewayConfig;
use offload_common::{BrokerArgs, BrokerError};
use offload_tests::{
    FaultyProxy, InProcessWorker, PrivateBroker, TestGateway, TestQueue, WorkerOptions,
    WorkerProcess, amqp_url, declare_kinds, eventually, eventually_ok, handlers::AlwaysFails,
};
use offload_worker::{Handler, HandlerError, Registry, Task};
use reqwest::StatusCode;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

fn private_queue_name(label: &str) -> String {
    format!("offload-test-{label}-{}", uuid::Uuid::new_v4().simple())
}

async fn connect_error(args: &BrokerArgs) -> (String, Duration) {
    let started = Instant::now();
    let Err(error) = args
        .connector()
        .expect("usable settings")
        .connect("offload-test")
        .await
    else {
        panic!("{} must not connect", args.amqp_url);
    };
    assert!(matches!(error, BrokerError::Connect { .. }), "{error:?}");
    (error.to_string(), started.elapsed())
}

#[tokio::test]
async fn amqps_is_real_tls_and_refuses_what_it_cannot_trust() {
    let broker = PrivateBroker::start_with_tls().await;
    let tls = broker.tls().expect("a TLS listener").clone();
    let queue = private_queue_name("tls");
    let tls_url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", tls.port);

    // With the CA and the client certificate the node requires: tasks go through.
    let mut config = GatewayConfig::new(&tls_url, &queue);
    config.broker.amqp_ca_file = Some(tls.ca_file.clone());
    config.broker.amqp_client_cert_file = Some(tls.client_cert_file.clone());
    config.broker.amqp_client_key_file = Some(tls.client_key_file.clone());
    let gateway = TestGateway::spawn(config.clone()).await;
    declare_kinds(&broker.url(), &queue, &[]);
    assert_eq!(gateway.health().await.status(), StatusCode::OK);
    gateway.submit_sleep("over TLS").await;
    gateway.stop().await;

    // Without the CA the broker's certificate is not trusted, and the error says what to do.
    let mut untrusted = config.broker.clone();
    untrusted.amqp_ca_file = None;
    let (error, _) = connect_error(&untrusted).await;
    assert!(error.contains("AMQP_CA_FILE"), "{error}");

    // Without the client certificate the node hangs up.
    let mut anonymous = config.broker.clone();
    anonymous.amqp_client_cert_file = None;
    anonymous.amqp_client_key_file = None;
    connect_error(&anonymous).await;

    // amqps:// at a plaintext port fails at once with a clear word: never a plaintext
    // connection for a URL that asked for TLS.
    let mut plaintext = config.broker.clone();
    plaintext.amqp_url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", broker.port());
    let (error, took) = connect_error(&plaintext).await;
    assert!(error.contains("TLS listener"), "{error}");
    assert!(took < plaintext.connect_timeout, "took {took:?}");
    assert!(!error.contains("guest:guest"), "redacted: {error}");
}

#[tokio::test]
async fn a_list_of_urls_moves_on_when_one_broker_fails() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "urls", 5).await;
    let upstream = "127.0.0.1:5672".parse().expect("address");
    let first = FaultyProxy::start(upstream).await.expect("proxy");
    let second = FaultyProxy::start(upstream).await.expect("proxy");
    let list = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f,amqp://guest:guest@127.0.0.1:{}/%2f",
        first.port(),
        second.port()
    );
    let gateway = TestGateway::start(&list, queue.name()).await;
    let worker = WorkerProcess::start(&list, queue.name(), &WorkerOptions::default()).await;

    // Cut one path, then the other: whichever each process was on, it must move.
    let mut accepted = Vec::new();
    for (cut, healed) in [(&first, &second), (&second, &first)] {
        healed.heal();
        cut.cut();
        let id = eventually_ok(DEADLINE, "a 202 through the other broker URL", || async {
            let response = gateway
                .post_task(&json!({"kind": "sleep", "payload": {"message": "moved"}}))
                .await;
            let status = response.status();
            let body: Value = response.json().await.map_err(|e| e.to_string())?;
            body["id"]
                .as_str()
                .and_then(|id| id.parse::<uuid::Uuid>().ok())
                .ok_or_else(|| format!("{status} {body}"))
        })
        .await;
        accepted.push(id);
    }
    // What a failure says: the tasks not seen done, and the worker's own account of the cuts
    // (once in 30 runs this timed out, and said nothing more).
    eventually_ok(DEADLINE, "the worker to run both tasks", || async {
        let done = worker.completed();
        let missing: Vec<_> = accepted.iter().filter(|id| !done.contains(id)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let log = worker.log();
        let lines: Vec<String> = log[log.len().saturating_sub(15)..]
            .iter()
            .map(Value::to_string)
            .collect();
        Err(format!(
            "no succeeded event on the stream for {missing:?}; the worker's last lines:\n{}",
            lines.join("\n")
        ))
    })
    .await;
    gateway.stop().await;
}

#[tokio::test]
async fn a_worker_declares_a_deleted_queue_again_and_consumes_from_it() {
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "heal-worker", 5).await;
    let worker = WorkerProcess::start(&url, queue.name(), &WorkerOptions::default()).await;
    let channel = queue.connection().create_channel().await.expect("channel");
    let sleep = queue.topology().kind_queue("sleep");
    channel
        .queue_delete(sleep.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the kind's queue");

    // No gateway runs: the worker alone brings the queue back and subscribes again.
    eventually(
        Duration::from_secs(15),
        "the queue back with its consumer",
        || async {
            let channel = queue.connection().create_channel().await.ok()?;
            let declared = channel
                .queue_declare(
                    sleep.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .ok()?;
            let _ = channel.close(200, "checked".into()).await;
            (declared.consumer_count() == 1).then_some(())
        },
    )
    .await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let id = gateway.submit_sleep("after the deletion").await;
    eventually(DEADLINE, "the task to complete", || async {
        worker.completed().contains(&id).then_some(())
    })
    .await;
    gateway.stop().await;
}

#[tokio::test]
async fn gateway_and_worker_declare_everything_again_on_a_broker_that_lost_its_data() {
    let mut broker = PrivateBroker::start().await;
    let queue = private_queue_name("reset");
    let gateway = TestGateway::start(&broker.url(), &queue).await;
    let worker = WorkerProcess::start(&broker.url(), &queue, &WorkerOptions::default()).await;
    let before = gateway.submit_sleep("before the reset").await;
    eventually(DEADLINE, "the first task to complete", || async {
        worker.completed().contains(&before).then_some(())
    })
    .await;

    // Gateway and worker reconnect to a broker that knows none of their queues, exchanges
    // or bindings: both declare them again, and the worker binds its kinds again.
    broker.stop().await;
    broker.wipe_data();
    broker.start_again().await;
    let task = json!({"kind": "sleep", "payload": {"message": "after the reset."}});
    let after = gateway.submit_once_accepted(&task, DEADLINE).await;
    eventually(DEADLINE, "the same worker to run it", || async {
        worker.completed().contains(&after).then_some(())
    })
    .await;
    gateway.stop().await;
}

#[tokio::test]
async fn health_says_unroutable_while_the_queue_cannot_be_declared_again() {
    let broker = PrivateBroker::start().await;
    assert!(broker.ctl(&["add_user", "offload", "offload-pw"]));
    let all = |user: &str| broker.ctl(&["set_permissions", "-p", "/", user, ".*", ".*", ".*"]);
    assert!(all("offload"));
    let queue = private_queue_name("unroutable");
    let url = format!("amqp://offload:offload-pw@127.0.0.1:{}/%2f", broker.port());
    let gateway = TestGateway::start(&url, &queue).await;
    declare_kinds(&url, &queue, &[]);

    // The gateway's user loses the right to declare; then the queues are deleted: the
    // dead-letter queue (the gateway's) and the `sleep` kind's (its workers').
    assert!(broker.ctl(&["set_permissions", "-p", "/", "offload", "^$", ".*", ".*"]));
    assert!(broker.ctl(&["delete_queue", &format!("{queue}.dead")]));
    assert!(broker.ctl(&["delete_queue", &format!("{queue}.kind.sleep")]));
    eventually(DEADLINE, "/health to say unroutable", || async {
        let health = gateway.health().await;
        let status = health.status();
        let body: Value = health.json().await.ok()?;
        (status == StatusCode::SERVICE_UNAVAILABLE && body["broker"] == "unroutable").then_some(())
    })
    .await;
    let response = gateway.post_task(&json!({"kind": "sleep"})).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["code"], "queue_missing", "{body}");

    // The right back: the gateway declares its queues again by itself. No worker runs to
    // declare the kind's queue again, so the kind is unknown until one does (or an operator
    // runs --declare-only); then tasks are accepted.
    assert!(all("offload"));
    eventually(
        DEADLINE,
        "/health ok once the queue is declared again",
        || async { (gateway.health().await.status() == StatusCode::OK).then_some(()) },
    )
    .await;
    let response = gateway.post_task(&json!({"kind": "sleep"})).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    declare_kinds(&url, &queue, &[]);
    let response = gateway.post_task(&json!({"kind": "sleep"})).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    gateway.stop().await;
}

/// Counts how many of its tasks run at once, and the most ever seen.
struct Counted {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
}

impl Handler for Counted {
    const KIND: &'static str = "counted";
    type Payload = serde_json::Value;
    type Output = ();

    async fn handle(&self, _task: Task) -> Result<(), HandlerError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(30)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// RabbitMQ 3.8-3.10 hand a consumer one extra credit for each task dead-lettered at its
/// delivery limit (rabbitmq-server PR #5609): with `basic.qos` alone a PREFETCH=1 worker then
/// runs several tasks at once. Failed attempts now go through offload's own retries and dead
/// letters (acked, not requeued), so only crashes and unconfirmed events still reach the
/// broker's limit; the worker's own permits keep it at one whichever way tasks die.
#[tokio::test]
async fn prefetch_bounds_concurrency_even_after_tasks_die() {
    const DYING: usize = 4;
    const SHORT: usize = 12;
    let url = amqp_url();
    let queue = TestQueue::declare(&url, "permits", 5).await;
    let gateway = TestGateway::start(&url, queue.name()).await;
    let (running, most, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut config = offload_worker::Config::new(&url, queue.name());
    config.max_attempts = 2;
    config.retry_base = Duration::ZERO;
    config.prefetch = 1;
    let registry = Registry::default().register(AlwaysFails).register(Counted {
        running: Arc::clone(&running),
        most: Arc::clone(&most),
        done: Arc::clone(&done),
    });
    let worker = InProcessWorker::start(config, registry);

    for _ in 0..DYING {
        let response = gateway.post_task(&json!({"kind": "always-fails"})).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    eventually(DEADLINE, "the failing tasks dead-lettered", || async {
        (queue.dead().await == u32::try_from(DYING).expect("small")).then_some(())
    })
    .await;
    for _ in 0..SHORT {
        let response = gateway.post_task(&json!({"kind": "counted"})).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    eventually(DEADLINE, "the short tasks to finish", || async {
        (done.load(Ordering::SeqCst) == SHORT).then_some(())
    })
    .await;

    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "a PREFETCH=1 worker ran tasks at once"
    );
    worker.stop().await;
    gateway.stop().await;
}

/// Tear-down goes on past a refusal: a gate held as another connection's exclusive queue is
/// refused (`RESOURCE_LOCKED` closes the channel), and what comes after it is deleted anyway.
#[tokio::test]
async fn deleting_a_topology_goes_on_past_a_refusal_and_reports_it() {
    use lapin::{
        Connection, ConnectionProperties,
        options::{ExchangeDeclareOptions, QueueDeclareOptions},
        types::FieldTable,
    };
    let url = amqp_url();
    let topology = BrokerArgs::new(&url, private_queue_name("delete"))
        .topology()
        .with_kinds(["sleep"]);
    let owner = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let other = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let (owner_channel, other_channel) = (
        owner.create_channel().await.expect("channel"),
        other.create_channel().await.expect("channel"),
    );
    // Deleted in this order: the dead-letter queue, the gate, then the exchanges.
    let dead = topology.dead_letter_queue();
    owner_channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the dead-letter queue");
    let gate = topology.gate("sleep");
    other_channel
        .queue_declare(
            gate.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the gate, exclusive to the other connection");
    let due = topology.due_exchange();
    owner_channel
        .exchange_declare(
            due.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the due exchange");

    let deleted = topology.delete(&owner).await;
    assert!(
        matches!(&deleted, Err(error) if error.to_string().contains("RESOURCE_LOCKED")),
        "{deleted:?}"
    );
    for (name, queue) in [(&dead, true), (&due, false)] {
        let exists = if queue {
            topology.exists_named(&owner, name).await
        } else {
            let channel = owner.create_channel().await.expect("channel");
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            };
            let kind = lapin::ExchangeKind::Topic;
            Ok(channel
                .exchange_declare(name.as_str().into(), kind, passive, FieldTable::default())
                .await
                .is_ok())
        };
        assert!(
            matches!(exists, Ok(false)),
            "{name} is still there: {exists:?}"
        );
    }
    // The gate goes with its owner's connection.
    let _ = other.close(200, "done".into()).await;
    let _ = owner.close(200, "done".into()).await;
}
