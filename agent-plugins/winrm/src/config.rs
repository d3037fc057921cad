//! Parsing of a winrm target's `config` object.
//!
//! Strict, as for the other executors: an unknown key is far more likely a typo of a real one
//! than something safe to ignore, and every error names the key. Parsing never reads files or
//! the environment: the password and the CA are loaded when an operation starts, so that a
//! rotated secret is picked up without an agent restart.

use std::path::PathBuf;
use std::time::Duration;

use stella_plugin_sdk::PluginError;

pub const DEFAULT_STICKER_PATH: &str = r"C:\ProgramData\Stella\stella.version.json";
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_OPERATION_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_HTTP_PORT: u16 = 5985;
pub const DEFAULT_HTTPS_PORT: u16 = 5986;
const MAX_TIMEOUT_SECS: u64 = 86_400;
const MAX_OPERATION_TIMEOUT_SECS: u64 = 3_600;
const MAX_CONNECT_TIMEOUT_SECS: u64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Basic,
    Ntlm,
}

/// Where the password comes from, on the agent host.
#[derive(Debug, Clone, PartialEq)]
pub enum PasswordSource {
    /// Name of an environment variable of the agent process.
    Env(String),
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Tls {
    /// Plain HTTP.
    None,
    /// Trust exactly the certificates in this PEM file.
    CaFile(PathBuf),
    /// Accept any certificate (still TLS, but no server authentication).
    InsecureSkipVerify,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Host as used to connect and for TLS server names (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    pub path: String,
    pub https: bool,
}

impl Endpoint {
    /// `host:port` as it goes into the `Host` header (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority(), self.path)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TargetConfig {
    pub endpoint: Endpoint,
    pub username: String,
    pub password: PasswordSource,
    pub auth: Auth,
    pub tls: Tls,
    pub sticker_path: String,
    pub deploy_script: String,
    pub inventory_script: Option<String>,
    pub timeout: Duration,
    pub operation_timeout: Duration,
    pub connect_timeout: Duration,
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
    if s.contains('\0') {
        return Err(invalid(format!("{key}: must not contain NUL")));
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

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn endpoint(value: &serde_json::Value) -> Result<Endpoint, PluginError> {
    const KEY: &str = "endpoint";
    let s = string(KEY, value)?;
    let uri: hyper::Uri = s.parse().map_err(|e| {
        invalid(format!(
            "{KEY}: not a URL (expected e.g. \"http://host:5985/wsman\"): {e}"
        ))
    })?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(invalid(format!(
                "{KEY}: scheme must be http or https (e.g. \"https://host:5986/wsman\")"
            )));
        }
    };
    let authority = uri
        .authority()
        .ok_or_else(|| invalid(format!("{KEY}: has no host")))?;
    if authority.as_str().contains('@') {
        return Err(invalid(format!(
            "{KEY}: must not carry credentials (use username and password_env/password_file)"
        )));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(invalid(format!("{KEY}: has no host")));
    }
    let port = match authority.port_u16() {
        Some(0) => return Err(invalid(format!("{KEY}: port must not be 0"))),
        Some(p) => p,
        None if https => DEFAULT_HTTPS_PORT,
        None => DEFAULT_HTTP_PORT,
    };
    if uri.query().is_some() || s.contains('#') {
        return Err(invalid(format!("{KEY}: must not have a query or fragment")));
    }
    let path = match uri.path() {
        "" | "/" => "/wsman".to_string(),
        p => p.to_string(),
    };
    Ok(Endpoint {
        host,
        port,
        path,
        https,
    })
}

/// A Windows absolute path on the target (`C:\dir\file.json`); `/` is accepted for `\`.
fn sticker_path(value: &serde_json::Value) -> Result<String, PluginError> {
    const KEY: &str = "sticker_path";
    let s = string(KEY, value)?.replace('/', "\\");
    let bytes = s.as_bytes();
    if bytes.len() < 4 || !bytes[0].is_ascii_alphabetic() || &bytes[1..3] != b":\\" {
        return Err(invalid(format!(
            "{KEY}: must be an absolute Windows path with a drive letter (e.g. \"{DEFAULT_STICKER_PATH}\")"
        )));
    }
    if s.ends_with('\\') {
        return Err(invalid(format!("{KEY}: must name a file, not a directory")));
    }
    if s[3..]
        .chars()
        .any(|c| c.is_control() || matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*'))
    {
        return Err(invalid(format!(
            "{KEY}: contains a character Windows does not allow in paths"
        )));
    }
    // Used verbatim; `.`/`..` segments and empty ones would make "where is the sticker"
    // ambiguous.
    if s[3..]
        .split('\\')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(invalid(format!(
            "{KEY}: must not contain empty, \".\" or \"..\" segments"
        )));
    }
    Ok(s)
}

fn absolute_file(key: &str, value: &serde_json::Value) -> Result<PathBuf, PluginError> {
    let p = string(key, value)?;
    if !p.starts_with('/') {
        return Err(invalid(format!(
            "{key}: must be an absolute path on the agent host"
        )));
    }
    Ok(PathBuf::from(p))
}

pub fn parse(config: &serde_json::Value) -> Result<TargetConfig, PluginError> {
    let map = config
        .as_object()
        .ok_or_else(|| invalid("target config must be a JSON object"))?;

    let mut ep = None;
    let mut username = None;
    let mut password_env = None;
    let mut password_file = None;
    let mut auth = Auth::Ntlm;
    let mut ca_file = None;
    let mut insecure = false;
    let mut sticker = DEFAULT_STICKER_PATH.to_string();
    let mut deploy_script = None;
    let mut inventory_script = None;
    let mut timeout = Duration::from_secs(DEFAULT_TIMEOUT_SECS);
    let mut operation_timeout = Duration::from_secs(DEFAULT_OPERATION_TIMEOUT_SECS);
    let mut connect_timeout = Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_SECS);

    for (key, value) in map {
        match key.as_str() {
            "endpoint" => ep = Some(endpoint(value)?),
            "username" => {
                let u = string(key, value)?;
                if u.chars().any(char::is_control) || u.trim() != u {
                    return Err(invalid(
                        "username: must not contain control characters or surrounding spaces",
                    ));
                }
                username = Some(u.to_string());
            }
            "password_env" => {
                let name = string(key, value)?;
                if !is_env_name(name) {
                    return Err(invalid(
                        "password_env: must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
                    ));
                }
                password_env = Some(name.to_string());
            }
            "password_file" => password_file = Some(absolute_file(key, value)?),
            "auth" => {
                auth = match value.as_str() {
                    Some("basic") => Auth::Basic,
                    Some("ntlm") => Auth::Ntlm,
                    _ => return Err(invalid("auth: must be \"basic\" or \"ntlm\"")),
                };
            }
            "ca_file" => ca_file = Some(absolute_file(key, value)?),
            "insecure_skip_verify" => {
                insecure = value
                    .as_bool()
                    .ok_or_else(|| invalid("insecure_skip_verify: must be true or false"))?;
            }
            "sticker_path" => sticker = sticker_path(value)?,
            "deploy_script" => deploy_script = Some(string(key, value)?.to_string()),
            "inventory_script" => inventory_script = Some(string(key, value)?.to_string()),
            "timeout_secs" => timeout = seconds(key, value, MAX_TIMEOUT_SECS)?,
            "operation_timeout_secs" => {
                operation_timeout = seconds(key, value, MAX_OPERATION_TIMEOUT_SECS)?;
            }
            "connect_timeout_secs" => {
                connect_timeout = seconds(key, value, MAX_CONNECT_TIMEOUT_SECS)?;
            }
            other => return Err(invalid(format!("unknown key {other:?}"))),
        }
    }

    let endpoint =
        ep.ok_or_else(|| invalid("endpoint: required (e.g. \"https://host:5986/wsman\")"))?;
    let username = username.ok_or_else(|| invalid("username: required"))?;
    let password = match (password_env, password_file) {
        (Some(name), None) => PasswordSource::Env(name),
        (None, Some(path)) => PasswordSource::File(path),
        (Some(_), Some(_)) => {
            return Err(invalid("password_env, password_file: set only one of them"));
        }
        (None, None) => {
            return Err(invalid(
                "password_env: required unless password_file names a file holding the password",
            ));
        }
    };
    let tls = match (endpoint.https, ca_file, insecure) {
        (false, Some(_), _) => {
            return Err(invalid("ca_file: only used with an https endpoint"));
        }
        (false, None, true) => {
            return Err(invalid(
                "insecure_skip_verify: only used with an https endpoint",
            ));
        }
        (false, None, false) => Tls::None,
        (true, Some(_), true) => {
            return Err(invalid(
                "ca_file, insecure_skip_verify: set only one of them",
            ));
        }
        (true, Some(path), false) => Tls::CaFile(path),
        (true, None, true) => Tls::InsecureSkipVerify,
        (true, None, false) => {
            // There is no system trust store an agent could rely on for WinRM listeners,
            // which mostly carry self-signed or internal-CA certificates.
            return Err(invalid(
                "ca_file: required for an https endpoint (a PEM file with the CA to trust), \
                 unless insecure_skip_verify is true",
            ));
        }
    };
    let deploy_script = deploy_script.ok_or_else(|| invalid("deploy_script: required"))?;

    Ok(TargetConfig {
        endpoint,
        username,
        password,
        auth,
        tls,
        sticker_path: sticker,
        deploy_script,
        inventory_script,
        timeout,
        operation_timeout,
        connect_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn base() -> Value {
        json!({
            "endpoint": "http://win-1.example:5985/wsman",
            "username": "CORP\\deploy",
            "password_env": "WINRM_PASSWORD",
            "deploy_script": "Write-Output hi",
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
        assert_eq!(c.endpoint.url(), "http://win-1.example:5985/wsman");
        assert_eq!(c.username, "CORP\\deploy");
        assert_eq!(c.password, PasswordSource::Env("WINRM_PASSWORD".into()));
        assert_eq!(c.auth, Auth::Ntlm);
        assert_eq!(c.tls, Tls::None);
        assert_eq!(c.sticker_path, DEFAULT_STICKER_PATH);
        assert_eq!(c.inventory_script, None);
        assert_eq!(c.timeout, Duration::from_secs(300));
        assert_eq!(c.operation_timeout, Duration::from_secs(60));
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
    }

    #[test]
    fn full_config_parses() {
        let c = parse(&with(json!({
            "endpoint": "https://[::1]/",
            "password_env": null,
            "password_file": "/etc/stella/winrm.pw",
            "auth": "basic",
            "ca_file": "/etc/stella/winrm-ca.pem",
            "sticker_path": "D:/Apps/stella.json",
            "inventory_script": "Get-Content x",
            "timeout_secs": 30,
            "operation_timeout_secs": 5,
            "connect_timeout_secs": 3,
        })))
        .unwrap();
        assert_eq!(c.endpoint.host, "::1");
        assert_eq!(c.endpoint.url(), "https://[::1]:5986/wsman");
        assert_eq!(
            c.password,
            PasswordSource::File("/etc/stella/winrm.pw".into())
        );
        assert_eq!(c.auth, Auth::Basic);
        assert_eq!(c.tls, Tls::CaFile("/etc/stella/winrm-ca.pem".into()));
        assert_eq!(c.sticker_path, r"D:\Apps\stella.json");
        assert_eq!(c.inventory_script.as_deref(), Some("Get-Content x"));
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.operation_timeout, Duration::from_secs(5));
        assert_eq!(c.connect_timeout, Duration::from_secs(3));

        let i = parse(&with(json!({
            "endpoint": "https://h:1234/custom",
            "insecure_skip_verify": true
        })))
        .unwrap();
        assert_eq!(i.tls, Tls::InsecureSkipVerify);
        assert_eq!(i.endpoint.url(), "https://h:1234/custom");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (json!({"endpont": "x"}), "endpont"),
            (json!({"endpoint": null}), "endpoint"),
            (json!({"endpoint": "win-1:5985"}), "endpoint"),
            (json!({"endpoint": "ftp://h/wsman"}), "endpoint"),
            (json!({"endpoint": "http://u:p@h/wsman"}), "endpoint"),
            (json!({"endpoint": "http://h/wsman?x=1"}), "endpoint"),
            (json!({"endpoint": 5985}), "endpoint"),
            (json!({"username": null}), "username"),
            (json!({"username": ""}), "username"),
            (json!({"username": "a\nb"}), "username"),
            (json!({"password_env": null}), "password_env"),
            (json!({"password_env": "1BAD"}), "password_env"),
            (json!({"password_file": "/x"}), "password_file"),
            (
                json!({"password_env": null, "password_file": "relative"}),
                "password_file",
            ),
            (json!({"auth": "kerberos"}), "auth"),
            (json!({"auth": true}), "auth"),
            (json!({"ca_file": "/ca.pem"}), "ca_file"),
            (
                json!({"insecure_skip_verify": true}),
                "insecure_skip_verify",
            ),
            (
                json!({"insecure_skip_verify": "no"}),
                "insecure_skip_verify",
            ),
            (json!({"endpoint": "https://h/wsman"}), "ca_file"),
            (
                json!({"endpoint": "https://h/wsman", "ca_file": "ca.pem"}),
                "ca_file",
            ),
            (
                json!({"endpoint": "https://h/wsman", "ca_file": "/ca.pem", "insecure_skip_verify": true}),
                "insecure_skip_verify",
            ),
            (json!({"sticker_path": "/var/lib/x.json"}), "sticker_path"),
            (json!({"sticker_path": "C:\\ProgramData\\"}), "sticker_path"),
            (json!({"sticker_path": "C:\\a\\..\\b.json"}), "sticker_path"),
            (json!({"sticker_path": "C:\\a\\b?.json"}), "sticker_path"),
            (json!({"sticker_path": "C:\\a\\\\b.json"}), "sticker_path"),
            (json!({"deploy_script": null}), "deploy_script"),
            (json!({"deploy_script": " "}), "deploy_script"),
            (json!({"inventory_script": 1}), "inventory_script"),
            (json!({"timeout_secs": 0}), "timeout_secs"),
            (json!({"timeout_secs": 86_401}), "timeout_secs"),
            (json!({"timeout_secs": "5"}), "timeout_secs"),
            (
                json!({"operation_timeout_secs": 3601}),
                "operation_timeout_secs",
            ),
            (json!({"connect_timeout_secs": 0}), "connect_timeout_secs"),
        ];
        for (changes, key) in cases {
            let m = err(with(changes.clone()));
            assert!(m.contains(key), "{changes}: {m:?} does not name {key}");
        }
        assert!(err(json!("x")).contains("JSON object"));
    }
}
