//! Task definitions: what a revision pins, and the copy Stella registers with new images.
//!
//! The Stella identity of a revision lives in two places:
//! - Docker labels on each deployed container (`stella.component`, `stella.digest`,
//!   `stella.release.id`, `stella.deployment.id`, `stella.job.id`). They are authoritative:
//!   labels have no character restrictions and are part of the revision itself, so the
//!   "already pinned" and rollback checks read them.
//! - Task definition tags (`stella.release.id`, `stella.deployment.id`, and
//!   `stella.digest.<container>`), for people browsing the console or billing reports. Tag
//!   values only allow letters, digits, spaces and `+ - = . _ : / @`, so a value outside that set
//!   is left out rather than make the registration fail.

use std::collections::HashMap;

use aws_sdk_ecs::types::{ContainerDefinition, Tag, TaskDefinition};
use stella_plugin_sdk::{ComponentSpec, DeploySpec};

use crate::config::TargetConfig;

pub const LABEL_COMPONENT: &str = "stella.component";
pub const LABEL_DIGEST: &str = "stella.digest";
pub const LABEL_RELEASE_ID: &str = "stella.release.id";
pub const LABEL_DEPLOYMENT_ID: &str = "stella.deployment.id";
pub const LABEL_JOB_ID: &str = "stella.job.id";
pub const TAG_RELEASE_ID: &str = LABEL_RELEASE_ID;
pub const TAG_DEPLOYMENT_ID: &str = LABEL_DEPLOYMENT_ID;
/// Followed by `.<container>`.
pub const TAG_DIGEST_PREFIX: &str = "stella.digest";

const MAX_TAG_KEY_LEN: usize = 128;
const MAX_TAG_VALUE_LEN: usize = 256;

/// `registry:5000/demo/app:1` → `registry:5000/demo/app`; a digest suffix goes too.
pub(crate) fn repository_of(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    }
}

/// The image reference a component runs as: its repository pinned to the digest.
pub(crate) fn pinned_image(component: &ComponentSpec) -> String {
    format!("{}@{}", repository_of(&component.image), component.digest)
}

/// The digest an image reference is pinned to, if it is pinned.
pub(crate) fn digest_of(image: &str) -> Option<&str> {
    image
        .rsplit_once('@')
        .map(|(_, d)| d)
        .filter(|d| stella_plugin_sdk::is_valid_digest(d))
}

pub(crate) fn container<'a>(td: &'a TaskDefinition, name: &str) -> Option<&'a ContainerDefinition> {
    td.container_definitions()
        .iter()
        .find(|c| c.name() == Some(name))
}

pub(crate) fn label<'a>(c: &'a ContainerDefinition, key: &str) -> Option<&'a str> {
    c.docker_labels()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

/// Whether a component's container in `td` already runs the component's digest for `release`.
pub(crate) fn container_pins(
    td: &TaskDefinition,
    cfg: &TargetConfig,
    c: &ComponentSpec,
    release_id: &str,
) -> bool {
    container(td, cfg.container_for(&c.name)).is_some_and(|def| {
        def.image() == Some(pinned_image(c).as_str())
            && label(def, LABEL_RELEASE_ID) == Some(release_id)
            && label(def, LABEL_DIGEST) == Some(c.digest.as_str())
    })
}

/// Whether `td` runs exactly the spec's digests for the spec's release.
pub(crate) fn pins(td: &TaskDefinition, cfg: &TargetConfig, spec: &DeploySpec) -> bool {
    spec.components
        .iter()
        .all(|c| container_pins(td, cfg, c, &spec.release_id))
}

/// Containers the spec needs that `td` lacks, as (component, container).
pub(crate) fn missing_containers<'a>(
    td: &TaskDefinition,
    cfg: &'a TargetConfig,
    spec: &'a DeploySpec,
) -> Vec<(&'a str, &'a str)> {
    spec.components
        .iter()
        .map(|c| (c.name.as_str(), cfg.container_for(&c.name)))
        .filter(|(_, name)| container(td, name).is_none())
        .collect()
}

/// `family:revision` from a task definition ARN (or the text itself when it is no ARN).
pub(crate) fn short_name(arn: &str) -> &str {
    arn.rsplit_once("task-definition/")
        .map(|(_, rest)| rest)
        .unwrap_or(arn)
}

