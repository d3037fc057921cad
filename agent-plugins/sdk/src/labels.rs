//! Label keys Stella puts on the containers it manages, shared by the docker-like executors
//! (docker, compose, ssh in mode `docker`) so that inventory, cleanup and operators can find
//! Stella's containers the same way on every host.

use crate::{ComponentSpec, DeploySpec};

/// Set to `"true"` on every container Stella creates.
pub const MANAGED: &str = "stella.managed";
/// The target name as the control plane spells it.
pub const TARGET: &str = "stella.target";
/// The component name as the release spells it (docker executor, ssh mode `docker`).
pub const COMPONENT: &str = "stella.component";
/// The component name as the release spells it, on containers of the compose executor. Compose
/// sanitizes service names, so the component travels in a label of its own; the compose
/// executor deliberately uses this key rather than [`COMPONENT`].
pub const COMPONENT_ID: &str = "stella.component.id";
/// The digest the job asked for (what the container runs is its `Image` field).
pub const DIGEST: &str = "stella.digest";
pub const RELEASE_ID: &str = "stella.release.id";
pub const RELEASE_NAME: &str = "stella.release.name";
pub const DEPLOYMENT_ID: &str = "stella.deployment.id";
pub const JOB_ID: &str = "stella.job.id";
/// The image reference as the job spelled it; informational only.
pub const IMAGE: &str = "stella.image";

/// Every label a container of component `c` of `spec` carries (docker executor and ssh mode
/// `docker`), as `(key, value)` pairs.
pub fn container_labels<'a>(
    spec: &'a DeploySpec,
    c: &'a ComponentSpec,
) -> [(&'static str, &'a str); 9] {
    [
        (MANAGED, "true"),
        (TARGET, spec.target.name.as_str()),
        (COMPONENT, c.name.as_str()),
        (DIGEST, c.digest.as_str()),
        (RELEASE_ID, spec.release_id.as_str()),
        (RELEASE_NAME, spec.release_name.as_str()),
        (DEPLOYMENT_ID, spec.deployment_id.as_str()),
        (JOB_ID, spec.job_id.as_str()),
        (IMAGE, c.image.as_str()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TargetRef;

    #[test]
    fn a_container_carries_the_whole_release() {
        let c = ComponentSpec {
            name: "web".to_string(),
            image: "demo/app:1".to_string(),
            digest: format!("sha256:{}", "a".repeat(64)),
        };
        let spec = DeploySpec {
            job_id: "j".to_string(),
            deployment_id: "d".to_string(),
            release_id: "r".to_string(),
            release_name: "R".to_string(),
            target: TargetRef {
                name: "t".to_string(),
                kind: "docker".to_string(),
                config: serde_json::Value::Null,
            },
            components: vec![c.clone()],
            strategy: Default::default(),
        };
        let labels = container_labels(&spec, &c);
        let get = |k: &str| labels.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        assert_eq!(get("stella.managed"), Some("true"));
        assert_eq!(get("stella.target"), Some("t"));
        assert_eq!(get("stella.component"), Some("web"));
        assert_eq!(get("stella.digest"), Some(c.digest.as_str()));
        assert_eq!(get("stella.release.id"), Some("r"));
        assert_eq!(get("stella.release.name"), Some("R"));
        assert_eq!(get("stella.deployment.id"), Some("d"));
        assert_eq!(get("stella.job.id"), Some("j"));
        assert_eq!(get("stella.image"), Some("demo/app:1"));
        assert_eq!(COMPONENT_ID, "stella.component.id");
    }
}
