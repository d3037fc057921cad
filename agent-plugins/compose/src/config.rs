//! Parsing of a compose target's `config` object.
//!
//! Parsing is strict: an unknown key is far more likely a typo of a real one (`helth_timeout_secs`)
//! than something safe to ignore, and silently ignoring it would deploy with settings the operator
//! did not intend. Errors name the key; they never echo a value, which may be a secret.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use stella_plugin_sdk::config::{env_vars, integer, invalid, object_or_null, seconds, unknown_key};
use stella_plugin_sdk::naming::path_segment;
use stella_plugin_sdk::{PluginError, TargetRef};

use crate::naming::{default_project, is_valid_project};

pub(crate) const DEFAULT_HEALTH_TIMEOUT_SECS: u64 = 60;
const MAX_HEALTH_TIMEOUT_SECS: u64 = 3600;
const MAX_HEALTHCHECK_INTERVAL_SECS: u64 = 3600;
const MAX_HEALTHCHECK_RETRIES: u64 = 100;

#[derive(Clone, PartialEq)]
pub(crate) struct TargetConfig {
    pub project: String,
    pub directory: PathBuf,
    pub health_timeout: Duration,
    /// Per component name. Components without an entry get none of these settings.
    pub services: BTreeMap<String, ServiceConfig>,
}

#[derive(Clone, Default, PartialEq)]
pub(crate) struct ServiceConfig {
    pub ports: Vec<String>,
    /// Values may be secrets: never log or echo them (the `Debug` impl redacts them).
    pub environment: BTreeMap<String, String>,
    pub command: Option<Vec<String>>,
    pub healthcheck: Option<HealthcheckConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HealthcheckConfig {
    pub test: Vec<String>,
    pub interval_secs: Option<u64>,
    pub retries: Option<u64>,
}

impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConfig")
            .field("project", &self.project)
            .field("directory", &self.directory)
            .field("health_timeout", &self.health_timeout)
            .field("services", &self.services)
            .finish()
    }
}

impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: environment values may be secrets and Debug output ends up in logs.
        let env_names: Vec<&String> = self.environment.keys().collect();
        f.debug_struct("ServiceConfig")
            .field("ports", &self.ports)
            .field("environment", &env_names)
            .field("command", &self.command)
            .field("healthcheck", &self.healthcheck)
            .finish()
    }
}

/// Parses `target.config`, filling defaults from the target name and the executor's state dir.
pub(crate) fn parse(target: &TargetRef, state_dir: &Path) -> Result<TargetConfig, PluginError> {
    let mut out = TargetConfig {
        project: default_project(&target.name),
        directory: state_dir.join("projects").join(path_segment(&target.name)),
        health_timeout: Duration::from_secs(DEFAULT_HEALTH_TIMEOUT_SECS),
        services: BTreeMap::new(),
    };
    let Some(map) = object_or_null(&target.config)? else {
        return Ok(out);
    };
    for (key, value) in map {
        match key.as_str() {
            "project" => {
                let name = value
                    .as_str()
                    .filter(|s| is_valid_project(s))
                    .ok_or_else(|| {
                        invalid(
                            "project: must be a string of lower-case letters, digits, '_' and '-' \
                             starting with a letter or digit (at most 63 characters)",
                        )
                    })?;
                out.project = name.to_string();
            }
            "directory" => {
                let dir = value
                    .as_str()
                    .map(Path::new)
                    .filter(|p| p.is_absolute())
                    .ok_or_else(|| invalid("directory: must be an absolute path"))?;
                out.directory = dir.to_path_buf();
            }
            "health_timeout_secs" => {
                out.health_timeout = seconds(key, value, MAX_HEALTH_TIMEOUT_SECS)?;
            }
            "services" => {
                let services = value.as_object().ok_or_else(|| {
                    invalid("services: must be an object keyed by component name")
                })?;
                for (component, settings) in services {
                    if component.is_empty() {
                        return Err(invalid("services: component names must not be empty"));
                    }
                    let key = format!("services.{component}");
                    out.services
                        .insert(component.clone(), parse_service(&key, settings)?);
                }
            }
            other => return Err(unknown_key(other)),
        }
    }
    Ok(out)
}

