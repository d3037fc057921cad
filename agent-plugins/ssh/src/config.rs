//! Parsing of an ssh target's `config` object.
//!
//! Parsing is strict, as for the docker executor: an unknown key is far more likely a typo of a
//! real one (`conect_timeout_secs`) than something safe to ignore. Every error names the key.
//! Parsing never reads files or the environment: credentials are loaded when a connection is
//! made, so that a key rotated on the agent host is picked up without a restart.

use std::path::PathBuf;
use std::time::Duration;

use russh::keys::{Algorithm, HashAlg, PublicKey};
use stella_plugin_sdk::PluginError;
use stella_plugin_sdk::config::{invalid, object, seconds, unknown_key};

pub const DEFAULT_PORT: u16 = 22;
pub const DEFAULT_STICKER_PATH: &str = "/var/lib/stella/stella.version.json";
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
const MAX_TIMEOUT_SECS: u64 = 86_400;
const MAX_CONNECT_TIMEOUT_SECS: u64 = 300;

/// Where the private key comes from, on the agent host.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum KeySource {
    File(PathBuf),
    /// Name of an environment variable of the agent process holding the key itself.
    Env(String),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Mode {
    Script {
        deploy_script: String,
        inventory_script: Option<String>,
    },
    Docker,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TargetConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key: KeySource,
    pub host_key: PublicKey,
    pub sticker_path: String,
    pub mode: Mode,
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

impl TargetConfig {
    /// `user@host:port`, for messages.
    pub(crate) fn destination(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }

    pub(crate) fn host_key_fingerprint(&self) -> String {
        self.host_key.fingerprint(HashAlg::Sha256).to_string()
    }
}

fn string<'a>(key: &str, value: &'a serde_json::Value) -> Result<&'a str, PluginError> {
    let s = value
        .as_str()
        .ok_or_else(|| invalid(format!("{key}: must be a string")))?;
    if s.trim().is_empty() {
        return Err(invalid(format!("{key}: must not be empty")));
    }
    if s.contains('\0') {
        return Err(invalid(format!("{key}: must not contain NUL")));
    }
    Ok(s)
}

/// A single token: no whitespace or control characters (they would split or corrupt the
/// destination and never name a real host or user).
fn token<'a>(key: &str, value: &'a serde_json::Value) -> Result<&'a str, PluginError> {
    let s = string(key, value)?;
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(format!(
            "{key}: must not contain whitespace or control characters"
        )));
    }
    Ok(s)
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn sticker_path(value: &serde_json::Value) -> Result<String, PluginError> {
    const KEY: &str = "sticker_path";
    let s = string(KEY, value)?;
    if !s.starts_with('/') {
        return Err(invalid(format!(
            "{KEY}: must be an absolute path on the remote host"
        )));
    }
    if s.ends_with('/') {
        return Err(invalid(format!("{KEY}: must name a file, not a directory")));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{KEY}: must not contain control characters"
        )));
    }
    // The path is used verbatim; `.` and `..` segments would make "where is the sticker"
    // depend on symlinks and be a way to climb out of the intended directory.
    if s.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(invalid(format!(
            "{KEY}: must not contain \".\" or \"..\" segments"
        )));
    }
    Ok(s.to_string())
}

fn host_key(value: &serde_json::Value) -> Result<PublicKey, PluginError> {
    const KEY: &str = "host_key";
    let s = string(KEY, value)?;
    let key = PublicKey::from_openssh(s.trim()).map_err(|e| {
        invalid(format!(
            "{KEY}: not an OpenSSH public key (expected the server's key as in \
             \"ssh-ed25519 AAAA…\"): {e}"
        ))
    })?;
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. } => Ok(key),
        other => Err(invalid(format!(
            "{KEY}: host keys of type {other} are not supported (use ssh-ed25519, ecdsa-sha2-* or ssh-rsa)"
        ))),
    }
}

