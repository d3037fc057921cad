//! Helpers for parsing a target's `config` object strictly.
//!
//! Executors refuse unknown keys (an unknown key is far more likely a typo of a real one than
//! something safe to ignore) and every error names the offending key, as `key: what is wrong`
//! (nested keys dotted: `services.web.environment.TOKEN`). Errors never echo a value, which may
//! be a secret.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::PluginError;

/// `PluginError::InvalidConfig(msg)`.
pub fn invalid(msg: impl Into<String>) -> PluginError {
    PluginError::InvalidConfig(msg.into())
}

/// The error for a key the executor does not know.
pub fn unknown_key(key: &str) -> PluginError {
    invalid(format!("unknown key {key:?}"))
}

/// A config that may be absent: `null` gives `None` (all defaults), an object its entries.
pub fn object_or_null(config: &Value) -> Result<Option<&Map<String, Value>>, PluginError> {
    match config {
        Value::Null => Ok(None),
        Value::Object(map) => Ok(Some(map)),
        _ => Err(invalid("target config must be a JSON object or null")),
    }
}

/// A config that must be given (it has required keys).
pub fn object(config: &Value) -> Result<&Map<String, Value>, PluginError> {
    config
        .as_object()
        .ok_or_else(|| invalid("target config must be a JSON object"))
}

/// An integer in `min..=max`.
pub fn integer(key: &str, value: &Value, min: u64, max: u64) -> Result<u64, PluginError> {
    value
        .as_u64()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| invalid(format!("{key}: must be an integer between {min} and {max}")))
}

/// A whole number of seconds in `1..=max`.
pub fn seconds(key: &str, value: &Value, max: u64) -> Result<Duration, PluginError> {
    integer(key, value, 1, max).map(Duration::from_secs)
}

/// An object of environment variables (`{"NAME": "value"}`). Names must be non-empty and
/// contain no `=` or NUL, values must be strings without NUL. Messages name the variable
/// (`<key>.<NAME>`) but never echo its value.
pub fn env_vars(key: &str, value: &Value) -> Result<BTreeMap<String, String>, PluginError> {
    let vars = value
        .as_object()
        .ok_or_else(|| invalid(format!("{key}: must be an object of string values")))?;
    let mut out = BTreeMap::new();
    for (name, v) in vars {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(invalid(format!(
                "{key}.{name}: variable names must be non-empty and contain no '=' or NUL"
            )));
        }
        let s = v
            .as_str()
            .ok_or_else(|| invalid(format!("{key}.{name}: value must be a string")))?;
        if s.contains('\0') {
            return Err(invalid(format!("{key}.{name}: value must not contain NUL")));
        }
        out.insert(name.clone(), s.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(r: Result<impl std::fmt::Debug, PluginError>) -> String {
        match r {
            Err(PluginError::InvalidConfig(m)) => m,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn objects() {
        assert!(object_or_null(&json!(null)).unwrap().is_none());
        assert_eq!(object_or_null(&json!({"a": 1})).unwrap().unwrap().len(), 1);
        assert!(msg(object_or_null(&json!([1]))).contains("object or null"));
        assert!(object(&json!({})).is_ok());
        assert!(msg(object(&json!(null))).contains("JSON object"));
        assert_eq!(
            msg(Err::<(), _>(unknown_key("helth"))),
            "unknown key \"helth\""
        );
    }

    #[test]
    fn numbers_name_the_key_and_range() {
        assert_eq!(seconds("t", &json!(5), 10).unwrap(), Duration::from_secs(5));
        assert_eq!(integer("n", &json!(0), 0, 3).unwrap(), 0);
        for bad in [json!(0), json!(11), json!("5"), json!(-1), json!(1.5)] {
            assert_eq!(
                msg(seconds("timeout_secs", &bad, 10)),
                "timeout_secs: must be an integer between 1 and 10"
            );
        }
    }

    #[test]
    fn environment_errors_never_echo_values() {
        let vars = env_vars("env", &json!({"A": "1", "B": "two"})).unwrap();
        assert_eq!(vars["B"], "two");
        let m = msg(env_vars("env", &json!({"TOKEN": 12345})));
        assert_eq!(m, "env.TOKEN: value must be a string");
        assert!(msg(env_vars("s.e", &json!({"A=B": "x"}))).starts_with("s.e.A=B: variable names"));
        assert!(msg(env_vars("env", &json!({"": "x"}))).contains("non-empty"));
        let m = msg(env_vars("env", &json!({"T": "se\u{0}cret"})));
        assert_eq!(m, "env.T: value must not contain NUL");
        assert_eq!(
            msg(env_vars("env", &json!([]))),
            "env: must be an object of string values"
        );
    }
}
