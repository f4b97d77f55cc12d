//! A worker with a Rust task kind of its own, `reverse`, beside offload's built-in ones and
//! any HTTP targets: the same flags and environment as `offload-worker`, no fork of offload.
//!
//! `cargo run -p offload-rust-worker-example`, then
//! `curl -d '{"kind":"reverse","payload":{"text":"hello"}}' localhost:8080/tasks`.

use std::process::ExitCode;

use clap::Parser;
use offload_worker::{Config, Handler, HandlerError, Task, handlers};
use serde::{Deserialize, Serialize};

/// The payload of a `reverse` task. One that does not fit (no `text`, say) is dead at once,
/// with serde's message as its reason.
#[derive(Deserialize)]
struct Text {
    text: String,
}

/// The result, as GET /tasks/{id} shows it.
#[derive(Serialize)]
struct Reversed {
    reversed: String,
}

struct Reverse;

impl Handler for Reverse {
    const KIND: &'static str = "reverse";
    type Payload = Text;
    type Output = Reversed;

    async fn handle(&self, task: Task<Text>) -> Result<Reversed, HandlerError> {
        if task.payload.text.is_empty() {
            // Retrying cannot help: dead-letter it now.
            return Err(HandlerError::permanent("there is no text to reverse"));
        }
        Ok(Reversed {
            reversed: task.payload.text.chars().rev().collect(),
        })
    }
}

fn main() -> ExitCode {
    let config = Config::parse();
    let registry = handlers::builtin(&config).register(Reverse);
    offload_worker::block_on(config, registry)
}
