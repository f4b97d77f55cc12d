//! The targets' settings: `TARGETS`, `TARGETS_FILE`, the signing secret and the timeout, read
//! and checked once at start, each target registered for its kind.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use clap::Args;
use reqwest::{
    Url,
    header::{HeaderMap, HeaderName, HeaderValue},
};
use serde::Deserialize;

use super::{call::HttpTarget, signing::SigningSecret};
use crate::Registry;

/// The HTTP-target settings of a worker.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Task kinds run by POSTing them to an HTTP endpoint: `kind=url` pairs separated by
    /// commas, e.g. `send-email=http://app:8000/jobs/send-email,resize=http://img:9000/resize`.
    /// The endpoint's answer decides: 2xx done, 429/503 with Retry-After retried after that
    /// delay, 408/5xx/timeouts/connection errors retried with backoff, other 4xx dead.
    #[arg(long, env = "TARGETS", default_value = "")]
    pub targets: String,

    /// A TOML file of HTTP targets, each with its own timeout, concurrency limit and extra
    /// headers (see docs/TARGETS.md); used together with TARGETS.
    #[arg(long, env = "TARGETS_FILE")]
    pub targets_file: Option<PathBuf>,

    /// Secret that signs every call to a target (`Offload-Signature: t=<unix
    /// seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, the Stripe webhook scheme). Unset: calls
    /// go unsigned. Prefer TARGET_SIGNING_SECRET_FILE or the environment to the flag.
    #[arg(long, env = "TARGET_SIGNING_SECRET", hide_env_values = true)]
    pub target_signing_secret: Option<SigningSecret>,

    /// A file holding TARGET_SIGNING_SECRET (trailing white space ignored). Wins over
    /// TARGET_SIGNING_SECRET when set.
    #[arg(long, env = "TARGET_SIGNING_SECRET_FILE")]
    pub target_signing_secret_file: Option<PathBuf>,

    /// Longest a call to a target may take, answer included, unless its entry in TARGETS_FILE
    /// sets its own; past it the attempt fails and is retried. HANDLER_TIMEOUT still bounds
    /// every attempt.
    #[arg(long, env = "TARGET_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub target_timeout: Duration,
}

impl Default for TargetArgs {
    fn default() -> Self {
        Self {
            targets: String::new(),
            targets_file: None,
            target_signing_secret: None,
            target_signing_secret_file: None,
            target_timeout: DEFAULT_TARGET_TIMEOUT,
        }
    }
}

/// Default for `--target-timeout`.
pub const DEFAULT_TARGET_TIMEOUT: Duration = Duration::from_secs(300);

/// Why the targets' settings are unusable; the worker stops with this one line.
#[derive(Debug, thiserror::Error)]
pub enum TargetsError {
    /// A file named by a setting cannot be read.
    #[error("cannot read {setting} {path:?}: {source}")]
    File {
        /// The setting naming the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TARGETS_FILE is not the TOML it should be.
    #[error("TARGETS_FILE {path:?} is not valid: {message}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// What the TOML parser says, with the line.
        message: String,
    },
    /// One target is wrong: its kind, URL, timeout or headers.
    #[error("target '{kind}': {message}")]
    Target {
        /// The kind, as written.
        kind: String,
        /// What is wrong and what to write instead.
        message: String,
    },
    /// A TARGETS entry is not `kind=url`.
    #[error("TARGETS entry {0:?} is not kind=url (pairs are separated by commas)")]
    Entry(String),
    /// The HTTP client cannot be built (no usable TLS roots, say).
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// One target as TARGETS_FILE writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTarget {
    url: String,
    timeout: Option<String>,
    concurrency: Option<u16>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetsFile {
    #[serde(default)]
    targets: BTreeMap<String, FileTarget>,
}

impl TargetArgs {
    /// Adds every configured target to `registry`. A kind named twice, or both by a target and
    /// by a Rust handler, is an error: which one should run it would be a guess.
    pub fn register(&self, mut registry: Registry) -> Result<Registry, TargetsError> {
        let entries = self.entries()?;
        if entries.is_empty() {
            return Ok(registry);
        }
        let secret = match &self.target_signing_secret_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| TargetsError::File {
                    setting: "TARGET_SIGNING_SECRET_FILE",
                    path: path.clone(),
                    source,
                })?;
                Some(text.trim().parse::<SigningSecret>().map_err(|message| {
                    TargetsError::Target {
                        kind: "*".into(),
                        message: format!("TARGET_SIGNING_SECRET_FILE: {message}"),
                    }
                })?)
            }
            None => self.target_signing_secret.clone(),
        };
        if secret.is_none() {
            tracing::warn!(
                "TARGET_SIGNING_SECRET is not set: calls to HTTP targets go unsigned, and a target cannot tell them from anyone else's"
            );
        }
        let client = reqwest::Client::builder()
            // A redirect would let a target send offload (and the task) somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("offload-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let rust_kinds: Vec<String> = registry.kinds().into_iter().map(str::to_owned).collect();
        for (kind, entry) in entries {
            if rust_kinds.contains(&kind) {
                return Err(TargetsError::Target {
                    kind,
                    message: "this worker also has a Rust handler of that kind; give the target a kind of its own".into(),
                });
            }
            if registry.kinds().contains(&kind.as_str()) {
                return Err(TargetsError::Target {
                    kind,
                    message: "named twice (in TARGETS and TARGETS_FILE, or twice in one)".into(),
                });
            }
            let target =
                HttpTarget::new(kind, entry, self.target_timeout, &client, secret.clone())?;
            tracing::info!(kind = target.kind(), url = %target.shown, "HTTP target");
            registry = registry.insert(target.kind().to_owned(), Arc::new(target));
        }
        Ok(registry)
    }

    /// Every configured target, TARGETS first, then TARGETS_FILE, as written.
    fn entries(&self) -> Result<Vec<(String, FileTarget)>, TargetsError> {
        let mut entries = Vec::new();
        for pair in self.targets.split(',').map(str::trim) {
            if pair.is_empty() {
                continue;
            }
            let Some((kind, url)) = pair.split_once('=') else {
                return Err(TargetsError::Entry(pair.to_owned()));
            };
            entries.push((
                kind.trim().to_owned(),
                FileTarget {
                    url: url.trim().to_owned(),
                    timeout: None,
                    concurrency: None,
                    headers: BTreeMap::new(),
                },
            ));
        }
        if let Some(path) = &self.targets_file {
            entries.extend(read_file(path)?.targets);
        }
        Ok(entries)
    }
}

