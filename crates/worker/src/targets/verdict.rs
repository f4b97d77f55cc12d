//! What a target's answer that is not 2xx means for the task, and when to call again.

use std::time::{Duration, SystemTime};

use reqwest::{
    StatusCode,
    header::{HeaderMap, RETRY_AFTER},
};

/// What an answer that is not 2xx means for the task.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// 429 and 503: after the answer's `Retry-After`, if it has one.
    RetryAfter,
    /// 408 and other 5xx: with backoff.
    Retry,
    /// 3xx: not followed, dead.
    Redirect,
    /// Other 4xx: a retry cannot help, dead.
    Permanent,
}

pub(super) fn judge(status: StatusCode) -> Verdict {
    match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => Verdict::RetryAfter,
        StatusCode::REQUEST_TIMEOUT => Verdict::Retry,
        status if status.is_server_error() => Verdict::Retry,
        status if status.is_redirection() => Verdict::Redirect,
        _ => Verdict::Permanent,
    }
}

/// `Retry-After` as seconds or as an HTTP date; a date in the past is no delay.
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

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
}
