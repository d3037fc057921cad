//! Checks every executor makes before it touches a target, with the same messages everywhere.

use std::collections::HashMap;

use crate::{ComponentSpec, PluginError, TargetRef, is_valid_digest};

/// The target is of kind `kind` and has a name.
pub fn target(target: &TargetRef, kind: &str) -> Result<(), PluginError> {
    if target.kind != kind {
        return Err(PluginError::InvalidConfig(format!(
            "target {} has kind {:?}, this executor handles {kind:?}",
            target.name, target.kind
        )));
    }
    if target.name.is_empty() {
        return Err(PluginError::InvalidConfig(
            "target name must not be empty".to_string(),
        ));
    }
    Ok(())
}

/// The component has a name, an image and a well-formed digest.
pub fn component(c: &ComponentSpec) -> Result<(), PluginError> {
    if c.name.is_empty() {
        return Err(PluginError::InvalidConfig(
            "component names must not be empty".to_string(),
        ));
    }
    if c.image.is_empty() {
        return Err(PluginError::InvalidConfig(format!(
            "component {}: image must not be empty",
            c.name
        )));
    }
    if !is_valid_digest(&c.digest) {
        return Err(PluginError::InvalidConfig(format!(
            "component {}: digest {:?} is not sha256:<64 lowercase hex>",
            c.name, c.digest
        )));
    }
    Ok(())
}

/// Catches two components that map to the same workload name (container, service, variable),
/// which would replace or overwrite each other.
#[derive(Debug, Default)]
pub struct DistinctNames<'a> {
    seen: HashMap<String, &'a str>,
}

impl<'a> DistinctNames<'a> {
    /// Records that `component` maps to `key`. A second component mapping to it is refused
    /// with "components "a" and "b" map to the same <what>".
    pub fn insert(
        &mut self,
        key: String,
        component: &'a str,
        what: &str,
    ) -> Result<(), PluginError> {
        match self.seen.insert(key, component) {
            Some(other) => Err(PluginError::InvalidConfig(format!(
                "components {other:?} and {component:?} map to the same {what}"
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, image: &str, digest: &str) -> ComponentSpec {
        ComponentSpec {
            name: name.to_string(),
            image: image.to_string(),
            digest: digest.to_string(),
        }
    }

    fn msg(r: Result<(), PluginError>) -> String {
        match r {
            Err(PluginError::InvalidConfig(m)) => m,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn targets() {
        let t = |name: &str, kind: &str| TargetRef {
            name: name.to_string(),
            kind: kind.to_string(),
            config: serde_json::Value::Null,
        };
        assert!(target(&t("a", "docker"), "docker").is_ok());
        assert_eq!(
            msg(target(&t("a", "ssh"), "docker")),
            "target a has kind \"ssh\", this executor handles \"docker\""
        );
        assert_eq!(
            msg(target(&t("", "docker"), "docker")),
            "target name must not be empty"
        );
    }

    #[test]
    fn components_and_clashes() {
        let d = format!("sha256:{}", "b".repeat(64));
        assert!(component(&c("web", "demo/app:1", &d)).is_ok());
        assert!(msg(component(&c("", "demo/app:1", &d))).contains("names must not be empty"));
        assert!(msg(component(&c("web", "", &d))).contains("image must not be empty"));
        assert!(msg(component(&c("web", "x", "latest"))).contains("\"latest\" is not sha256"));

        let mut names = DistinctNames::default();
        names
            .insert("a_b".to_string(), "a/b", "container name")
            .unwrap();
        names
            .insert("web".to_string(), "web", "container name")
            .unwrap();
        assert_eq!(
            msg(names.insert("a_b".to_string(), "a_b", "container name")),
            "components \"a/b\" and \"a_b\" map to the same container name"
        );
    }
}