fn parse_service(key: &str, value: &Value) -> Result<ServiceConfig, PluginError> {
    let map = value
        .as_object()
        .ok_or_else(|| invalid(format!("{key}: must be an object")))?;
    let mut out = ServiceConfig::default();
    for (name, v) in map {
        let key = format!("{key}.{name}");
        match name.as_str() {
            "ports" => {
                out.ports = string_list(&key, v)?;
                for port in &out.ports {
                    if !is_port_spec(port) {
                        return Err(invalid(format!(
                            "{key}: {port:?} is not a port mapping like \"8080:80\", \
                             \"127.0.0.1:8080:80/tcp\" or \"80\""
                        )));
                    }
                }
            }
            "environment" => out.environment = env_vars(&key, v)?,
            "command" => {
                let command = string_list(&key, v)?;
                if command.is_empty() {
                    return Err(invalid(format!("{key}: must not be empty")));
                }
                out.command = Some(command);
            }
            "healthcheck" => out.healthcheck = Some(healthcheck(&key, v)?),
            other => return Err(invalid(format!("unknown key {key:?} ({other:?})"))),
        }
    }
    Ok(out)
}

fn string_list(key: &str, value: &Value) -> Result<Vec<String>, PluginError> {
    let items = value
        .as_array()
        .ok_or_else(|| invalid(format!("{key}: must be an array of strings")))?;
    items
        .iter()
        .map(|item| {
            item.as_str()
                .filter(|s| !s.contains('\0'))
                .map(str::to_string)
                .ok_or_else(|| invalid(format!("{key}: must be an array of strings without NUL")))
        })
        .collect()
}

fn healthcheck(key: &str, value: &Value) -> Result<HealthcheckConfig, PluginError> {
    let map = value
        .as_object()
        .ok_or_else(|| invalid(format!("{key}: must be an object")))?;
    let mut test = None;
    let mut interval_secs = None;
    let mut retries = None;
    for (name, v) in map {
        let key = format!("{key}.{name}");
        match name.as_str() {
            "test" => {
                let t = string_list(&key, v)?;
                // Compose reads a bare list as an exec form only when it is tagged; an untagged
                // list would be refused by compose after the lock file is already written.
                match t.first().map(String::as_str) {
                    Some("CMD") | Some("CMD-SHELL") if t.len() >= 2 => {}
                    Some("NONE") if t.len() == 1 => {}
                    _ => {
                        return Err(invalid(format!(
                            "{key}: must be [\"CMD\", program, args...], [\"CMD-SHELL\", command] \
                             or [\"NONE\"]"
                        )));
                    }
                }
                test = Some(t);
            }
            "interval_secs" => {
                interval_secs = Some(integer(&key, v, 1, MAX_HEALTHCHECK_INTERVAL_SECS)?);
            }
            "retries" => retries = Some(integer(&key, v, 1, MAX_HEALTHCHECK_RETRIES)?),
            other => return Err(invalid(format!("unknown key {key:?} ({other:?})"))),
        }
    }
    let test = test.ok_or_else(|| invalid(format!("{key}.test: is required")))?;
    Ok(HealthcheckConfig {
        test,
        interval_secs,
        retries,
    })
}

