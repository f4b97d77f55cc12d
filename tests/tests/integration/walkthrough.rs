//! The docs' walkthroughs, run as a reader types them.

use std::{
    io::Read,
    net::TcpListener,
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use offload_tests::{TestQueue, amqp_url, binary};

/// The first ```sh block after the text `after` in `doc`.
fn shell_block<'a>(doc: &'a str, after: &str) -> &'a str {
    let from = doc.find(after).expect("the walkthrough's heading") + after.len();
    let rest = &doc[from..];
    let start = rest.find("```sh\n").expect("a shell block") + "```sh\n".len();
    let end = rest[start..].find("```").expect("the block's end");
    &rest[start..start + end]
}

/// docs/KINDS.md's "Adding a task kind" loop with the Flask example: typed in order, it ends
/// with the task's document saying `succeeded` with the example's result. The one line that
/// is not run as written is the build (the test binaries are built already, under other
/// names), and the processes inherit `QUEUE` so that the shared broker keeps its names.
#[tokio::test]
async fn adding_a_task_kind_runs_as_typed() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/KINDS.md"))
        .expect("read docs/KINDS.md");
    let block = shell_block(&doc, "Then, typed\nin order:");
    assert!(
        block.contains("cargo build -p offload-api -p offload-worker\n"),
        "{block}"
    );
    for port in [8000, 8080, 9090] {
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "the walkthrough listens on port {port}, which is taken on this machine"
        );
    }
    let script = block
        .replace("cargo build -p offload-api -p offload-worker\n", "")
        .replace(
            "target/debug/offload-worker",
            &binary("offload-worker-under-test").display().to_string(),
        )
        .replace(
            "target/debug/offload-api",
            &binary("offload-api-under-test").display().to_string(),
        );
    let url = amqp_url();
    let queue = TestQueue::declare_topology(&url, "walkthrough", |topology| {
        topology.with_kinds(["work"])
    })
    .await;

    let mut shell = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .env("AMQP_URL", &url)
        .env("QUEUE", queue.name())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own: the walkthrough's three background processes are killed with it.
        .process_group(0)
        .spawn()
        .expect("run bash");
    let group = nix::unistd::Pid::from_raw(i32::try_from(shell.id()).expect("a pid fits i32"));
    let mut stdout = shell.stdout.take().expect("piped");
    let mut stderr = shell.stderr.take().expect("piped");
    let read_out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let read_err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = shell.try_wait().expect("the shell's status") {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = shell.wait();
    let (out, err) = (
        read_out.join().expect("stdout reader"),
        read_err.join().expect("stderr reader"),
    );
    let status = status.unwrap_or_else(|| panic!("the walkthrough ran over 120 s:\n{out}\n{err}"));
    assert!(
        status.success(),
        "the walkthrough failed ({status}):\n{out}\n{err}"
    );
    // The last document printed (curl adds no newline, and the processes' logs interleave).
    let from = out
        .rfind(r#"{"id":""#)
        .unwrap_or_else(|| panic!("a task:\n{out}\n{err}"));
    let task: serde_json::Value = serde_json::Deserializer::from_str(&out[from..])
        .into_iter()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("a task's JSON:\n{out}\n{err}"));
    assert_eq!(task["kind"], "work", "{task}");
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(task["result"]["dots"], 2, "{task}");
}
