//! Access control: API keys with scopes, and a rate limit per key.
//!
//! Keys are held as SHA-256 digests, never as text, and a presented key is compared with
//! every digest in constant time, so neither memory dumps nor response timing give a key
//! away. Keys never reach a log line: errors name a key by its position in the list.

use std::{num::NonZeroU32, path::Path, sync::Arc};

use axum::{
    extract::{Request, State},
    http::{HeaderMap, Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::{Engine, prelude::BASE64_STANDARD};
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
pub use crate::scope::Scope;

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    governor::middleware::NoOpMiddleware<<DefaultClock as Clock>::Instant>,
>;

struct Key {
    digest: [u8; 32],
    scopes: u8,
    limiter: Option<Limiter>,
    caller: Caller,
}

/// Who a request let through is, as far as idempotency keys go: the API key it presented, by a
/// digest that names it without giving it away, or nobody (an open gateway). Handlers read it
/// from the request's extensions; absent, the caller is anonymous.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// 32 hex digits: the first 16 bytes of SHA-256 over a label and the key's own SHA-256.
    /// Every gateway with the key computes the same; the events stream carries it.
    pub idempotency_scope: Option<Arc<str>>,
}

impl Caller {
    fn of_key(digest: &[u8; 32]) -> Self {
        let scope = Sha256::new()
            .chain_update(b"offload idempotency scope\0")
            .chain_update(digest)
            .finalize();
        Self {
            idempotency_scope: Some(hex::encode(&scope[..16]).into()),
        }
    }
}

/// Who may call the gateway, and how often. Cheap to clone.
#[derive(Clone)]
pub struct Access {
    inner: Arc<Inner>,
}

struct Inner {
    /// Empty: the gateway is open.
    keys: Vec<Key>,
    /// The one limiter everybody shares when the gateway is open.
    open_limiter: Option<Limiter>,
}

/// Why the key settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The keys file could not be read.
    #[error("cannot read API_KEYS_FILE {path}: {source}")]
    File {
        /// Its path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An entry is malformed. Names the entry by position, never by its text.
    #[error("API key entry {entry}: {problem}")]
    Entry {
        /// 1-based position in the list (or line in the file).
        entry: usize,
        /// What is wrong.
        problem: String,
    },
}

impl Access {
    /// Reads `API_KEYS` or `API_KEYS_FILE`, and the rate limit.
    pub fn from_settings(
        keys: Option<&str>,
        keys_file: Option<&Path>,
        rate_limit: Option<NonZeroU32>,
        burst: Option<NonZeroU32>,
    ) -> Result<Self, AccessError> {
        let quota =
            rate_limit.map(|rate| Quota::per_second(rate).allow_burst(burst.unwrap_or(rate)));
        let limiter = || quota.map(RateLimiter::direct);
        let entries: Vec<(usize, String)> = match (keys, keys_file) {
            (_, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| AccessError::File {
                    path: path.display().to_string(),
                    source,
                })?
                .lines()
                .enumerate()
                .map(|(index, line)| (index + 1, line.trim().to_owned()))
                .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
                .collect(),
            (Some(list), None) => list
                .split(',')
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .enumerate()
                .map(|(index, entry)| (index + 1, entry.to_owned()))
                .collect(),
            (None, None) => Vec::new(),
        };
        let keys = entries
            .into_iter()
            .map(|(entry, text)| {
                let (key, scopes) =
                    parse_entry(&text).map_err(|problem| AccessError::Entry { entry, problem })?;
                let digest = Sha256::digest(key.as_bytes()).into();
                Ok(Key {
                    caller: Caller::of_key(&digest),
                    digest,
                    scopes,
                    limiter: limiter(),
                })
            })
            .collect::<Result<Vec<_>, AccessError>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                open_limiter: if keys.is_empty() { limiter() } else { None },
                keys,
            }),
        })
    }

    /// No keys at all: anyone who reaches the port may call everything.
    pub fn is_open(&self) -> bool {
        self.inner.keys.is_empty()
    }

    /// How many keys are configured.
    pub fn key_count(&self) -> usize {
        self.inner.keys.len()
    }

    /// Lets a request with these headers through for `scope`, or says why not; who it is.
    pub fn check(&self, headers: &HeaderMap, scope: Scope) -> Result<Option<&Caller>, ApiError> {
        self.check_any(headers, &[scope])
    }

    /// Lets a request through with a key that has any of `scopes` (the first is named when
    /// it has none), or says why not; who it is (`None`: anonymous, the gateway is open).
    pub fn check_any(
        &self,
        headers: &HeaderMap,
        scopes: &[Scope],
    ) -> Result<Option<&Caller>, ApiError> {
        let (limiter, caller) = if self.is_open() {
            (self.inner.open_limiter.as_ref(), None)
        } else {
            let presented = presented_key(headers).ok_or(ApiError::Unauthorized(
                if headers.contains_key(header::AUTHORIZATION) {
                    "the Authorization header holds no key offload reads (a bare key, say)"
                } else {
                    "this gateway needs an API key and the request has none"
                },
            ))?;
            let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
            // Look at every key, whatever matches, so the time taken says nothing.
            let mut found = None;
            for key in &self.inner.keys {
                if bool::from(key.digest.ct_eq(&digest)) {
                    found = Some(key);
                }
            }
            let key = found.ok_or(ApiError::Unauthorized("the API key is not valid"))?;
            if scopes.iter().all(|scope| key.scopes & scope.bit() == 0) {
                return Err(ApiError::Forbidden(
                    scopes.first().copied().unwrap_or(Scope::Admin),
                ));
            }
            (key.limiter.as_ref(), Some(&key.caller))
        };
        match limiter.map(Limiter::check) {
            Some(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(ApiError::RateLimited {
                    retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                })
            }
            _ => Ok(caller),
        }
    }
}