/// The revision number at the end of a task definition ARN.
pub(crate) fn revision_of(arn: &str) -> Option<u32> {
    arn.rsplit_once(':').and_then(|(_, r)| r.parse().ok())
}

fn tag_safe(s: &str) -> bool {
    s.chars().all(|c| {
        c.is_alphanumeric()
            || c == ' '
            || matches!(c, '+' | '-' | '=' | '.' | '_' | ':' | '/' | '@')
    })
}

fn tag(key: String, value: &str) -> Option<Tag> {
    let ok = tag_safe(&key)
        && tag_safe(value)
        && key.chars().count() <= MAX_TAG_KEY_LEN
        && value.chars().count() <= MAX_TAG_VALUE_LEN;
    ok.then(|| Tag::builder().key(key).value(value).build())
}

/// The containers of `td` with every deployed component's image pinned and labelled.
pub(crate) fn pinned_containers(
    td: &TaskDefinition,
    cfg: &TargetConfig,
    spec: &DeploySpec,
) -> Vec<ContainerDefinition> {
    let by_container: HashMap<&str, &ComponentSpec> = spec
        .components
        .iter()
        .map(|c| (cfg.container_for(&c.name), c))
        .collect();
    td.container_definitions()
        .iter()
        .map(|def| {
            let Some(component) = def.name().and_then(|n| by_container.get(n)) else {
                // Sidecars and other containers the release does not name keep their image.
                return def.clone();
            };
            let mut labels = def.docker_labels().cloned().unwrap_or_default();
            labels.insert(LABEL_COMPONENT.to_string(), component.name.clone());
            labels.insert(LABEL_DIGEST.to_string(), component.digest.clone());
            labels.insert(LABEL_RELEASE_ID.to_string(), spec.release_id.clone());
            labels.insert(LABEL_DEPLOYMENT_ID.to_string(), spec.deployment_id.clone());
            labels.insert(LABEL_JOB_ID.to_string(), spec.job_id.clone());
            let mut def = def.clone();
            def.image = Some(pinned_image(component));
            def.docker_labels = Some(labels);
            def
        })
        .collect()
}

