//! What a client needs to know about one registry, checked before any request is made.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use reqwest::Url;

use crate::RegistryError;

/// The default per-request timeout (connect, headers and body of one request).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The default page size asked for when listing tags. Registries may return fewer per page
/// (and some, like distribution 2.8, ignore it and return everything at once).
pub const DEFAULT_TAGS_PAGE_SIZE: u32 = 100;

/// How to authenticate to the registry (and to its token service).
/// Deliberately not `PartialEq`: secrets are never compared here (and if they were, it would
/// have to be in constant time).
#[derive(Clone, Default)]
pub enum Credentials {
    /// No credentials; anonymous bearer tokens are still fetched when the registry asks.
    #[default]
    Anonymous,
    /// Sent when the registry asks for Basic auth, and to the token service of a Bearer
    /// challenge.
    Basic { username: String, password: String },
    /// A ready-made bearer token, sent with every request; no token service is asked.
    Bearer { token: String },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Self::Bearer { .. } => f
                .debug_struct("Bearer")
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

/// One registry: where it is, how to authenticate, what to trust.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// `https://registry.example.com` or `http://127.0.0.1:5000`: scheme, host and port only.
    pub base_url: String,
    pub credentials: Credentials,
    /// PEM certificates trusted in addition to the host's trust store (a private registry CA).
    pub extra_ca_pem: Option<String>,
    /// Plain http to a non-loopback host. Off by default: credentials and tokens would cross
    /// the network in clear text, and anyone on the path could answer with other digests.
    pub allow_insecure_http: bool,
    pub timeout: Duration,
    pub tags_page_size: u32,
}

impl RegistryConfig {
    /// Anonymous access to `base_url` with the defaults.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            credentials: Credentials::Anonymous,
            extra_ca_pem: None,
            allow_insecure_http: false,
            timeout: DEFAULT_TIMEOUT,
            tags_page_size: DEFAULT_TAGS_PAGE_SIZE,
        }
    }

    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    pub fn with_extra_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.extra_ca_pem = Some(pem.into());
        self
    }
}

fn invalid(message: impl Into<String>) -> RegistryError {
    RegistryError::InvalidConfig(message.into())
}

/// The registry root (`scheme://host[:port]/`), refusing anything that is not just that.
pub(crate) fn parse_base_url(text: &str, allow_insecure_http: bool) -> Result<Url, RegistryError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(invalid("registry URL is empty"));
    }
    let url = Url::parse(trimmed).map_err(|e| {
        invalid(format!(
            "registry URL {trimmed:?} is not a URL ({e}); write it as https://HOST[:PORT]"
        ))
    })?;
    check_transport(&url, allow_insecure_http, "registry URL")?;
    if !url.username().is_empty() || url.password().is_some() {
        // Not echoed: the text holds a secret.
        return Err(invalid(
            "registry URL must not carry credentials; pass them as Credentials",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(format!(
            "registry URL {url} must not have a query or fragment"
        )));
    }
    if !matches!(url.path(), "" | "/") {
        return Err(invalid(format!(
            "registry URL {url} must not have a path: the API lives at /v2/ of the host"
        )));
    }
    Ok(url)
}

/// Plain http only to loopback hosts, unless explicitly allowed; https always.
pub(crate) fn check_transport(
    url: &Url,
    allow_insecure_http: bool,
    what: &str,
) -> Result<(), RegistryError> {
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http || is_loopback(url) => {}
        "http" => {
            return Err(invalid(format!(
                "{what} {} uses plain http to a host that is not loopback; use https \
                 (or allow insecure http explicitly)",
                crate::error::display_url(url)
            )));
        }
        other => {
            return Err(invalid(format!(
                "{what} {} has scheme {other:?}; only https and http are supported",
                crate::error::display_url(url)
            )));
        }
    }
    if url.host().is_none() {
        return Err(invalid(format!("{what} has no host")));
    }
    Ok(())
}

fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match parse_base_url(text, false) {
            Err(RegistryError::InvalidConfig(m)) => m,
            other => panic!("expected InvalidConfig for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn https_anywhere_and_http_only_on_loopback() {
        assert_eq!(
            parse_base_url("https://registry.example.com", false)
                .unwrap()
                .as_str(),
            "https://registry.example.com/"
        );
        for ok in [
            "http://127.0.0.1:5000",
            "http://127.8.9.10:5000/",
            "http://[::1]:5000",
            "http://localhost:5000",
        ] {
            assert!(parse_base_url(ok, false).is_ok(), "{ok}");
        }
        assert!(err("http://10.0.0.5:5000").contains("not loopback"));
        assert!(err("http://registry.example.com").contains("not loopback"));
        assert!(parse_base_url("http://10.0.0.5:5000", true).is_ok());
    }

    #[test]
    fn anything_but_a_root_url_is_refused() {
        assert!(err("").contains("empty"));
        assert!(err("registry.example.com:5000").contains("scheme"));
        assert!(err("ftp://registry.example.com").contains("scheme"));
        assert!(err("https://registry.example.com/v2/").contains("path"));
        assert!(err("https://registry.example.com/?a=b").contains("query"));
        let m = err("https://alice:hunter2@registry.example.com");
        assert!(m.contains("credentials") && !m.contains("hunter2"), "{m}");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let basic = Credentials::Basic {
            username: "alice".to_string(),
            password: "hunter2".to_string(),
        };
        let bearer = Credentials::Bearer {
            token: "tok-3141".to_string(),
        };
        let config = RegistryConfig::new("https://r.example").with_credentials(basic.clone());
        let shown = format!("{basic:?} {bearer:?} {config:?}");
        assert!(shown.contains("alice"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok-3141"),
            "{shown}"
        );
    }
}
