//! HTTP targets: task kinds the worker runs by POSTing them to an endpoint of the user's app,
//! whose answer decides what happens (the pattern of Cloud Tasks' HTTP targets).
//!
//! Kinds map to URLs in the worker's own configuration (`TARGETS`, `TARGETS_FILE`), never to
//! a URL taken from a task, so no client can make offload call an address of its choosing.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use clap::Args;
use hmac::{Hmac, Mac};
use reqwest::{
    StatusCode, Url,
    header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER},
};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::Semaphore;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    HandlerError, Registry, RetryPolicy, Task,
    handler::{Completed, ErasedHandler, HandlerFuture},
};

/// How many bytes of a refusing answer's body go into the task's error.
const ERROR_BODY_BYTES: usize = 512;

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

/// The key of the targets' signatures; never shown by `Debug`, so never logged.
#[derive(Clone)]
pub struct SigningSecret(Arc<[u8]>);

impl FromStr for SigningSecret {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err("the signing secret is empty".into());
        }
        Ok(Self(text.as_bytes().into()))
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(***)")
    }
}

impl SigningSecret {
    /// The `Offload-Signature` value for `body` sent at `unix_seconds`.
    pub fn sign(&self, unix_seconds: u64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(unix_seconds.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!(
            "t={unix_seconds},v1={}",
            hex::encode(mac.finalize().into_bytes())
        )
    }
}

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
    concurrency: Option<usize>,
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
            registry = registry.register_target(target);
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

/// The body of a call, in the order docs/TARGETS.md shows.
#[derive(Serialize)]
struct Call<'a> {
    id: uuid::Uuid,
    kind: &'a str,
    payload: &'a serde_json::Value,
    attempt: u32,
    submitted_at: String,
}

/// A task kind run by POSTing the task to a URL.
pub(crate) struct HttpTarget {
    kind: String,
    url: Url,
    /// The URL as logs and errors show it: without its query, which may hold a token.
    shown: String,
    /// Longest one call may take, answer included.
    timeout: Duration,
    /// Bounds calls in flight to this target, whatever PREFETCH allows.
    limit: Option<Semaphore>,
    headers: HeaderMap,
    client: reqwest::Client,
    secret: Option<SigningSecret>,
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
        let limit = match entry.concurrency {
            Some(0) => return Err(fail("concurrency must be at least 1".into())),
            Some(n) => Some(Semaphore::new(n)),
            None => None,
        };
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
            limit,
            headers,
            client: client.clone(),
            secret,
        })
    }

    pub(crate) fn kind(&self) -> &str {
        &self.kind
    }

    /// POSTs `task` and reads the answer as what happened to it.
    async fn run(&self, task: Task, result_max_bytes: usize) -> Result<Completed, HandlerError> {
        let timeout = self.timeout;
        let _permit = match &self.limit {
            Some(limit) => Some(
                limit
                    .acquire()
                    .await
                    .expect("a target's semaphore is never closed"),
            ),
            None => None,
        };
        let body = serde_json::to_vec(&Call {
            id: task.id,
            kind: &task.kind,
            payload: &task.payload,
            attempt: task.attempt,
            submitted_at: humantime::format_rfc3339_millis(task.submitted_at).to_string(),
        })
        .map_err(|error| HandlerError::permanent(format!("cannot write the call: {error}")))?;
        let mut request = self
            .client
            .post(self.url.clone())
            .timeout(timeout)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("offload-task-id", task.id.to_string())
            .header("offload-attempt", task.attempt.to_string());
        // The attempt's span, as the parent of whatever the target records.
        if offload_common::trace::exporting() {
            let context = tracing::Span::current().context();
            for (name, value) in offload_common::trace::to_w3c(&context) {
                request = request.header(name, value);
            }
        }
        if let Some(secret) = &self.secret {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            request = request.header("offload-signature", secret.sign(now, &body));
        }
        let mut response = request
            .body(body)
            .send()
            .await
            .map_err(|error| HandlerError::from(describe(&error, &self.shown, timeout)))?;
        let status = response.status();
        if status.is_success() {
            let is_json = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .is_some_and(|value| value.contains("json"));
            let (body, complete) = read_at_most(&mut response, result_max_bytes)
                .await
                .map_err(|error| HandlerError::from(describe(&error, &self.shown, timeout)))?;
            if !complete {
                return Ok(Completed::too_large(
                    result_max_bytes.saturating_add(1),
                    result_max_bytes,
                ));
            }
            if !is_json || body.iter().all(u8::is_ascii_whitespace) {
                return Ok(Completed::default());
            }
            return Ok(match serde_json::from_slice(&body) {
                Ok(result) => Completed::bounded(Some(result), result_max_bytes),
                Err(error) => Completed {
                    result: None,
                    note: Some(format!(
                        "the target's answer is not JSON ({error}); no result kept"
                    )),
                },
            });
        }
        let retry_after = retry_after(response.headers());
        let (start, _) = read_at_most(&mut response, ERROR_BODY_BYTES)
            .await
            .unwrap_or_default();
        let error = format!(
            "{} answered {status}{}",
            self.shown,
            match String::from_utf8_lossy(&start).trim() {
                "" => String::new(),
                text => format!(": {text}"),
            }
        );
        Err(match judge(status) {
            Verdict::RetryAfter => match retry_after {
                Some(delay) => HandlerError::retry_after(error, delay),
                None => HandlerError::from(error),
            },
            Verdict::Retry => HandlerError::from(error),
            Verdict::Redirect => HandlerError::permanent(format!(
                "{error} (a redirect, which offload does not follow: point the target at the final URL)"
            )),
            Verdict::Permanent => HandlerError::permanent(error),
        })
    }
}

