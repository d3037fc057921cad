//! Parsing of an ecs target's `config` object.
//!
//! Strict, as for the other executors: an unknown key is far more likely a typo of a real one
//! (`setle_timeout_secs`) than something safe to ignore, and every error names the key
//! (`credentials.access_key_id_env`). Parsing never reads the environment or any file:
//! credentials are resolved when an operation builds its client, so that keys rotated on the
//! agent host are picked up without a restart, and validation works on hosts without them.

use std::collections::BTreeMap;
use std::time::Duration;

use stella_plugin_sdk::PluginError;

pub const DEFAULT_REGION: &str = "us-east-1";
pub const DEFAULT_SETTLE_TIMEOUT_SECS: u64 = 600;
pub const DEFAULT_POLL_INTERVAL_SECS: u64 = 5;
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_API_TIMEOUT_SECS: u64 = 60;
const MAX_SETTLE_TIMEOUT_SECS: u64 = 86_400;
const MAX_POLL_INTERVAL_SECS: u64 = 300;
const MAX_CONNECT_TIMEOUT_SECS: u64 = 300;
const MAX_API_TIMEOUT_SECS: u64 = 900;

/// Where the AWS credentials come from, on the agent host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Credentials {
    /// The SDK's default chain: environment, shared config/credentials files, web identity,
    /// container and instance metadata.
    DefaultChain,
    /// A named profile of the agent host's AWS shared config files.
    Profile(String),
    /// Names of environment variables of the agent process holding the keys themselves.
    Env {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TargetConfig {
    pub cluster: String,
    pub service: String,
    pub region: String,
    pub endpoint_url: Option<String>,
    pub credentials: Credentials,
    /// Component name → container name in the task definition, where they differ.
    pub container_map: BTreeMap<String, String>,
    pub settle_timeout: Duration,
    pub poll_interval: Duration,
    pub connect_timeout: Duration,
    pub api_timeout: Duration,
}

impl TargetConfig {
    /// The task definition container a component is deployed into.
    pub(crate) fn container_for<'a>(&'a self, component: &'a str) -> &'a str {
        self.container_map
            .get(component)
            .map(String::as_str)
            .unwrap_or(component)
    }

    /// `service` in `cluster` (region), for messages.
    pub(crate) fn describe(&self) -> String {
        format!(
            "service {} in cluster {} ({})",
            self.service, self.cluster, self.region
        )
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

/// Cluster and service accept a name or a full ARN, as the ECS API does.
fn ecs_name<'a>(key: &str, value: &'a serde_json::Value) -> Result<&'a str, PluginError> {
    let s = string(key, value)?;
    if s.chars().any(char::is_whitespace) || s.len() > 2048 {
        return Err(invalid(format!(
            "{key}: must be an ECS name or ARN (no whitespace)"
        )));
    }
    Ok(s)
}

fn seconds(key: &str, value: &serde_json::Value, max: u64) -> Result<Duration, PluginError> {
    value
        .as_u64()
        .filter(|s| (1..=max).contains(s))
        .map(Duration::from_secs)
        .ok_or_else(|| invalid(format!("{key}: must be an integer between 1 and {max}")))
}

fn env_name(key: &str, value: &serde_json::Value) -> Result<String, PluginError> {
    let name = string(key, value)?;
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(invalid(format!(
            "{key}: must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
        )));
    }
    Ok(name.to_string())
}

fn region(value: &serde_json::Value) -> Result<String, PluginError> {
    const KEY: &str = "region";
    let s = string(KEY, value)?;
    let ok = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.contains('-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if !ok {
        return Err(invalid(format!(
            "{KEY}: {s:?} is not an AWS region name (e.g. \"eu-west-1\")"
        )));
    }
    Ok(s.to_string())
}

fn endpoint_url(value: &serde_json::Value) -> Result<String, PluginError> {
    const KEY: &str = "endpoint_url";
    let s = string(KEY, value)?;
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| invalid(format!("{KEY}: must start with https:// or http://")))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(invalid(format!("{KEY}: must name a host")));
    }
    // The URL is shown in messages and logs; credentials have no place in it.
    if authority.contains('@') {
        return Err(invalid(format!(
            "{KEY}: must not contain user information (credentials come from \"credentials\")"
        )));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(invalid(format!("{KEY}: must not contain whitespace")));
    }
    Ok(s.trim_end_matches('/').to_string())
}

