//! Every way talking to a registry can fail, each naming the URL it concerns (never with
//! credentials in it) and never carrying a secret.

use reqwest::Url;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The client configuration is unusable (URL, transport policy, CA PEM).
    #[error("invalid registry configuration: {0}")]
    InvalidConfig(String),
    /// A repository name, tag or version rule given by the caller is malformed.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// No HTTP answer at all: DNS, connection, TLS handshake, timeout.
    #[error("registry unreachable at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// The registry or its token service refused the credentials (or their absence).
    #[error("unauthorized at {url}: {detail}")]
    Unauthorized { url: String, detail: String },
    #[error("repository {repository:?} not found at {url}")]
    RepositoryNotFound { repository: String, url: String },
    #[error("tag {tag:?} of repository {repository:?} not found at {url}")]
    TagNotFound {
        repository: String,
        tag: String,
        url: String,
    },
    /// The manifest's bytes do not hash to the digest the registry announced for them, or the
    /// digest is not a sha256 digest.
    #[error("bad digest at {url}: {detail}")]
    BadDigest { url: String, detail: String },
    /// An answer that does not follow the Distribution API (status, headers or body).
    #[error("bad response from {url}: {detail}")]
    BadResponse { url: String, detail: String },
}

/// `url` as errors and logs show it: without user info (the query is kept: pagination lives
/// there, and registries put no secrets in it).
pub(crate) fn display_url(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// The error chain of `e` in one line: reqwest's top-level message alone ("error sending
/// request") hides the cause an operator needs (refused, unknown CA, timed out).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        let url = Url::parse("https://alice:hunter2@r.example/v2/?n=2").unwrap();
        assert_eq!(display_url(&url), "https://r.example/v2/?n=2");
    }
}