impl ErasedHandler for HttpTarget {
    fn call(self: Arc<Self>, task: Task, result_max_bytes: usize) -> HandlerFuture {
        Box::pin(async move { self.run(task, result_max_bytes).await })
    }

    fn policy(&self) -> Option<RetryPolicy> {
        None
    }
}

/// What an answer that is not 2xx means for the task.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// 429 and 503: after the answer's `Retry-After`, if it has one.
    RetryAfter,
    /// 408 and other 5xx: with backoff.
    Retry,
    /// 3xx: not followed, dead.
    Redirect,
    /// Other 4xx: a retry cannot help, dead.
    Permanent,
}

fn judge(status: StatusCode) -> Verdict {
    match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => Verdict::RetryAfter,
        StatusCode::REQUEST_TIMEOUT => Verdict::Retry,
        status if status.is_server_error() => Verdict::Retry,
        status if status.is_redirection() => Verdict::Redirect,
        _ => Verdict::Permanent,
    }
}

/// `Retry-After` as seconds or as an HTTP date; a date in the past is no delay.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// Up to `max` bytes of the body; `false` if there was more (the rest is not read).
async fn read_at_most(
    response: &mut reqwest::Response,
    max: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > max {
            let room = max - body.len();
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// A failed call in one line: what happened, to which URL (as shown: no query).
fn describe(error: &reqwest::Error, url: &str, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!(
            "{url} did not answer within {} (the target's timeout)",
            humantime::format_duration(timeout)
        );
    }
    // reqwest's own text names the whole URL, query included: say it in our words, with
    // the URL as shown, and the causes' text (which name no URL).
    let what = if error.is_connect() {
        "cannot connect"
    } else if error.is_body() || error.is_decode() {
        "the answer broke off"
    } else {
        "the call failed"
    };
    let mut text = format!("{url}: {what}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_stripe_scheme() {
        let secret: SigningSecret = "whsec_test".parse().expect("a secret");
        // Computed independently, with Python: hmac.new(b"whsec_test", b'{t}.{body}', sha256)
        assert_eq!(
            secret.sign(1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
        assert_eq!(format!("{secret:?}"), "SigningSecret(***)");
    }

    #[test]
    fn answers_map_to_verdicts() {
        assert_eq!(judge(StatusCode::TOO_MANY_REQUESTS), Verdict::RetryAfter);
        assert_eq!(judge(StatusCode::SERVICE_UNAVAILABLE), Verdict::RetryAfter);
        assert_eq!(judge(StatusCode::REQUEST_TIMEOUT), Verdict::Retry);
        assert_eq!(judge(StatusCode::INTERNAL_SERVER_ERROR), Verdict::Retry);
        assert_eq!(judge(StatusCode::BAD_GATEWAY), Verdict::Retry);
        assert_eq!(judge(StatusCode::FOUND), Verdict::Redirect);
        assert_eq!(judge(StatusCode::BAD_REQUEST), Verdict::Permanent);
        assert_eq!(judge(StatusCode::NOT_FOUND), Verdict::Permanent);
        assert_eq!(judge(StatusCode::UNPROCESSABLE_ENTITY), Verdict::Permanent);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).expect("a date"));
        let delay = retry_after(&headers).expect("a date parses");
        assert!(
            delay > Duration::from_secs(110) && delay <= Duration::from_secs(120),
            "{delay:?}"
        );
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

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
