//! Parsing of a nomad target's `config` object.
//!
//! Strict, as for the other executors: an unknown key is far more likely a typo of a real one
//! (`deploy_timout_secs`) than something safe to ignore, and every error names the key. Parsing
//! never reads files or the environment: the ACL token, TLS material and a template file are
//! loaded by each operation, so that a token rotated on the agent host is picked up without a
//! restart and an agent starts even while a file is missing.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use stella_plugin_sdk::PluginError;

use crate::template::{self, Template};

pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_DEPLOY_TIMEOUT_SECS: u64 = 600;
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;
const MAX_DEPLOY_TIMEOUT_SECS: u64 = 86_400;
const MAX_REQUEST_TIMEOUT_SECS: u64 = 300;
/// Nomad's limit on variable paths (`^[a-zA-Z0-9-_~/]{1,128}$`).
const MAX_VARIABLE_PATH: usize = 128;

/// Where the ACL token comes from, on the agent host.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TokenSource {
    /// No ACLs on the cluster (or anonymous access is enough).
    None,
    /// Name of an environment variable of the agent process holding the token.
    Env(String),
    File(PathBuf),
}

impl TokenSource {
    /// Where the token came from, for error messages (never the token itself).
    pub(crate) fn describe(&self) -> String {
        match self {
            TokenSource::None => "no ACL token configured (token_env/token_file)".to_string(),
            TokenSource::Env(name) => format!("the ACL token from token_env {name}"),
            TokenSource::File(path) => {
                format!("the ACL token from token_file {}", path.display())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TlsFiles {
    pub ca_file: PathBuf,
    /// Client certificate and key, both or neither (mTLS).
    pub client: Option<(PathBuf, PathBuf)>,
    /// Name the server certificate must carry when it differs from the address' host
    /// (Nomad's own certificates name `server.<region>.nomad`).
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TemplateSource {
    Inline(Template),
    /// Read and checked at each deploy.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TargetConfig {
    /// Base URL, no path.
    pub address: Url,
    pub job_id: String,
    pub namespace: String,
    pub region: Option<String>,
    pub token: TokenSource,
    pub tls: Option<TlsFiles>,
    pub template: TemplateSource,
    pub deploy_timeout: Duration,
    pub request_timeout: Duration,
    pub auto_promote: bool,
    pub sticker_path: String,
}

impl TargetConfig {
    /// `http(s)://host:port`, for messages.
    pub(crate) fn address_text(&self) -> String {
        self.address.as_str().trim_end_matches('/').to_string()
    }
}

fn invalid(msg: impl Into<String>) -> PluginError {
    PluginError::InvalidConfig(msg.into())
}

fn string<'a>(key: &str, value: &'a serde_json::Value) -> Result<&'a str, PluginError> {
    let s = value
        .as_str()
        .ok_or_else(|| invalid(format!("{key}: must be a string")))?;
    if s.trim().is_empty() {
        return Err(invalid(format!("{key}: must not be empty")));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{key}: must not contain control characters"
        )));
    }
    Ok(s)
}

/// A single token: no whitespace (it would end up in URL paths and query strings).
fn token<'a>(key: &str, value: &'a serde_json::Value) -> Result<&'a str, PluginError> {
    let s = string(key, value)?;
    if s.chars().any(char::is_whitespace) {
        return Err(invalid(format!("{key}: must not contain whitespace")));
    }
    Ok(s)
}

fn absolute_path(key: &str, value: &serde_json::Value) -> Result<PathBuf, PluginError> {
    let s = string(key, value)?;
    if !s.starts_with('/') {
        return Err(invalid(format!(
            "{key}: must be an absolute path on the agent host"
        )));
    }
    Ok(PathBuf::from(s))
}

fn seconds(key: &str, value: &serde_json::Value, max: u64) -> Result<Duration, PluginError> {
    value
        .as_u64()
        .filter(|s| (1..=max).contains(s))
        .map(Duration::from_secs)
        .ok_or_else(|| invalid(format!("{key}: must be an integer between 1 and {max}")))
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_variable_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '~' | '/')
}