pub(crate) fn parse(config: &serde_json::Value) -> Result<TargetConfig, PluginError> {
    let map = object(config)?;

    let mut host = None;
    let mut port = DEFAULT_PORT;
    let mut user = None;
    let mut key_file = None;
    let mut key_env = None;
    let mut host_key_value = None;
    let mut sticker = DEFAULT_STICKER_PATH.to_string();
    let mut deploy_script = None;
    let mut inventory_script = None;
    let mut mode = None;
    let mut timeout = Duration::from_secs(DEFAULT_TIMEOUT_SECS);
    let mut connect_timeout = Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_SECS);

    for (key, value) in map {
        match key.as_str() {
            "host" => {
                let h = token(key, value)?;
                if h.contains('@') || h.contains('/') {
                    return Err(invalid(
                        "host: must be a host name or IP address only (put the user in \"user\" and the port in \"port\")",
                    ));
                }
                host = Some(h.to_string());
            }
            "port" => {
                port = value
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid("port: must be an integer between 1 and 65535"))?;
            }
            "user" => user = Some(token(key, value)?.to_string()),
            "private_key_file" => {
                let p = string(key, value)?;
                if !p.starts_with('/') {
                    return Err(invalid(
                        "private_key_file: must be an absolute path on the agent host",
                    ));
                }
                key_file = Some(PathBuf::from(p));
            }
            "private_key_env" => {
                let name = string(key, value)?;
                if !is_env_name(name) {
                    return Err(invalid(
                        "private_key_env: must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                    ));
                }
                key_env = Some(name.to_string());
            }
            "host_key" => host_key_value = Some(host_key(value)?),
            "sticker_path" => sticker = sticker_path(value)?,
            "deploy_script" => deploy_script = Some(string(key, value)?.to_string()),
            "inventory_script" => inventory_script = Some(string(key, value)?.to_string()),
            "mode" => {
                mode = Some(match value.as_str() {
                    Some("script") => "script",
                    Some("docker") => "docker",
                    _ => return Err(invalid("mode: must be \"script\" or \"docker\"")),
                });
            }
            "timeout_secs" => timeout = seconds(key, value, MAX_TIMEOUT_SECS)?,
            "connect_timeout_secs" => {
                connect_timeout = seconds(key, value, MAX_CONNECT_TIMEOUT_SECS)?;
            }
            other => return Err(unknown_key(other)),
        }
    }

    let host = host.ok_or_else(|| invalid("host: required"))?;
    let user = user.ok_or_else(|| invalid("user: required"))?;
    let key = match (key_file, key_env) {
        (Some(path), None) => KeySource::File(path),
        (None, Some(name)) => KeySource::Env(name),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "private_key_file, private_key_env: set only one of them",
            ));
        }
        (None, None) => {
            return Err(invalid(
                "private_key_file: required unless private_key_env names an environment variable holding the key",
            ));
        }
    };
    let host_key = host_key_value.ok_or_else(|| {
        invalid("host_key: required (the server's public host key, e.g. \"ssh-ed25519 AAAA…\")")
    })?;
    let mode = match (mode, deploy_script) {
        (Some("docker"), Some(_)) => {
            return Err(invalid(
                "deploy_script: not used in mode \"docker\" (remove it or use mode \"script\")",
            ));
        }
        (Some("docker"), None) => {
            if inventory_script.is_some() {
                return Err(invalid(
                    "inventory_script: not used in mode \"docker\" (inventory comes from docker itself)",
                ));
            }
            Mode::Docker
        }
        (_, Some(deploy_script)) => Mode::Script {
            deploy_script,
            inventory_script,
        },
        (Some(_), None) => return Err(invalid("deploy_script: required in mode \"script\"")),
        (None, None) => {
            return Err(invalid("deploy_script: required unless mode is \"docker\""));
        }
    };

    Ok(TargetConfig {
        host,
        port,
        user,
        key,
        host_key,
        sticker_path: sticker,
        mode,
        timeout,
        connect_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const HOST_KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJJ+0kAqsr/9nLgBSeAyd6cg/KDXL1dqQ/YzrqWgWNiP test";

    fn base() -> Value {
        json!({
            "host": "10.0.0.5",
            "user": "deploy",
            "private_key_file": "/etc/stella/id_ed25519",
            "host_key": HOST_KEY,
            "deploy_script": "echo hi",
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
        assert_eq!(c.host, "10.0.0.5");
        assert_eq!(c.port, 22);
        assert_eq!(c.user, "deploy");
        assert_eq!(
            c.key,
            KeySource::File(PathBuf::from("/etc/stella/id_ed25519"))
        );
        assert_eq!(c.sticker_path, "/var/lib/stella/stella.version.json");
        assert_eq!(
            c.mode,
            Mode::Script {
                deploy_script: "echo hi".to_string(),
                inventory_script: None
            }
        );
        assert_eq!(c.timeout, Duration::from_secs(300));
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.destination(), "deploy@10.0.0.5:22");
        assert!(c.host_key_fingerprint().starts_with("SHA256:"));
    }

    #[test]
    fn full_config_parses() {
        let c = parse(&with(json!({
            "port": 2222,
            "private_key_file": null,
            "private_key_env": "STELLA_SSH_KEY",
            "sticker_path": "/opt/app/stella.json",
            "mode": "script",
            "inventory_script": "cat /opt/app/inv",
            "timeout_secs": 30,
            "connect_timeout_secs": 3,
        })))
        .unwrap();
        assert_eq!(c.port, 2222);
        assert_eq!(c.key, KeySource::Env("STELLA_SSH_KEY".to_string()));
        assert_eq!(c.sticker_path, "/opt/app/stella.json");
        assert_eq!(
            c.mode,
            Mode::Script {
                deploy_script: "echo hi".to_string(),
                inventory_script: Some("cat /opt/app/inv".to_string())
            }
        );
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.connect_timeout, Duration::from_secs(3));

        let d = parse(&with(json!({"deploy_script": null, "mode": "docker"}))).unwrap();
        assert_eq!(d.mode, Mode::Docker);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (json!({"hots": "x"}), "hots"),
            (json!({"host": null}), "host"),
            (json!({"host": ""}), "host"),
            (json!({"host": "root@example"}), "host"),
            (json!({"host": 5}), "host"),
            (json!({"port": 0}), "port"),
            (json!({"port": 70000}), "port"),
            (json!({"port": "22"}), "port"),
            (json!({"user": null}), "user"),
            (json!({"user": "a b"}), "user"),
            (json!({"private_key_file": null}), "private_key_file"),
            (
                json!({"private_key_file": "id_ed25519"}),
                "private_key_file",
            ),
            (json!({"private_key_env": "KEY"}), "private_key_env"),
            (
                json!({"private_key_file": null, "private_key_env": "1BAD"}),
                "private_key_env",
            ),
            (json!({"host_key": null}), "host_key"),
            (json!({"host_key": "ssh-ed25519 notbase64"}), "host_key"),
            (json!({"sticker_path": "relative/x.json"}), "sticker_path"),
            (json!({"sticker_path": "/var/lib/"}), "sticker_path"),
            (json!({"sticker_path": "/var/../etc/x"}), "sticker_path"),
            (json!({"deploy_script": null}), "deploy_script"),
            (json!({"deploy_script": ""}), "deploy_script"),
            (json!({"mode": "docker"}), "deploy_script"),
            (json!({"mode": "kubernetes"}), "mode"),
            (
                json!({"mode": "script", "deploy_script": null}),
                "deploy_script",
            ),
            (
                json!({"mode": "docker", "deploy_script": null, "inventory_script": "x"}),
                "inventory_script",
            ),
            (json!({"timeout_secs": 0}), "timeout_secs"),
            (json!({"timeout_secs": 86_401}), "timeout_secs"),
            (json!({"connect_timeout_secs": 301}), "connect_timeout_secs"),
            (json!({"connect_timeout_secs": "5"}), "connect_timeout_secs"),
        ];
        for (changes, key) in cases {
            let m = err(with(changes.clone()));
            assert!(m.contains(key), "{changes}: {m:?} does not name {key}");
        }
        assert!(err(json!(null)).contains("object"));
        assert!(err(json!([1])).contains("object"));
    }

    #[test]
    fn rsa_and_ecdsa_host_keys_are_accepted() {
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC1VmAOASDvwwfcet2aXpviGoA3qGtJUZ1EtdaIpnJNsjO5YJqSgZHZgJ1Ic5+IkyJ8ftO9W1q6V1yd3H56SRhok630aS3JISHyiSwRBNU/i/QlRbASdSwkSQxaRo8/hlOlZaINj3+1Qyw1vw+I6DKy3QQGQj3kpz2yvO84QV6TpQ== x";
        assert!(parse(&with(json!({"host_key": rsa}))).is_ok());
        let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBCFQM9iHnbSMUYm1/Nwf/mRwh2ZVim4Eks3rUdlP3gR3jnNmjyIFuqGAa+QKtBZoqwXJhPFKilKxkm4ZK8mEBNQ= test";
        assert!(parse(&with(json!({"host_key": ecdsa}))).is_ok());
    }
}
