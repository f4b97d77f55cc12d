//! Logging setup shared by both binaries.

use clap::{Args, ValueEnum};
use tracing_subscriber::{EnvFilter, fmt};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object per line, for containers and log shippers.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log line format. Verbosity is set with `RUST_LOG` (default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the global subscriber, writing to stdout, and routes panics through it so
    /// that a panicking handler is one log line in the chosen format, not raw text on stderr
    /// that breaks a JSON log. Call once, from `main`.
    pub fn init(&self) {
        std::panic::set_hook(Box::new(|info| {
            let location = info.location().map(ToString::to_string);
            tracing::error!(location, "panic: {}", panic_message(info.payload()));
        }));
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let builder = fmt().with_env_filter(filter).with_target(false);
        match self.log_format {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder
                .json()
                .flatten_event(true)
                .with_span_list(false)
                .init(),
        }
    }
}

/// The message a panic was raised with (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}