fn credentials(value: &serde_json::Value) -> Result<Credentials, PluginError> {
    let map = value.as_object().ok_or_else(|| {
        invalid(
            "credentials: must be an object with \"profile\", or \"access_key_id_env\" and \
             \"secret_access_key_env\" (or {} for the default chain)",
        )
    })?;
    let mut profile = None;
    let mut akid = None;
    let mut secret = None;
    let mut token = None;
    for (key, value) in map {
        let full = format!("credentials.{key}");
        match key.as_str() {
            "profile" => {
                let p = string(&full, value)?;
                if p.chars().any(char::is_whitespace) {
                    return Err(invalid(format!("{full}: must not contain whitespace")));
                }
                profile = Some(p.to_string());
            }
            "access_key_id_env" => akid = Some(env_name(&full, value)?),
            "secret_access_key_env" => secret = Some(env_name(&full, value)?),
            "session_token_env" => token = Some(env_name(&full, value)?),
            other => return Err(invalid(format!("unknown key \"credentials.{other}\""))),
        }
    }
    match (profile, akid, secret, token) {
        (None, None, None, None) => Ok(Credentials::DefaultChain),
        (Some(p), None, None, None) => Ok(Credentials::Profile(p)),
        (Some(_), _, _, _) => Err(invalid(
            "credentials.profile: set either a profile or the *_env keys, not both",
        )),
        (None, Some(access_key_id), Some(secret_access_key), session_token) => {
            Ok(Credentials::Env {
                access_key_id,
                secret_access_key,
                session_token,
            })
        }
        (None, None, _, _) => Err(invalid(
            "credentials.access_key_id_env: required with secret_access_key_env/session_token_env",
        )),
        (None, Some(_), None, _) => Err(invalid(
            "credentials.secret_access_key_env: required with access_key_id_env",
        )),
    }
}

fn container_map(value: &serde_json::Value) -> Result<BTreeMap<String, String>, PluginError> {
    const KEY: &str = "container_map";
    let map = value.as_object().ok_or_else(|| {
        invalid(format!(
            "{KEY}: must be an object of component name → container name"
        ))
    })?;
    let mut out = BTreeMap::new();
    let mut containers: BTreeMap<&str, &str> = BTreeMap::new();
    for (component, container) in map {
        if component.is_empty() {
            return Err(invalid(format!("{KEY}: component names must not be empty")));
        }
        let container = string(&format!("{KEY}.{component}"), container)?;
        // Two components in one container would overwrite each other's image.
        if let Some(other) = containers.insert(container, component) {
            return Err(invalid(format!(
                "{KEY}: components {other:?} and {component:?} both map to container {container:?}"
            )));
        }
        out.insert(component.clone(), container.to_string());
    }
    Ok(out)
}