/// `key` or `key=scope+scope`.
fn parse_entry(text: &str) -> Result<(&str, u8), String> {
    let (key, scopes) = match text.split_once('=') {
        Some((key, scopes)) => (key.trim(), Some(scopes.trim())),
        None => (text, None),
    };
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a key must be printable ASCII without spaces".into());
    }
    let Some(scopes) = scopes else {
        return Ok((
            key,
            Scope::ALL.iter().fold(0, |bits, scope| bits | scope.bit()),
        ));
    };
    let mut bits = 0;
    for name in scopes.split('+').map(str::trim) {
        let scope = Scope::parse(name).ok_or_else(|| {
            format!("unknown scope {name:?}; scopes are submit, read and admin, joined with '+'")
        })?;
        bits |= scope.bit();
    }
    Ok((key, bits))
}

/// The key of an `Authorization: Bearer <key>` header, or the password of an
/// `Authorization: Basic` one (the user name is ignored), which is how a browser sends it.
fn presented_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(credentials.to_owned());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = BASE64_STANDARD.decode(credentials).ok()?;
    let (_user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(password.to_owned())
}

/// The header the dashboard adds to every request that changes something. A form on another
/// site cannot add a header, and a script there cannot either without a CORS preflight,
/// which the gateway never grants.
pub const REQUESTED_BY: &str = "x-requested-by";

/// Refuses a request that changes something (cross-site request forgery):
/// - when the browser says a page of another origin sent it: `Sec-Fetch-Site` other than
///   `same-origin` or `none` (typed by the user), or, from a browser that does not send that,
///   an `Origin` whose host is not this request's `Host`; whether or not API keys are set, as
///   an open gateway is the one a form on another site can use with no login at all. Clients
///   that are not browser pages send neither header.
/// - when it carries a browser's Basic login but not [`REQUESTED_BY`]: a browser sends a
///   cached login with any request to this origin.
fn forgery_guard(request: &Request) -> Result<(), ApiError> {
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !safe {
        foreign_origin(request.headers())
            .map_or(Ok(()), |why| Err(ApiError::ForeignOrigin(why)))?;
    }
    let basic = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"));
    if safe || !basic || request.headers().contains_key(REQUESTED_BY) {
        Ok(())
    } else {
        Err(ApiError::CrossSite)
    }
}

/// Why the browser's headers say a page of another origin sent this request, if they do.
fn foreign_origin(headers: &HeaderMap) -> Option<&'static str> {
    let header = |name| headers.get(name).and_then(|value| value.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return (!matches!(site, "same-origin" | "none")).then_some("Sec-Fetch-Site");
    }
    let origin = header(header::ORIGIN.as_str())?;
    // `Origin: null` (a sandboxed page, a redirect) names no origin at all.
    let from = origin.split_once("://").map(|(_, rest)| rest);
    let host = header(header::HOST.as_str());
    (from.is_none() || from != host).then_some("Origin")
}

/// Middleware: lets a request through only with a key that has `scope`.
pub async fn require(
    State((access, scope)): State<(Access, Scope)>,
    request: Request,
    next: Next,
) -> Response {
    let checked = forgery_guard(&request).and_then(|()| access.check(request.headers(), scope));
    let_through(checked.map(Option::<&Caller>::cloned), request, next).await
}

