//! Broker URLs: a list of them in one setting, and redaction for logs.
//!
//! `AMQP_URL` may name several nodes of a cluster, comma-separated. A comma is also a legal
//! character in a URL's userinfo (RFC 3986 lets a password hold one unencoded), so the list is
//! split only at a comma that starts another URL (`scheme://`).

use lapin::uri::{AMQPScheme, AMQPUri};

/// One broker address: the URL as given, its parsed form, and a copy fit for logs.
#[derive(Clone)]
pub struct Endpoint {
    uri: AMQPUri,
    redacted: String,
}

impl Endpoint {
    /// The parsed URL.
    pub fn uri(&self) -> &AMQPUri {
        &self.uri
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// Whether this endpoint asks for TLS (`amqps://`).
    pub fn is_tls(&self) -> bool {
        self.uri.scheme == AMQPScheme::AMQPS
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// Why a URL setting could not be used. Every message is already redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The setting is empty.
    #[error("AMQP_URL is empty; expected amqp://user:password@host:5672/%2f")]
    Empty,
    /// One URL of the list is not an AMQP URL.
    #[error(
        "AMQP_URL {url} is not a valid AMQP URL ({reason}); expected amqp://user:password@host:5672/%2f, or amqps:// for TLS, several separated by commas"
    )]
    Invalid {
        /// The URL, password redacted.
        url: String,
        /// What the parser said, password redacted.
        reason: String,
    },
}

/// Parses a comma-separated list of AMQP URLs.
pub fn parse_list(list: &str) -> Result<Vec<Endpoint>, UrlError> {
    let urls = split_list(list);
    if urls.is_empty() {
        return Err(UrlError::Empty);
    }
    urls.into_iter()
        .map(|url| {
            let redacted = redact_one(url);
            match url.parse::<AMQPUri>() {
                Ok(uri) => Ok(Endpoint { uri, redacted }),
                // lapin's parser quotes the URL it refused, password and all.
                Err(reason) => Err(UrlError::Invalid {
                    reason: reason.replace(url, &redacted),
                    url: redacted,
                }),
            }
        })
        .collect()
}

/// The URLs of a list, trimmed, empty entries dropped.
fn split_list(list: &str) -> Vec<&str> {
    let mut starts = vec![0];
    for (index, _) in list.match_indices(',') {
        let rest = list[index + 1..].trim_start();
        if starts_with_scheme(rest) {
            starts.push(index + 1);
        }
    }
    starts.push(list.len() + 1);
    starts
        .windows(2)
        .map(|bounds| list[bounds[0]..bounds[1] - 1].trim())
        .filter(|url| !url.is_empty())
        .collect()
}

