//! The example HTTP targets of `examples/`, run as real processes (Flask on Python, Express on
//! Node) with the dependencies `tests/install-deps.sh` installed.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{eventually, free_port};

/// Which example.
#[derive(Debug, Clone, Copy)]
pub enum Example {
    /// `examples/python-target` (Flask).
    Python,
    /// `examples/node-target` (Express).
    Node,
}

/// A running example target. Killed when dropped.
pub struct ExampleTarget {
    child: Child,
    port: u16,
}

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

impl ExampleTarget {
    /// Starts `example` on a free port, signing secret `secret`, each `.` lasting
    /// `seconds_per_dot`; waits until it accepts connections.
    pub async fn start(example: Example, secret: &str, seconds_per_dot: f64) -> Self {
        let dir = examples();
        let (program, script) = match example {
            Example::Python => (
                dir.join("python-target/.venv/bin/python"),
                dir.join("python-target/app.py"),
            ),
            Example::Node => (PathBuf::from("node"), dir.join("node-target/server.js")),
        };
        let installed = match example {
            Example::Python => program.is_file(),
            Example::Node => dir.join("node-target/node_modules/express").is_dir(),
        };
        assert!(
            installed,
            "the {example:?} example's dependencies are missing: run tests/install-deps.sh"
        );
        let port = free_port();
        let child = Command::new(program)
            .arg(script)
            .env("TARGET_SIGNING_SECRET", secret)
            .env("SECONDS_PER_DOT", seconds_per_dot.to_string())
            .env("PORT", port.to_string())
            .env("HOST", "127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("start the {example:?} example: {error}"));
        let target = Self { child, port };
        eventually(
            Duration::from_secs(20),
            &format!("the {example:?} example to listen"),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
            },
        )
        .await;
        target
    }

    /// The URL of the example's task endpoint.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/work", self.port)
    }
}

impl Drop for ExampleTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