pub(crate) fn parse(config: &serde_json::Value) -> Result<TargetConfig, PluginError> {
    let map = config
        .as_object()
        .ok_or_else(|| invalid("target config must be a JSON object"))?;

    let mut cluster = None;
    let mut service = None;
    let mut region_name = DEFAULT_REGION.to_string();
    let mut endpoint = None;
    let mut creds = Credentials::DefaultChain;
    let mut containers = BTreeMap::new();
    let mut settle_timeout = Duration::from_secs(DEFAULT_SETTLE_TIMEOUT_SECS);
    let mut poll_interval = Duration::from_secs(DEFAULT_POLL_INTERVAL_SECS);
    let mut connect_timeout = Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_SECS);
    let mut api_timeout = Duration::from_secs(DEFAULT_API_TIMEOUT_SECS);

    for (key, value) in map {
        match key.as_str() {
            "cluster" => cluster = Some(ecs_name(key, value)?.to_string()),
            "service" => service = Some(ecs_name(key, value)?.to_string()),
            "region" => region_name = region(value)?,
            "endpoint_url" => endpoint = Some(endpoint_url(value)?),
            "credentials" => creds = credentials(value)?,
            "container_map" => containers = container_map(value)?,
            "settle_timeout_secs" => {
                settle_timeout = seconds(key, value, MAX_SETTLE_TIMEOUT_SECS)?;
            }
            "poll_interval_secs" => poll_interval = seconds(key, value, MAX_POLL_INTERVAL_SECS)?,
            "connect_timeout_secs" => {
                connect_timeout = seconds(key, value, MAX_CONNECT_TIMEOUT_SECS)?;
            }
            "api_timeout_secs" => api_timeout = seconds(key, value, MAX_API_TIMEOUT_SECS)?,
            other => return Err(invalid(format!("unknown key {other:?}"))),
        }
    }

    let cluster = cluster.ok_or_else(|| invalid("cluster: required"))?;
    let service = service.ok_or_else(|| invalid("service: required"))?;
    if poll_interval > settle_timeout {
        return Err(invalid(
            "poll_interval_secs: must not be longer than settle_timeout_secs",
        ));
    }
    Ok(TargetConfig {
        cluster,
        service,
        region: region_name,
        endpoint_url: endpoint,
        credentials: creds,
        container_map: containers,
        settle_timeout,
        poll_interval,
        connect_timeout,
        api_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn base() -> Value {
        json!({"cluster": "prod", "service": "web"})
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
        assert_eq!(c.cluster, "prod");
        assert_eq!(c.service, "web");
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.endpoint_url, None);
        assert_eq!(c.credentials, Credentials::DefaultChain);
        assert!(c.container_map.is_empty());
        assert_eq!(c.container_for("api"), "api");
        assert_eq!(c.settle_timeout, Duration::from_secs(600));
        assert_eq!(c.poll_interval, Duration::from_secs(5));
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.api_timeout, Duration::from_secs(60));
        assert_eq!(c.describe(), "service web in cluster prod (us-east-1)");
    }

    #[test]
    fn full_config_parses() {
        let c = parse(&with(json!({
            "cluster": "arn:aws:ecs:eu-west-1:123456789012:cluster/prod",
            "region": "eu-west-1",
            "endpoint_url": "https://ecs.eu-west-1.amazonaws.com/",
            "credentials": {
                "access_key_id_env": "ECS_KEY_ID",
                "secret_access_key_env": "ECS_SECRET",
                "session_token_env": "ECS_TOKEN",
            },
            "container_map": {"api": "app", "worker": "jobs"},
            "settle_timeout_secs": 120,
            "poll_interval_secs": 2,
            "connect_timeout_secs": 3,
            "api_timeout_secs": 20,
        })))
        .unwrap();
        assert_eq!(c.region, "eu-west-1");
        assert_eq!(
            c.endpoint_url.as_deref(),
            Some("https://ecs.eu-west-1.amazonaws.com")
        );
        assert_eq!(
            c.credentials,
            Credentials::Env {
                access_key_id: "ECS_KEY_ID".to_string(),
                secret_access_key: "ECS_SECRET".to_string(),
                session_token: Some("ECS_TOKEN".to_string()),
            }
        );
        assert_eq!(c.container_for("api"), "app");
        assert_eq!(c.container_for("web"), "web");
        assert_eq!(c.settle_timeout, Duration::from_secs(120));
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.api_timeout, Duration::from_secs(20));

        let p = parse(&with(json!({"credentials": {"profile": "deploy"}}))).unwrap();
        assert_eq!(p.credentials, Credentials::Profile("deploy".to_string()));
        let d = parse(&with(json!({"credentials": {}}))).unwrap();
        assert_eq!(d.credentials, Credentials::DefaultChain);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (json!({"clsuter": "x"}), "clsuter"),
            (json!({"cluster": null}), "cluster"),
            (json!({"cluster": ""}), "cluster"),
            (json!({"cluster": 5}), "cluster"),
            (json!({"service": null}), "service"),
            (json!({"service": "a b"}), "service"),
            (json!({"region": "US East"}), "region"),
            (json!({"region": 1}), "region"),
            (json!({"endpoint_url": "ecs.local:4566"}), "endpoint_url"),
            (json!({"endpoint_url": "http://"}), "endpoint_url"),
            (
                json!({"endpoint_url": "http://user:pw@localhost"}),
                "endpoint_url",
            ),
            (json!({"credentials": "default"}), "credentials"),
            (
                json!({"credentials": {"profle": "x"}}),
                "credentials.profle",
            ),
            (
                json!({"credentials": {"profile": ""}}),
                "credentials.profile",
            ),
            (
                json!({"credentials": {"profile": "x", "access_key_id_env": "A", "secret_access_key_env": "B"}}),
                "credentials.profile",
            ),
            (
                json!({"credentials": {"access_key_id_env": "A"}}),
                "credentials.secret_access_key_env",
            ),
            (
                json!({"credentials": {"secret_access_key_env": "B"}}),
                "credentials.access_key_id_env",
            ),
            (
                json!({"credentials": {"access_key_id_env": "1A", "secret_access_key_env": "B"}}),
                "credentials.access_key_id_env",
            ),
            (
                json!({"credentials": {"access_key_id_env": "A", "secret_access_key_env": "B", "session_token_env": "C-D"}}),
                "credentials.session_token_env",
            ),
            (json!({"container_map": ["a"]}), "container_map"),
            (json!({"container_map": {"api": 1}}), "container_map.api"),
            (
                json!({"container_map": {"api": "app", "web": "app"}}),
                "container_map",
            ),
            (json!({"settle_timeout_secs": 0}), "settle_timeout_secs"),
            (json!({"settle_timeout_secs": "60"}), "settle_timeout_secs"),
            (json!({"poll_interval_secs": 301}), "poll_interval_secs"),
            (
                json!({"poll_interval_secs": 10, "settle_timeout_secs": 5}),
                "poll_interval_secs",
            ),
            (json!({"connect_timeout_secs": -1}), "connect_timeout_secs"),
            (json!({"api_timeout_secs": 1.5}), "api_timeout_secs"),
        ];
        for (changes, key) in cases {
            let m = err(with(changes.clone()));
            assert!(m.contains(key), "{changes}: {m:?} does not name {key}");
        }
        assert!(err(json!(null)).contains("object"));
        assert!(err(json!([1])).contains("object"));
    }
}