/// Whether `text` starts with `scheme://` (RFC 3986: a letter, then letters, digits, `+`,
/// `-` or `.`).
fn starts_with_scheme(text: &str) -> bool {
    let Some((scheme, _)) = text.split_once("://") else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Replaces the password of every URL in `list` (one URL or a comma-separated list) with
/// `***`, so the text can be logged.
///
/// Conservative by design: everything between the user name's `:` and the *last* `@` of a
/// URL is hidden, so a password holding an unencoded `/`, `@` or `:` is hidden whole (an `@`
/// in the vhost or query then hides the host as well, which errs on the safe side).
///
/// ```
/// assert_eq!(
///     offload_common::redact_url("amqp://app:s3cret@rabbit:5672/%2f"),
///     "amqp://app:***@rabbit:5672/%2f"
/// );
/// assert_eq!(
///     offload_common::redact_url("amqp://app:pa/ss@a/%2f,amqps://app:x,y@b/%2f"),
///     "amqp://app:***@a/%2f,amqps://app:***@b/%2f"
/// );
/// ```
pub fn redact_url(list: &str) -> String {
    let mut out = String::with_capacity(list.len());
    let mut rest = list;
    for url in split_list(list) {
        // Keep the separators (commas, spaces) as they were.
        if let Some(at) = rest.find(url) {
            out.push_str(&rest[..at]);
            out.push_str(&redact_one(url));
            rest = &rest[at + url.len()..];
        }
    }
    out.push_str(rest);
    out
}

fn redact_one(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        // Not a URL we understand: it may be anything, including a bare password.
        return "<not an AMQP URL>".to_owned();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqps://u:p%40ss@h/vh"), "amqps://u:***@h/vh");
    }

    #[test]
    fn redacts_a_password_with_an_unencoded_slash() {
        assert_eq!(
            redact_url("amqp://app:pa/ss@host/%2f"),
            "amqp://app:***@host/%2f"
        );
    }

    #[test]
    fn leaves_urls_without_password_alone() {
        assert_eq!(redact_url("amqp://localhost"), "amqp://localhost");
        assert_eq!(redact_url("amqp://user@host/"), "amqp://user@host/");
    }

    #[test]
    fn hides_text_that_is_not_a_url() {
        assert_eq!(redact_url("s3cret"), "<not an AMQP URL>");
    }

    #[test]
    fn splits_lists_only_where_a_url_starts() {
        assert_eq!(
            split_list("amqp://a:p,q@h1/%2f, amqps://h2 ,amqp://h3"),
            vec!["amqp://a:p,q@h1/%2f", "amqps://h2", "amqp://h3"]
        );
        assert_eq!(split_list("  "), Vec::<&str>::new());
    }

    #[test]
    fn parses_every_url_of_a_list() {
        let endpoints =
            parse_list("amqp://u:p@h1:5672/%2f,amqps://u:p@h2:5671/%2f").expect("valid");
        assert_eq!(endpoints.len(), 2);
        assert!(!endpoints[0].is_tls());
        assert!(endpoints[1].is_tls());
        assert_eq!(endpoints[1].uri().authority.port, 5671);
        assert_eq!(endpoints[0].redacted(), "amqp://u:***@h1:5672/%2f");
    }

    #[test]
    fn a_parse_error_never_quotes_the_password() {
        let error = parse_list("amqp://u:p@h1/%2f,http://u:hunter2@h2/")
            .expect_err("http is not amqp")
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        let error = parse_list("amqp://u:hunter2@h1:notaport/%2f")
            .expect_err("bad port")
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
    }

    /// A password of almost anything; `PW` marks it so that the assertion cannot be fooled
    /// by the same text elsewhere in the URL. Not `,x://`, which would start another URL.
    fn password() -> impl Strategy<Value = String> {
        "PW[0-9A-Z/@:,?#%&=+!$'()*; ~-]{1,24}".prop_filter("no URL inside", |p| !p.contains("://"))
    }

    fn url() -> impl Strategy<Value = (String, String)> {
        (
            prop_oneof![Just("amqp"), Just("amqps")],
            "[a-z0-9_.-]{1,12}",
            password(),
            "[a-z0-9.-]{1,16}",
            proptest::option::of(1u16..),
            "(/[a-z0-9%._@-]{0,12})?",
            "(\\?[a-z_]{1,8}=[a-z0-9@]{1,6})?",
        )
            .prop_map(|(scheme, user, password, host, port, vhost, query)| {
                let port = port.map(|p| format!(":{p}")).unwrap_or_default();
                (
                    format!("{scheme}://{user}:{password}@{host}{port}{vhost}{query}"),
                    password,
                )
            })
    }

    proptest! {
        #[test]
        fn no_password_survives_redaction(urls in prop::collection::vec(url(), 1..4)) {
            let list = urls.iter().map(|(url, _)| url.as_str()).collect::<Vec<_>>().join(",");
            let redacted = redact_url(&list);
            for (_, password) in &urls {
                prop_assert!(!redacted.contains(password.as_str()), "{redacted}");
            }
            if let Err(error) = parse_list(&list) {
                let message = error.to_string();
                for (_, password) in &urls {
                    prop_assert!(!message.contains(password.as_str()), "{message}");
                }
            }
        }

        #[test]
        fn redaction_never_panics(text in "\\PC{0,80}") {
            let _ = redact_url(&text);
        }
    }
}