/// Middleware: lets a request through only with a key that has one of the scopes.
pub async fn require_any(
    State((access, scopes)): State<(Access, &'static [Scope])>,
    request: Request,
    next: Next,
) -> Response {
    let checked =
        forgery_guard(&request).and_then(|()| access.check_any(request.headers(), scopes));
    let_through(checked.map(Option::<&Caller>::cloned), request, next).await
}

/// Runs the request, its caller (if a key) in its extensions, or answers why not.
async fn let_through(
    checked: Result<Option<Caller>, ApiError>,
    mut request: Request,
    next: Next,
) -> Response {
    match checked {
        Ok(caller) => {
            if let Some(caller) = caller {
                request.extensions_mut().insert(caller);
            }
            next.run(request).await
        }
        Err(error) => refused(&request, error),
    }
}

/// The answer to a request refused at the door (401, 403, 429), before its body is read. A
/// connection whose request body was not read cannot carry another request, and the server
/// closes it: `Connection: close` says so, so that the client does not send its next request
/// on it and meet a closed socket.
fn refused(request: &Request, error: ApiError) -> Response {
    let mut response = error.into_response();
    if !axum::body::HttpBody::is_end_stream(request.body()) {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn with_key(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).expect("header"),
        );
        headers
    }

    fn with_authorization(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(value).expect("header"),
        );
        headers
    }

    #[test]
    fn a_browser_sends_the_key_as_the_password_of_a_basic_login() {
        let access = Access::from_settings(Some("reader=read"), None, None, None).expect("keys");
        // "anyone:reader" and "anyone:wrong"
        let good = with_authorization("Basic YW55b25lOnJlYWRlcg==");
        let bad = with_authorization("Basic YW55b25lOndyb25n");
        assert!(access.check(&good, Scope::Read).is_ok());
        assert!(matches!(
            access.check(&bad, Scope::Read),
            Err(ApiError::Unauthorized(_))
        ));
        for broken in ["Basic not-base64!", "Basic cmVhZGVy", "Digest reader"] {
            assert!(
                matches!(
                    access.check(&with_authorization(broken), Scope::Read),
                    Err(ApiError::Unauthorized(_))
                ),
                "{broken}"
            );
        }
    }

    #[test]
    fn scopes_are_enforced() {
        let access = Access::from_settings(
            Some("all-key, reader=read, ops=read+admin"),
            None,
            None,
            None,
        )
        .expect("valid keys");
        assert!(!access.is_open());
        assert!(access.check(&with_key("all-key"), Scope::Admin).is_ok());
        assert!(access.check(&with_key("reader"), Scope::Read).is_ok());
        assert!(matches!(
            access.check(&with_key("reader"), Scope::Submit),
            Err(ApiError::Forbidden(Scope::Submit))
        ));
        assert!(access.check(&with_key("ops"), Scope::Admin).is_ok());
        assert!(matches!(
            access.check(&with_key("nope"), Scope::Read),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            access.check(&HeaderMap::new(), Scope::Read),
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[test]
    fn each_key_is_a_caller_of_its_own_named_by_a_digest_not_the_key() {
        let settings = Some("shop-key=submit, billing-key");
        let access = Access::from_settings(settings, None, None, None).expect("valid keys");
        let scope = |key| {
            access
                .check(&with_key(key), Scope::Submit)
                .expect("let through")
                .and_then(|caller| caller.idempotency_scope.clone())
                .expect("a key's caller has a scope")
        };
        let (shop, billing) = (scope("shop-key"), scope("billing-key"));
        assert_ne!(shop, billing);
        assert_eq!(shop.len(), 32);
        assert!(!shop.contains("shop"));
        // Every gateway with the key names it alike.
        let again = Access::from_settings(settings, None, None, None).expect("valid keys");
        let caller = again
            .check(&with_key("shop-key"), Scope::Submit)
            .expect("let through");
        assert_eq!(
            caller.and_then(|caller| caller.idempotency_scope.clone()),
            Some(shop)
        );
        // An open gateway's callers are anonymous.
        let open = Access::from_settings(None, None, None, None).expect("no keys");
        assert_eq!(
            open.check(&HeaderMap::new(), Scope::Submit).expect("open"),
            None
        );
    }

    #[test]
    fn bad_entries_are_named_by_position_not_text() {
        let error = Access::from_settings(Some("good,s3cret=write"), None, None, None)
            .err()
            .expect("unknown scope")
            .to_string();
        assert!(error.contains("entry 2"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn no_keys_means_open() {
        let access = Access::from_settings(None, None, None, None).expect("open");
        assert!(access.is_open());
        assert!(access.check(&HeaderMap::new(), Scope::Admin).is_ok());
    }

    #[test]
    fn the_rate_limit_says_when_to_come_back() {
        let one = NonZeroU32::new(1).expect("non-zero");
        let access = Access::from_settings(Some("k"), None, Some(one), None).expect("valid");
        assert!(access.check(&with_key("k"), Scope::Submit).is_ok());
        match access.check(&with_key("k"), Scope::Submit) {
            Err(ApiError::RateLimited { retry_after }) => assert_eq!(retry_after, 1),
            other => panic!("expected 429, got {other:?}"),
        }
    }
}
