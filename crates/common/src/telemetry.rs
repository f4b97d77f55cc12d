//! Logging (and span export) setup shared by both binaries.

mod stdout;

use clap::{Args, ValueEnum};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, LevelFilter, filter_fn},
    fmt,
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

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
    /// that breaks a JSON log; with `OTEL_EXPORTER_OTLP_ENDPOINT` set, also records spans and
    /// exports them ([`crate::trace`]) as `service`. Call once, from `main`, within the tokio
    /// runtime; call [`Telemetry::shutdown`] before exiting so the last spans are sent.
    ///
    /// # Errors
    /// When OTLP export is asked for but cannot be set up (a malformed endpoint, say); the
    /// logs work all the same, and the error is logged.
    pub fn init(&self, service: &'static str) -> Result<Telemetry, String> {
        // Many lines to a `write` (stdout.rs says why).
        let lines = stdout::Stdout::start();
        let panicked = lines.writer();
        std::panic::set_hook(Box::new(move |info| {
            let location = info.location().map(ToString::to_string);
            tracing::error!(location, "panic: {}", panic_message(info.payload()));
            // Now: the process may not live to write it otherwise (a panic while unwinding
            // aborts).
            panicked.write_now();
        }));
        let directives = with_clients_quiet(std::env::var("RUST_LOG").ok().as_deref());
        let filter = EnvFilter::try_new(&directives)
            .unwrap_or_else(|_| EnvFilter::new(with_clients_quiet(None)))
            .and(filter_fn(no_frames));
        let logs = match self.log_format {
            LogFormat::Text => fmt::layer()
                .with_target(false)
                .with_writer(lines.writer())
                .boxed(),
            LogFormat::Json => fmt::layer()
                .with_target(false)
                .with_writer(lines.writer())
                .json()
                .flatten_event(true)
                .with_span_list(false)
                .boxed(),
        }
        .with_filter(filter);
        let (provider, problem) = if crate::trace::export_wanted() {
            match crate::trace::provider(service) {
                Ok(provider) => (Some(provider), None),
                Err(problem) => (None, Some(problem)),
            }
        } else {
            (None, None)
        };
        // Spans are recorded whatever RUST_LOG says of the logs: they are another output.
        let spans = provider
            .as_ref()
            .map(|provider| crate::trace::layer(provider).with_filter(LevelFilter::INFO));
        tracing_subscriber::registry().with(logs).with(spans).init();
        match problem {
            // Written when `lines` is dropped, on the way out.
            Some(problem) => {
                tracing::error!("{problem}");
                Err(problem)
            }
            None => Ok(Telemetry { provider, lines }),
        }
    }
}

/// What [`LogArgs::init`] set up that must be shut down: the span exporter, if any.
#[must_use = "call shutdown before exiting, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    /// Dropped (here last, or by a panic unwinding through `main`), it writes the log lines
    /// still buffered.
    lines: stdout::Stdout,
}

impl Telemetry {
    /// Sends the spans not yet exported and stops the exporter (a no-op without one).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // It blocks until the batch task on the runtime has sent the last spans.
            let shut = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = shut {
                tracing::warn!("the last spans may not have been exported: {error}");
            }
        }
        drop(self.lines);
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

/// The AMQP client's crates, whose own log lines are off unless `RUST_LOG` names them.
const CLIENTS: [&str; 2] = ["lapin", "amq_protocol"];

/// `RUST_LOG`'s directives (default `info`), with the AMQP client's own lines turned off
/// unless they name it (`RUST_LOG=info,lapin=debug`). Its lines repeat, in Rust's debug
/// output (`error doing IO ... Error { kind: IOError(..) }`), what our own lines already say
/// in words (a lost broker is logged by the session that lost it), and its warning of a
/// returned message prints the message, a task's payload with it.
fn with_clients_quiet(rust_log: Option<&str>) -> String {
    let directives = rust_log
        .map(str::trim)
        .filter(|given| !given.is_empty())
        .unwrap_or("info");
    if CLIENTS.iter().any(|client| directives.contains(client)) {
        return directives.to_owned();
    }
    CLIENTS.iter().fold(directives.to_owned(), |quiet, client| {
        quiet + "," + client + "=off"
    })
}

/// Whether an event may be logged whatever `RUST_LOG` asks: not the AMQP client's trace
/// output, which prints frames with Rust's debug output, among them the SASL PLAIN response
/// (`\0user\0password`, as a list of numbers no redaction of text would catch). Secrets
/// never reach a log, at any level.
fn no_frames(meta: &tracing::Metadata<'_>) -> bool {
    !(*meta.level() == tracing::Level::TRACE
        && CLIENTS
            .iter()
            .any(|client| meta.target().starts_with(client)))
}

#[cfg(test)]
mod tests {
    use super::with_clients_quiet;

    #[test]
    fn the_amqp_clients_own_lines_are_off_unless_named() {
        assert_eq!(with_clients_quiet(None), "info,lapin=off,amq_protocol=off");
        assert_eq!(
            with_clients_quiet(Some(" ")),
            "info,lapin=off,amq_protocol=off"
        );
        assert_eq!(
            with_clients_quiet(Some("debug,offload::task=warn")),
            "debug,offload::task=warn,lapin=off,amq_protocol=off"
        );
        assert_eq!(
            with_clients_quiet(Some("info,lapin=debug")),
            "info,lapin=debug"
        );
    }
}