fn address(value: &serde_json::Value) -> Result<Url, PluginError> {
    const KEY: &str = "address";
    let s = token(KEY, value)?;
    let url = Url::parse(s).map_err(|e| {
        invalid(format!(
            "{KEY}: not a URL ({e}); expected http(s)://host:4646"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "{KEY}: scheme must be http or https, not {:?}",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!("{KEY}: must name a host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(format!(
            "{KEY}: must not carry credentials (use token_env or token_file)"
        )));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(format!(
            "{KEY}: must be scheme://host:port only, without path, query or fragment"
        )));
    }
    Ok(url)
}

fn job_id(value: &serde_json::Value) -> Result<String, PluginError> {
    const KEY: &str = "job_id";
    let s = token(KEY, value)?;
    // Nomad reserves "/" for dispatched and periodic children; in a URL path it would also
    // name another endpoint.
    if s.contains('/') {
        return Err(invalid(format!("{KEY}: must not contain \"/\"")));
    }
    Ok(s.to_string())
}

fn sticker_path(value: &serde_json::Value) -> Result<String, PluginError> {
    const KEY: &str = "sticker_variable_path";
    let s = string(KEY, value)?;
    check_variable_path(s).map_err(|m| invalid(format!("{KEY}: {m}")))?;
    Ok(s.to_string())
}

fn check_variable_path(path: &str) -> Result<(), String> {
    if path.len() > MAX_VARIABLE_PATH || !path.chars().all(is_variable_path_char) {
        return Err(format!(
            "Nomad variable paths are 1 to {MAX_VARIABLE_PATH} characters of [a-zA-Z0-9-_~/]"
        ));
    }
    if path.starts_with('/') || path.ends_with('/') || path.contains("//") {
        return Err("must not start or end with \"/\" or contain empty segments".to_string());
    }
    // Paths under nomad/ are Nomad's own (workload identities read nomad/jobs/...).
    if path == "nomad" || path.starts_with("nomad/") {
        return Err("paths under \"nomad/\" are reserved by Nomad".to_string());
    }
    Ok(())
}