/// The revision's tags: the current ones except Stella's, then Stella's for this release.
pub(crate) fn pinned_tags(current: &[Tag], cfg: &TargetConfig, spec: &DeploySpec) -> Vec<Tag> {
    let mut tags: Vec<Tag> = current
        .iter()
        .filter(|t| !t.key().is_some_and(|k| k.starts_with("stella.")))
        // `aws:` tags are managed by AWS and refused on registration.
        .filter(|t| {
            !t.key()
                .is_some_and(|k| k.to_ascii_lowercase().starts_with("aws:"))
        })
        .cloned()
        .collect();
    tags.extend(tag(TAG_RELEASE_ID.to_string(), &spec.release_id));
    tags.extend(tag(TAG_DEPLOYMENT_ID.to_string(), &spec.deployment_id));
    for c in &spec.components {
        tags.extend(tag(
            format!("{TAG_DIGEST_PREFIX}.{}", cfg.container_for(&c.name)),
            &c.digest,
        ));
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;
    use stella_plugin_sdk::TargetRef;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn component(name: &str, image: &str, c: char) -> ComponentSpec {
        ComponentSpec {
            name: name.to_string(),
            image: image.to_string(),
            digest: digest(c),
        }
    }

    fn cfg(map: serde_json::Value) -> TargetConfig {
        crate::config::parse(&serde_json::json!({
            "cluster": "c", "service": "s", "container_map": map,
        }))
        .unwrap()
    }

    fn spec(components: Vec<ComponentSpec>) -> DeploySpec {
        DeploySpec {
            job_id: "job-1".to_string(),
            deployment_id: "dep-1".to_string(),
            release_id: "rel-1".to_string(),
            release_name: "Release 1".to_string(),
            target: TargetRef {
                name: "t".to_string(),
                kind: "ecs".to_string(),
                config: serde_json::Value::Null,
            },
            components,
            strategy: Default::default(),
        }
    }

    fn td(containers: &[(&str, &str)]) -> TaskDefinition {
        TaskDefinition::builder()
            .task_definition_arn("arn:aws:ecs:us-east-1:1:task-definition/fam:7")
            .family("fam")
            .set_container_definitions(Some(
                containers
                    .iter()
                    .map(|(n, i)| {
                        ContainerDefinition::builder()
                            .name(*n)
                            .image(*i)
                            .docker_labels("team", "web")
                            .build()
                    })
                    .collect(),
            ))
            .build()
    }

    #[test]
    fn repositories_and_digests() {
        assert_eq!(repository_of("demo/app:1"), "demo/app");
        assert_eq!(
            repository_of("registry:5000/demo/app"),
            "registry:5000/demo/app"
        );
        assert_eq!(
            repository_of("registry:5000/demo/app:1"),
            "registry:5000/demo/app"
        );
        assert_eq!(
            repository_of(&format!("demo/app:1@{}", digest('a'))),
            "demo/app"
        );
        let c = component("api", "1.dkr.ecr.us-east-1.amazonaws.com/api:v2", 'b');
        assert_eq!(
            pinned_image(&c),
            format!("1.dkr.ecr.us-east-1.amazonaws.com/api@{}", digest('b'))
        );
        assert_eq!(digest_of(&pinned_image(&c)), Some(digest('b').as_str()));
        assert_eq!(digest_of("nginx:1"), None);
        assert_eq!(digest_of("nginx@sha256:short"), None);
        assert_eq!(
            short_name("arn:aws:ecs:us-east-1:1:task-definition/fam:7"),
            "fam:7"
        );
        assert_eq!(
            revision_of("arn:aws:ecs:us-east-1:1:task-definition/fam:7"),
            Some(7)
        );
    }

    #[test]
    fn pinning_rewrites_only_mapped_containers_and_keeps_their_labels() {
        let cfg = cfg(serde_json::json!({"api": "app"}));
        let s = spec(vec![component("api", "demo/api:1", 'a')]);
        let current = td(&[("app", "demo/api:1"), ("envoy", "envoy:v1")]);
        assert!(!pins(&current, &cfg, &s));
        assert!(missing_containers(&current, &cfg, &s).is_empty());

        let containers = pinned_containers(&current, &cfg, &s);
        let app = &containers[0];
        assert_eq!(
            app.image(),
            Some(format!("demo/api@{}", digest('a')).as_str())
        );
        assert_eq!(label(app, "team"), Some("web"));
        assert_eq!(label(app, LABEL_COMPONENT), Some("api"));
        assert_eq!(label(app, LABEL_RELEASE_ID), Some("rel-1"));
        assert_eq!(label(app, LABEL_DIGEST), Some(digest('a').as_str()));
        assert_eq!(containers[1].image(), Some("envoy:v1"));
        assert_eq!(label(&containers[1], LABEL_COMPONENT), None);

        let next = TaskDefinition::builder()
            .set_container_definitions(Some(containers))
            .build();
        assert!(pins(&next, &cfg, &s));
        let mut other_release = s.clone();
        other_release.release_id = "rel-2".to_string();
        assert!(!pins(&next, &cfg, &other_release));

        let unmapped = spec(vec![component("worker", "demo/w:1", 'b')]);
        assert_eq!(
            missing_containers(&current, &cfg, &unmapped),
            vec![("worker", "worker")]
        );
    }

    #[test]
    fn tags_replace_stella_ones_and_skip_unsafe_values() {
        let cfg = cfg(serde_json::json!({}));
        let mut s = spec(vec![component("api", "demo/api:1", 'a')]);
        let current = vec![
            Tag::builder().key("team").value("web").build(),
            Tag::builder().key("stella.release.id").value("old").build(),
            Tag::builder()
                .key("aws:cloudformation:stack-name")
                .value("x")
                .build(),
        ];
        let tags = pinned_tags(&current, &cfg, &s);
        let pairs: Vec<(&str, &str)> = tags
            .iter()
            .map(|t| (t.key().unwrap(), t.value().unwrap()))
            .collect();
        let d = digest('a');
        assert_eq!(
            pairs,
            vec![
                ("team", "web"),
                ("stella.release.id", "rel-1"),
                ("stella.deployment.id", "dep-1"),
                ("stella.digest.api", d.as_str()),
            ]
        );
        s.release_id = "rel{1}".to_string();
        let tags = pinned_tags(&[], &cfg, &s);
        assert!(tags.iter().all(|t| t.key() != Some("stella.release.id")));
    }
}
