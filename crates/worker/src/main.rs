//! `offload-worker`: consumes tasks and runs the built-in handlers until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use offload_worker::{Config, handlers};

fn main() -> ExitCode {
    let config = Config::parse();
    let registry = handlers::builtin(&config);
    offload_worker::block_on(config, registry)
}