/// `[ip:][host[-range]:]container[-range][/proto]`, checked loosely: only the characters and the
/// protocol, enough to keep anything that is not a port spec out of the lock file.
fn is_port_spec(spec: &str) -> bool {
    let (addr, proto) = match spec.rsplit_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (spec, None),
    };
    let proto_ok = proto.is_none_or(|p| matches!(p, "tcp" | "udp" | "sctp"));
    let container_port = addr.rsplit(':').next().unwrap_or_default();
    proto_ok
        && !container_port.is_empty()
        && container_port
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'-')
        && addr
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'-' | b'[' | b']'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn target(config: Value) -> TargetRef {
        TargetRef {
            name: "prod-1".to_string(),
            kind: "compose".to_string(),
            config,
        }
    }

    fn ok(config: Value) -> TargetConfig {
        parse(&target(config), Path::new("/state")).unwrap()
    }

    fn err(config: Value) -> String {
        match parse(&target(config), Path::new("/state")) {
            Err(PluginError::InvalidConfig(m)) => m,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn null_and_empty_give_defaults() {
        for c in [json!(null), json!({})] {
            let cfg = ok(c);
            assert_eq!(cfg.project, "stella-prod-1");
            assert_eq!(cfg.directory, PathBuf::from("/state/projects/prod-1"));
            assert_eq!(cfg.health_timeout, Duration::from_secs(60));
            assert!(cfg.services.is_empty());
        }
    }

    #[test]
    fn full_config_parses() {
        let cfg = ok(json!({
            "project": "shop",
            "directory": "/srv/shop",
            "health_timeout_secs": 5,
            "services": {
                "web": {
                    "ports": ["8080:80", "127.0.0.1:9000-9001:9000-9001/udp", "[::1]:53:53"],
                    "environment": {"A": "1", "B": "two"},
                    "command": ["serve", "--port", "80"],
                    "healthcheck": {"test": ["CMD", "true"], "interval_secs": 2, "retries": 3}
                },
                "worker": {}
            }
        }));
        assert_eq!(cfg.project, "shop");
        assert_eq!(cfg.directory, PathBuf::from("/srv/shop"));
        assert_eq!(cfg.health_timeout, Duration::from_secs(5));
        let web = &cfg.services["web"];
        assert_eq!(web.ports.len(), 3);
        assert_eq!(web.environment["B"], "two");
        assert_eq!(web.command.as_deref().map(<[String]>::len), Some(3));
        let hc = web.healthcheck.as_ref().unwrap();
        assert_eq!(hc.test, vec!["CMD".to_string(), "true".to_string()]);
        assert_eq!((hc.interval_secs, hc.retries), (Some(2), Some(3)));
        assert_eq!(cfg.services["worker"], ServiceConfig::default());
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(json!({"helth": 1})).contains("helth"));
        assert!(err(json!({"project": "Has Caps"})).contains("project"));
        assert!(err(json!({"project": 1})).contains("project"));
        assert!(err(json!({"directory": "relative/dir"})).contains("directory"));
        assert!(err(json!({"health_timeout_secs": 0})).contains("health_timeout_secs"));
        assert!(err(json!({"health_timeout_secs": "5"})).contains("health_timeout_secs"));
        assert!(err(json!({"services": []})).contains("services"));
        assert!(err(json!({"services": {"web": 1}})).contains("services.web"));
        assert!(
            err(json!({"services": {"web": {"volumes": []}}})).contains("services.web.volumes")
        );
        assert!(err(json!({"services": {"web": {"ports": "80"}}})).contains("services.web.ports"));
        assert!(
            err(json!({"services": {"web": {"ports": ["eighty"]}}})).contains("services.web.ports")
        );
        assert!(err(json!({"services": {"web": {"ports": [80]}}})).contains("services.web.ports"));
        assert!(
            err(json!({"services": {"web": {"ports": ["80/icmp"]}}}))
                .contains("services.web.ports")
        );
        assert!(
            err(json!({"services": {"web": {"command": []}}})).contains("services.web.command")
        );
        assert!(
            err(json!({"services": {"web": {"command": "run"}}})).contains("services.web.command")
        );
        assert!(
            err(json!({"services": {"web": {"healthcheck": {}}}}))
                .contains("services.web.healthcheck.test")
        );
        assert!(
            err(json!({"services": {"web": {"healthcheck": {"test": ["curl", "x"]}}}}))
                .contains("services.web.healthcheck.test")
        );
        assert!(
            err(json!({"services": {"web": {"healthcheck": {"test": ["NONE"], "retries": 0}}}}))
                .contains("services.web.healthcheck.retries")
        );
        assert!(
            err(
                json!({"services": {"web": {"healthcheck": {"test": ["NONE"], "interval": "5s"}}}})
            )
            .contains("services.web.healthcheck.interval")
        );
        assert!(err(json!([1])).contains("object"));
    }

    #[test]
    fn environment_errors_never_echo_values() {
        let m = err(json!({"services": {"web": {"environment": {"TOKEN": 12345}}}}));
        assert!(m.contains("services.web.environment.TOKEN"), "{m}");
        assert!(!m.contains("12345"));
        assert!(
            err(json!({"services": {"web": {"environment": {"A=B": "x"}}}}))
                .contains("services.web.environment")
        );
    }

    #[test]
    fn debug_output_redacts_environment_values() {
        let cfg = ok(json!({"services": {"web": {"environment": {"TOKEN": "s3cr3t-value"}}}}));
        let shown = format!("{cfg:?}");
        assert!(shown.contains("TOKEN"), "{shown}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
    }
}