pub(crate) fn parse(config: &serde_json::Value) -> Result<TargetConfig, PluginError> {
    let map = config
        .as_object()
        .ok_or_else(|| invalid("target config must be a JSON object"))?;

    let mut address_value = None;
    let mut job = None;
    let mut namespace = DEFAULT_NAMESPACE.to_string();
    let mut region = None;
    let mut token_env = None;
    let mut token_file = None;
    let mut ca_file = None;
    let mut client_cert_file = None;
    let mut client_key_file = None;
    let mut tls_server_name = None;
    let mut template_inline = None;
    let mut template_file = None;
    let mut deploy_timeout = Duration::from_secs(DEFAULT_DEPLOY_TIMEOUT_SECS);
    let mut request_timeout = Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECS);
    let mut auto_promote = true;
    let mut sticker = None;

    for (key, value) in map {
        match key.as_str() {
            "address" => address_value = Some(address(value)?),
            "job_id" => job = Some(job_id(value)?),
            "namespace" => namespace = token(key, value)?.to_string(),
            "region" => region = Some(token(key, value)?.to_string()),
            "token_env" => {
                let name = string(key, value)?;
                if !is_env_name(name) {
                    return Err(invalid(
                        "token_env: must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                    ));
                }
                token_env = Some(name.to_string());
            }
            "token_file" => token_file = Some(absolute_path(key, value)?),
            "ca_file" => ca_file = Some(absolute_path(key, value)?),
            "client_cert_file" => client_cert_file = Some(absolute_path(key, value)?),
            "client_key_file" => client_key_file = Some(absolute_path(key, value)?),
            "tls_server_name" => tls_server_name = Some(token(key, value)?.to_string()),
            "job_template" => template_inline = Some(value),
            "job_template_file" => template_file = Some(absolute_path(key, value)?),
            "deploy_timeout_secs" => {
                deploy_timeout = seconds(key, value, MAX_DEPLOY_TIMEOUT_SECS)?;
            }
            "request_timeout_secs" => {
                request_timeout = seconds(key, value, MAX_REQUEST_TIMEOUT_SECS)?;
            }
            "auto_promote" => {
                auto_promote = value
                    .as_bool()
                    .ok_or_else(|| invalid("auto_promote: must be true or false"))?;
            }
            "sticker_variable_path" => sticker = Some(sticker_path(value)?),
            other => return Err(invalid(format!("unknown key {other:?}"))),
        }
    }

    let address =
        address_value.ok_or_else(|| invalid("address: required (http(s)://host:4646)"))?;
    let job_id = job.ok_or_else(|| invalid("job_id: required"))?;

    let token = match (token_env, token_file) {
        (Some(_), Some(_)) => return Err(invalid("token_env, token_file: set only one of them")),
        (Some(name), None) => TokenSource::Env(name),
        (None, Some(path)) => TokenSource::File(path),
        (None, None) => TokenSource::None,
    };

    let https = address.scheme() == "https";
    let client = match (client_cert_file, client_key_file) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => return Err(invalid("client_key_file: required with client_cert_file")),
        (None, Some(_)) => return Err(invalid("client_cert_file: required with client_key_file")),
    };
    let tls = if https {
        let ca_file = ca_file.ok_or_else(|| {
            invalid(
                "ca_file: required for an https address (the CA certificate that signed the \
                 Nomad servers' certificates)",
            )
        })?;
        Some(TlsFiles {
            ca_file,
            client,
            server_name: tls_server_name,
        })
    } else {
        let stray = [
            ("ca_file", ca_file.is_some()),
            ("client_cert_file", client.is_some()),
            ("tls_server_name", tls_server_name.is_some()),
        ];
        if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
            return Err(invalid(format!(
                "{key}: only used with an https address (address is http)"
            )));
        }
        None
    };

    let template = match (template_inline, template_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "job_template, job_template_file: set only one of them",
            ));
        }
        (Some(value), None) => TemplateSource::Inline(template::parse(
            "job_template",
            value,
            &job_id,
            &namespace,
            region.as_deref(),
        )?),
        (None, Some(path)) => TemplateSource::File(path),
        (None, None) => {
            return Err(invalid(
                "job_template: required (a Nomad JSON job spec) unless job_template_file names one",
            ));
        }
    };

    let sticker_path = match sticker {
        Some(path) => path,
        None => {
            let path = format!("stella/{job_id}/sticker");
            check_variable_path(&path).map_err(|m| {
                invalid(format!(
                    "job_id: the default sticker variable path {path:?} is not valid ({m}); \
                     set sticker_variable_path"
                ))
            })?;
            path
        }
    };

    Ok(TargetConfig {
        address,
        job_id,
        namespace,
        region,
        token,
        tls,
        template,
        deploy_timeout,
        request_timeout,
        auto_promote,
        sticker_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn base() -> Value {
        json!({
            "address": "http://127.0.0.1:4646",
            "job_id": "web",
            "job_template": {
                "TaskGroups": [{"Name": "web", "Tasks": [{"Name": "app", "Driver": "docker", "Config": {"image": "demo/app:1"}}]}]
            },
        })
    }

    fn with(changes: Value) -> Value {
        let mut v = base();
        for (k, val) in changes.as_object().unwrap() {
            if val.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = val.clone();
            }
        }
        v
    }

    fn err(v: Value) -> String {
        match parse(&v) {
            Err(PluginError::InvalidConfig(m)) => m,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.address_text(), "http://127.0.0.1:4646");
        assert_eq!(c.job_id, "web");
        assert_eq!(c.namespace, "default");
        assert_eq!(c.region, None);
        assert_eq!(c.token, TokenSource::None);
        assert_eq!(c.tls, None);
        assert!(matches!(c.template, TemplateSource::Inline(_)));
        assert_eq!(c.deploy_timeout, Duration::from_secs(600));
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert!(c.auto_promote);
        assert_eq!(c.sticker_path, "stella/web/sticker");
    }

    #[test]
    fn full_config_parses() {
        let c = parse(&with(json!({
            "address": "https://nomad.example:4646",
            "namespace": "apps",
            "region": "eu",
            "token_env": "NOMAD_TOKEN",
            "ca_file": "/etc/nomad/ca.pem",
            "client_cert_file": "/etc/nomad/cli.pem",
            "client_key_file": "/etc/nomad/cli-key.pem",
            "tls_server_name": "server.eu.nomad",
            "job_template": null,
            "job_template_file": "/etc/stella/web.nomad.json",
            "deploy_timeout_secs": 120,
            "request_timeout_secs": 5,
            "auto_promote": false,
            "sticker_variable_path": "stella/sticker-web",
        })))
        .unwrap();
        assert_eq!(c.namespace, "apps");
        assert_eq!(c.region.as_deref(), Some("eu"));
        assert_eq!(c.token, TokenSource::Env("NOMAD_TOKEN".to_string()));
        let tls = c.tls.unwrap();
        assert_eq!(tls.ca_file, PathBuf::from("/etc/nomad/ca.pem"));
        assert_eq!(
            tls.client,
            Some((
                PathBuf::from("/etc/nomad/cli.pem"),
                PathBuf::from("/etc/nomad/cli-key.pem")
            ))
        );
        assert_eq!(tls.server_name.as_deref(), Some("server.eu.nomad"));
        assert_eq!(
            c.template,
            TemplateSource::File(PathBuf::from("/etc/stella/web.nomad.json"))
        );
        assert_eq!(c.deploy_timeout, Duration::from_secs(120));
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        assert!(!c.auto_promote);
        assert_eq!(c.sticker_path, "stella/sticker-web");

        let f = parse(&with(json!({"token_file": "/etc/stella/nomad-token"}))).unwrap();
        assert_eq!(
            f.token,
            TokenSource::File(PathBuf::from("/etc/stella/nomad-token"))
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (json!({"adress": "x"}), "adress"),
            (json!({"address": null}), "address"),
            (json!({"address": ""}), "address"),
            (json!({"address": "127.0.0.1:4646"}), "address"),
            (json!({"address": "ftp://nomad:4646"}), "address"),
            (json!({"address": "http://u:p@nomad:4646"}), "address"),
            (json!({"address": "http://nomad:4646/v1"}), "address"),
            (json!({"address": 4646}), "address"),
            (json!({"job_id": null}), "job_id"),
            (json!({"job_id": "a b"}), "job_id"),
            (json!({"job_id": "a/b"}), "job_id"),
            (json!({"job_id": "web.api"}), "job_id"),
            (json!({"namespace": ""}), "namespace"),
            (json!({"namespace": 1}), "namespace"),
            (json!({"region": "a b"}), "region"),
            (json!({"token_env": "1BAD"}), "token_env"),
            (json!({"token_file": "token"}), "token_file"),
            (
                json!({"token_env": "T", "token_file": "/t"}),
                "token_env, token_file",
            ),
            (json!({"address": "https://nomad:4646"}), "ca_file"),
            (json!({"ca_file": "/ca.pem"}), "ca_file"),
            (
                json!({"tls_server_name": "server.global.nomad"}),
                "tls_server_name",
            ),
            (
                json!({"address": "https://n:4646", "ca_file": "ca.pem"}),
                "ca_file",
            ),
            (
                json!({"address": "https://n:4646", "ca_file": "/ca.pem", "client_cert_file": "/c.pem"}),
                "client_key_file",
            ),
            (
                json!({"address": "https://n:4646", "ca_file": "/ca.pem", "client_key_file": "/k.pem"}),
                "client_cert_file",
            ),
            (json!({"job_template": null}), "job_template"),
            (json!({"job_template": "job \"web\" {}"}), "job_template"),
            (
                json!({"job_template_file": "/t.json"}),
                "job_template, job_template_file",
            ),
            (
                json!({"job_template": null, "job_template_file": "t.json"}),
                "job_template_file",
            ),
            (json!({"deploy_timeout_secs": 0}), "deploy_timeout_secs"),
            (json!({"deploy_timeout_secs": "60"}), "deploy_timeout_secs"),
            (json!({"request_timeout_secs": 301}), "request_timeout_secs"),
            (json!({"auto_promote": "yes"}), "auto_promote"),
            (
                json!({"sticker_variable_path": "a.b"}),
                "sticker_variable_path",
            ),
            (
                json!({"sticker_variable_path": "nomad/jobs/web"}),
                "sticker_variable_path",
            ),
            (
                json!({"sticker_variable_path": "/a"}),
                "sticker_variable_path",
            ),
        ];
        for (changes, key) in cases {
            let m = err(with(changes.clone()));
            assert!(m.contains(key), "{changes}: {m:?} does not name {key}");
        }
        assert!(err(json!([])).contains("JSON object"));
    }

    #[test]
    fn dotted_job_ids_work_with_an_explicit_sticker_path() {
        let c = parse(&with(
            json!({"job_id": "web.api", "sticker_variable_path": "stella/web-api/sticker"}),
        ))
        .unwrap();
        assert_eq!(c.job_id, "web.api");
    }
}