fn read_file(path: &Path) -> Result<TargetsFile, TargetsError> {
    let text = std::fs::read_to_string(path).map_err(|source| TargetsError::File {
        setting: "TARGETS_FILE",
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|error| TargetsError::Toml {
        path: path.to_owned(),
        message: error.to_string(),
    })
}

impl HttpTarget {
    fn new(
        kind: String,
        entry: FileTarget,
        default_timeout: Duration,
        client: &reqwest::Client,
        secret: Option<SigningSecret>,
    ) -> Result<Self, TargetsError> {
        let fail = |message: String| TargetsError::Target {
            kind: kind.clone(),
            message,
        };
        if let Err(error) = offload_common::TaskKind::try_from(kind.as_str()) {
            return Err(fail(error.to_string()));
        }
        let url = Url::parse(&entry.url)
            .map_err(|error| fail(format!("{:?} is not a URL: {error}", entry.url)))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(fail(
                "a URL with credentials in it would put them in logs and errors; send them as a header (TARGETS_FILE `headers`)".into(),
            ));
        }
        if !matches!(url.scheme(), "http" | "https") {
            return Err(fail(format!(
                "{:?} is not an http:// or https:// URL",
                entry.url
            )));
        }
        let timeout = entry
            .timeout
            .as_deref()
            .map(humantime::parse_duration)
            .transpose()
            .map_err(|error| fail(format!("timeout: {error} (write e.g. \"30s\")")))?
            .unwrap_or(default_timeout);
        if entry.concurrency == Some(0) {
            return Err(fail("concurrency must be at least 1".into()));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in entry.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| fail(format!("{name:?} is not a header name")))?;
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| fail(format!("the value of header {name} is not valid")))?;
            // Extra headers carry credentials more often than not: keep them out of any debug
            // output of the client.
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let mut shown = url.clone();
        shown.set_query(None);
        Ok(Self {
            kind,
            shown: shown.to_string(),
            url,
            timeout,
            concurrency: entry.concurrency,
            headers,
            client: client.clone(),
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_the_list_and_the_file() {
        let file = tempfile::NamedTempFile::new().expect("a temporary file");
        std::fs::write(
            file.path(),
            r#"
[targets.resize]
url = "http://img:9000/resize"
timeout = "30s"
concurrency = 4
headers = { Authorization = "Bearer abc" }
"#,
        )
        .expect("write the file");
        let args = TargetArgs {
            targets: "send-email=http://app:8000/jobs/send-email, ".into(),
            targets_file: Some(file.path().to_owned()),
            ..TargetArgs::default()
        };
        let registry = args.register(Registry::default()).expect("valid targets");
        assert_eq!(registry.kinds(), ["resize", "send-email"]);
    }

    #[test]
    fn bad_targets_are_refused_with_what_to_fix() {
        let refuse = |targets: &str| {
            TargetArgs {
                targets: targets.into(),
                ..TargetArgs::default()
            }
            .register(Registry::default())
            .map(|_| ())
            .expect_err("refused")
            .to_string()
        };
        assert!(refuse("send-email").contains("kind=url"));
        assert!(refuse("Send=http://a/").contains("target 'Send'"));
        let leaky = refuse("a=http://user:secret@app:8000/");
        assert!(
            leaky.contains("header") && !leaky.contains("secret"),
            "{leaky}"
        );
        assert!(refuse("a=ftp://a/").contains("http://"));
        assert!(refuse("a=not a url").contains("not a URL"));
        assert!(refuse("a=http://x/,a=http://y/").contains("named twice"));
        let clash = TargetArgs {
            targets: "sleep=http://a/".into(),
            ..TargetArgs::default()
        }
        .register(
            Registry::default().register(crate::handlers::Sleep::new(Duration::from_millis(1), 1)),
        )
        .map(|_| ())
        .expect_err("a target cannot take a Rust handler's kind");
        assert!(clash.to_string().contains("Rust handler"), "{clash}");
    }
}
