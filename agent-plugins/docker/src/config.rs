//! Parsing of a docker target's `config` object.
//!
//! Parsing is strict: an unknown key is far more likely a typo of a real one (`helth_timeout_secs`)
//! than something safe to ignore, and silently ignoring it would deploy with settings the operator
//! did not intend.

use std::collections::BTreeMap;
use std::time::Duration;

use bollard::models::RestartPolicyNameEnum;
use stella_plugin_sdk::PluginError;
use stella_plugin_sdk::config::{env_vars, invalid, object_or_null, seconds, unknown_key};

pub(crate) const DEFAULT_HEALTH_TIMEOUT_SECS: u64 = 60;
const MAX_HEALTH_TIMEOUT_SECS: u64 = 3600;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TargetConfig {
    pub health_timeout: Duration,
    pub network: Option<String>,
    /// Applied to every component. Values may be secrets: never log or echo them.
    pub env: BTreeMap<String, String>,
    pub restart_policy: RestartPolicyNameEnum,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            health_timeout: Duration::from_secs(DEFAULT_HEALTH_TIMEOUT_SECS),
            network: None,
            env: BTreeMap::new(),
            // Stella is the only thing that should stop a deployed workload; a host reboot or a
            // crash must not leave the target silently running nothing.
            restart_policy: RestartPolicyNameEnum::UNLESS_STOPPED,
        }
    }
}

impl TargetConfig {
    pub(crate) fn env_list(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}

pub(crate) fn parse(config: &serde_json::Value) -> Result<TargetConfig, PluginError> {
    let mut out = TargetConfig::default();
    let Some(map) = object_or_null(config)? else {
        return Ok(out);
    };
    for (key, value) in map {
        match key.as_str() {
            "health_timeout_secs" => {
                out.health_timeout = seconds(key, value, MAX_HEALTH_TIMEOUT_SECS)?;
            }
            "network" => {
                let name = value
                    .as_str()
                    .filter(|s| !s.trim().is_empty())
                    .ok_or_else(|| invalid("network: must be a non-empty string"))?;
                out.network = Some(name.to_string());
            }
            "env" => out.env = env_vars(key, value)?,
            "restart_policy" => {
                out.restart_policy = match value.as_str() {
                    Some("no") => RestartPolicyNameEnum::NO,
                    Some("always") => RestartPolicyNameEnum::ALWAYS,
                    Some("unless-stopped") => RestartPolicyNameEnum::UNLESS_STOPPED,
                    Some("on-failure") => RestartPolicyNameEnum::ON_FAILURE,
                    _ => {
                        return Err(invalid(
                            "restart_policy: must be one of \"no\", \"always\", \"unless-stopped\", \"on-failure\"",
                        ));
                    }
                };
            }
            other => return Err(unknown_key(other)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: serde_json::Value) -> String {
        match parse(&v) {
            Err(PluginError::InvalidConfig(m)) => m,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn null_and_empty_give_defaults() {
        assert_eq!(parse(&json!(null)).unwrap(), TargetConfig::default());
        assert_eq!(parse(&json!({})).unwrap(), TargetConfig::default());
        assert_eq!(
            TargetConfig::default().health_timeout,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn full_config_parses() {
        let c = parse(&json!({
            "health_timeout_secs": 5,
            "network": "appnet",
            "env": {"A": "1", "B": "two"},
            "restart_policy": "on-failure",
        }))
        .unwrap();
        assert_eq!(c.health_timeout, Duration::from_secs(5));
        assert_eq!(c.network.as_deref(), Some("appnet"));
        assert_eq!(c.env_list(), vec!["A=1".to_string(), "B=two".to_string()]);
        assert_eq!(c.restart_policy, RestartPolicyNameEnum::ON_FAILURE);
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(json!({"helth": 1})).contains("helth"));
        assert!(err(json!({"health_timeout_secs": 0})).contains("health_timeout_secs"));
        assert!(err(json!({"health_timeout_secs": 3601})).contains("health_timeout_secs"));
        assert!(err(json!({"health_timeout_secs": "5"})).contains("health_timeout_secs"));
        assert!(err(json!({"network": 3})).contains("network"));
        assert!(err(json!({"env": []})).contains("env"));
        assert!(err(json!({"restart_policy": "sometimes"})).contains("restart_policy"));
        assert!(err(json!([1])).contains("object"));
    }

    #[test]
    fn env_errors_never_echo_values() {
        let m = err(json!({"env": {"TOKEN": 12345}}));
        assert!(m.contains("env.TOKEN"));
        assert!(!m.contains("12345"));
    }
}
