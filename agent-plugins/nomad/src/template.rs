//! The job template: a Nomad JSON job spec (the API's `Job` shape, as `nomad job run -output`
//! prints it) into which each deploy pins the release's digests.
//!
//! The template is kept as raw JSON so that every field Stella does not know about reaches Nomad
//! untouched; only the fields Stella owns are checked and set.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use stella_plugin_sdk::{ComponentSpec, DeploySpec, PluginError};

/// Job meta: the release the job version belongs to.
pub const META_RELEASE_ID: &str = "stella.release.id";
/// Job meta: the Stella deployment that registered the job version.
pub const META_DEPLOYMENT_ID: &str = "stella.deployment.id";
/// Job meta prefix: `stella.digest.<component>` = the digest the release wants.
pub const META_DIGEST_PREFIX: &str = "stella.digest.";
/// Job meta: hash of everything Stella registered except the deployment id, so that a re-deploy
/// of the same release with the same template is recognised as identical.
pub const META_SPEC_HASH: &str = "stella.spec.sha256";
/// Task meta: which component a task runs (set on every pinned task; may be preset in the
/// template when the task's name differs from the component's).
pub const META_COMPONENT: &str = "stella.component";

const MAX_TEMPLATE_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Template {
    job: Map<String, Value>,
}

/// A job ready to register, and where each component landed in it.
#[derive(Debug, Clone)]
pub(crate) struct BuiltJob {
    pub job: Value,
    pub spec_hash: String,
}

fn invalid(msg: impl Into<String>) -> PluginError {
    PluginError::InvalidConfig(msg.into())
}

fn string_map(at: &str, value: &Value) -> Result<(), PluginError> {
    let map = value
        .as_object()
        .ok_or_else(|| invalid(format!("{at}: must be an object of strings")))?;
    for (k, v) in map {
        if !v.is_string() {
            return Err(invalid(format!("{at}.{k}: must be a string")));
        }
    }
    Ok(())
}

fn name_of<'a>(at: &str, obj: &'a Map<String, Value>) -> Result<&'a str, PluginError> {
    match obj.get("Name").and_then(Value::as_str) {
        Some(n) if !n.trim().is_empty() => Ok(n),
        _ => Err(invalid(format!("{at}.Name: must be a non-empty string"))),
    }
}

/// Checks a template. `key` names where it came from (`job_template`, or the file) in errors.
pub(crate) fn parse(
    key: &str,
    value: &Value,
    job_id: &str,
    namespace: &str,
    region: Option<&str>,
) -> Result<Template, PluginError> {
    let mut job = value.as_object().ok_or_else(|| {
        invalid(format!(
            "{key}: must be a Nomad JSON job spec object (convert HCL with `nomad job run -output`)"
        ))
    })?;
    // `nomad job run -output` wraps the job: {"Job": {...}}.
    if job.len() == 1
        && let Some(inner) = job.get("Job").and_then(Value::as_object)
    {
        job = inner;
    }
    let at = |field: &str| format!("{key}.{field}");

    for (field, want) in [
        ("ID", Some(job_id)),
        ("Namespace", Some(namespace)),
        ("Region", region),
    ] {
        match (job.get(field), want) {
            (None | Some(Value::Null), _) => {}
            (Some(Value::String(s)), Some(w)) if s == w => {}
            (Some(Value::String(_)), None) => {}
            (Some(other), Some(w)) => {
                return Err(invalid(format!(
                    "{}: is {other} but the target config says {w:?} (leave it out or make them equal)",
                    at(field)
                )));
            }
            (Some(_), None) => return Err(invalid(format!("{}: must be a string", at(field)))),
        }
    }
    if let Some(name) = job.get("Name")
        && !name.is_null()
        && name.as_str().is_none_or(|n| n.trim().is_empty())
    {
        return Err(invalid(format!(
            "{}: must be a non-empty string",
            at("Name")
        )));
    }
    match job.get("Type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "service" => {}
        Some(other) => {
            return Err(invalid(format!(
                "{}: is {other}; only \"service\" jobs get Nomad deployments Stella can watch",
                at("Type")
            )));
        }
    }
    if job.get("Stop").and_then(Value::as_bool) == Some(true) {
        return Err(invalid(format!("{}: must not be true", at("Stop"))));
    }
    if let Some(meta) = job.get("Meta").filter(|m| !m.is_null()) {
        string_map(&at("Meta"), meta)?;
        if let Some(k) = meta
            .as_object()
            .and_then(|m| m.keys().find(|k| k.starts_with("stella.")))
        {
            return Err(invalid(format!(
                "{}.{k}: keys starting with \"stella.\" are set by Stella",
                at("Meta")
            )));
        }
    }

    let groups = job
        .get("TaskGroups")
        .and_then(Value::as_array)
        .filter(|g| !g.is_empty())
        .ok_or_else(|| invalid(format!("{}: must be a non-empty array", at("TaskGroups"))))?;
    let mut group_names = HashSet::new();
    for (gi, group) in groups.iter().enumerate() {
        let gat = at(&format!("TaskGroups[{gi}]"));
        let group = group
            .as_object()
            .ok_or_else(|| invalid(format!("{gat}: must be an object")))?;
        let gname = name_of(&gat, group)?;
        if !group_names.insert(gname) {
            return Err(invalid(format!(
                "{gat}.Name: group {gname:?} appears twice"
            )));
        }
        if let Some(count) = group.get("Count").filter(|c| !c.is_null())
            && count.as_u64().is_none()
        {
            return Err(invalid(format!(
                "{gat}.Count: must be a non-negative integer"
            )));
        }
        let tasks = group
            .get("Tasks")
            .and_then(Value::as_array)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid(format!("{gat}.Tasks: must be a non-empty array")))?;
        let mut task_names = HashSet::new();
        for (ti, task) in tasks.iter().enumerate() {
            let tat = format!("{gat}.Tasks[{ti}]");
            let task = task
                .as_object()
                .ok_or_else(|| invalid(format!("{tat}: must be an object")))?;
            let tname = name_of(&tat, task)?;
            if !task_names.insert(tname) {
                return Err(invalid(format!("{tat}.Name: task {tname:?} appears twice")));
            }
            if let Some(config) = task.get("Config").filter(|c| !c.is_null())
                && !config.is_object()
            {
                return Err(invalid(format!("{tat}.Config: must be an object")));
            }
            if let Some(meta) = task.get("Meta").filter(|m| !m.is_null()) {
                string_map(&format!("{tat}.Meta"), meta)?;
                if meta
                    .get(META_COMPONENT)
                    .and_then(Value::as_str)
                    .is_some_and(|c| c.trim().is_empty())
                {
                    return Err(invalid(format!(
                        "{tat}.Meta.{META_COMPONENT}: must not be empty"
                    )));
                }
            }
        }
    }
    Ok(Template { job: job.clone() })
}

/// Reads and checks a template file on the agent host.
pub(crate) async fn load(
    path: &Path,
    job_id: &str,
    namespace: &str,
    region: Option<&str>,
) -> Result<Template, PluginError> {
    let key = format!("job_template_file {}", path.display());
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| invalid(format!("{key}: cannot read: {e}")))?;
    if meta.len() > MAX_TEMPLATE_BYTES {
        return Err(invalid(format!(
            "{key}: larger than {MAX_TEMPLATE_BYTES} bytes"
        )));
    }
    let text = tokio::fs::read(path)
        .await
        .map_err(|e| invalid(format!("{key}: cannot read: {e}")))?;
    let value: Value = serde_json::from_slice(&text).map_err(|e| {
        invalid(format!(
            "{key}: not JSON ({e}); convert HCL with `nomad job run -output`"
        ))
    })?;
    parse(&key, &value, job_id, namespace, region)
}

/// `demo/app:1` → `demo/app`; a digest already present is dropped too.
pub(crate) fn repository_of(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    match without_digest.rfind(':') {
        Some(i) if !without_digest[i + 1..].contains('/') => &without_digest[..i],
        _ => without_digest,
    }
}

/// The digest an image reference pins (`repo@sha256:…`), if it pins one.
pub(crate) fn digest_of(image: &str) -> Option<&str> {
    image.rsplit_once('@').map(|(_, d)| d)
}

/// The component a task runs: its `stella.component` meta, else its name.
pub(crate) fn component_of_task<'a>(
    name: &'a str,
    meta: Option<&'a Map<String, Value>>,
) -> &'a str {
    meta.and_then(|m| m.get(META_COMPONENT))
        .and_then(Value::as_str)
        .unwrap_or(name)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Template {
    /// The job to register for `spec`: digests pinned, Stella meta set. Refuses when a component
    /// matches no task, before anything is sent to Nomad.
    pub(crate) fn build(
        &self,
        spec: &DeploySpec,
        job_id: &str,
        namespace: &str,
        region: Option<&str>,
    ) -> Result<BuiltJob, PluginError> {
        let mut job = self.job.clone();
        job.insert("ID".to_string(), Value::String(job_id.to_string()));
        if job.get("Name").is_none_or(Value::is_null) {
            job.insert("Name".to_string(), Value::String(job_id.to_string()));
        }
        job.insert(
            "Namespace".to_string(),
            Value::String(namespace.to_string()),
        );
        if let Some(region) = region {
            job.insert("Region".to_string(), Value::String(region.to_string()));
        }

        let wanted: BTreeMap<&str, &ComponentSpec> = spec
            .components
            .iter()
            .map(|c| (c.name.as_str(), c))
            .collect();
        let mut placed: HashSet<String> = HashSet::new();
        if let Some(groups) = job.get_mut("TaskGroups").and_then(Value::as_array_mut) {
            for group in groups.iter_mut().filter_map(Value::as_object_mut) {
                let Some(tasks) = group.get_mut("Tasks").and_then(Value::as_array_mut) else {
                    continue;
                };
                for task in tasks.iter_mut().filter_map(Value::as_object_mut) {
                    let tname = task
                        .get("Name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    let component =
                        component_of_task(&tname, task.get("Meta").and_then(Value::as_object))
                            .to_string();
                    let Some(c) = wanted.get(component.as_str()) else {
                        continue;
                    };
                    let pinned = format!("{}@{}", repository_of(&c.image), c.digest);
                    let config = task
                        .entry("Config")
                        .or_insert_with(|| Value::Object(Map::new()));
                    if config.is_null() {
                        *config = Value::Object(Map::new());
                    }
                    if let Some(config) = config.as_object_mut() {
                        config.insert("image".to_string(), Value::String(pinned));
                    }
                    let meta = task
                        .entry("Meta")
                        .or_insert_with(|| Value::Object(Map::new()));
                    if meta.is_null() {
                        *meta = Value::Object(Map::new());
                    }
                    if let Some(meta) = meta.as_object_mut() {
                        meta.insert(META_COMPONENT.to_string(), Value::String(component.clone()));
                    }
                    placed.insert(component);
                }
            }
        }
        if let Some(missing) = spec.components.iter().find(|c| !placed.contains(&c.name)) {
            return Err(invalid(format!(
                "job_template: component {:?} matches no task (name a task {:?} or set its Meta \
                 {META_COMPONENT:?} to it)",
                missing.name, missing.name
            )));
        }

        let meta = job
            .entry("Meta")
            .or_insert_with(|| Value::Object(Map::new()));
        if meta.is_null() {
            *meta = Value::Object(Map::new());
        }
        if let Some(meta) = meta.as_object_mut() {
            meta.insert(
                META_RELEASE_ID.to_string(),
                Value::String(spec.release_id.clone()),
            );
            for c in &spec.components {
                meta.insert(
                    format!("{META_DIGEST_PREFIX}{}", c.name),
                    Value::String(c.digest.clone()),
                );
            }
        }
        // serde_json serialises a Map in a fixed order (sorted, or insertion order with
        // preserve_order, which is the template's own order), so equal inputs hash equally.
        let encoded = serde_json::to_vec(&job)
            .map_err(|e| PluginError::Backend(format!("cannot encode the job: {e}")))?;
        let spec_hash = sha256_hex(&encoded);
        if let Some(meta) = job.get_mut("Meta").and_then(Value::as_object_mut) {
            meta.insert(META_SPEC_HASH.to_string(), Value::String(spec_hash.clone()));
            meta.insert(
                META_DEPLOYMENT_ID.to_string(),
                Value::String(spec.deployment_id.clone()),
            );
        }
        Ok(BuiltJob {
            job: Value::Object(job),
            spec_hash,
        })
    }
}

impl BuiltJob {
    /// Keeps the deployment id a job version already carries, so that re-registering the same
    /// release leaves Nomad's spec (and version) untouched.
    pub(crate) fn reuse_deployment_id(&mut self, deployment_id: &str) {
        if let Some(meta) = self.job.get_mut("Meta").and_then(Value::as_object_mut) {
            meta.insert(
                META_DEPLOYMENT_ID.to_string(),
                Value::String(deployment_id.to_string()),
            );
        }
    }

    pub(crate) fn deployment_id(&self) -> Option<&str> {
        self.job
            .get("Meta")
            .and_then(|m| m.get(META_DEPLOYMENT_ID))
            .and_then(Value::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use stella_plugin_sdk::TargetRef;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn spec(components: &[(&str, &str, char)]) -> DeploySpec {
        DeploySpec {
            job_id: "job-1".to_string(),
            deployment_id: "dep-1".to_string(),
            release_id: "rel-1".to_string(),
            release_name: "r1".to_string(),
            target: TargetRef {
                name: "t".to_string(),
                kind: "nomad".to_string(),
                config: Value::Null,
            },
            components: components
                .iter()
                .map(|(n, i, d)| ComponentSpec {
                    name: n.to_string(),
                    image: i.to_string(),
                    digest: digest(*d),
                })
                .collect(),
            strategy: Default::default(),
        }
    }

    fn template() -> Value {
        json!({"Job": {
            "Datacenters": ["dc1"],
            "Meta": {"team": "web"},
            "TaskGroups": [
                {"Name": "web", "Count": 2, "Tasks": [
                    {"Name": "api", "Driver": "docker", "Config": {"image": "demo/api:1", "ports": ["http"]}},
                    {"Name": "proxy", "Driver": "docker", "Config": {"image": "envoy:1.30"}},
                ]},
                {"Name": "jobs", "Tasks": [
                    {"Name": "runner", "Driver": "docker", "Meta": {"stella.component": "worker"}},
                ]},
            ],
        }})
    }

    fn parsed() -> Template {
        parse("job_template", &template(), "web", "default", None).unwrap()
    }

    #[test]
    fn pins_digests_and_sets_meta() {
        let s = spec(&[
            ("api", "registry:5000/demo/api:2", 'a'),
            ("worker", "demo/worker", 'b'),
        ]);
        let built = parsed().build(&s, "web", "default", Some("eu")).unwrap();
        let job = &built.job;
        assert_eq!(job["ID"], "web");
        assert_eq!(job["Name"], "web");
        assert_eq!(job["Namespace"], "default");
        assert_eq!(job["Region"], "eu");
        assert_eq!(job["Datacenters"], json!(["dc1"]));
        let api = &job["TaskGroups"][0]["Tasks"][0];
        assert_eq!(
            api["Config"]["image"],
            format!("registry:5000/demo/api@{}", digest('a'))
        );
        assert_eq!(api["Config"]["ports"], json!(["http"]));
        assert_eq!(api["Meta"]["stella.component"], "api");
        // Not a component: untouched.
        assert_eq!(
            job["TaskGroups"][0]["Tasks"][1]["Config"]["image"],
            "envoy:1.30"
        );
        let runner = &job["TaskGroups"][1]["Tasks"][0];
        assert_eq!(
            runner["Config"]["image"],
            format!("demo/worker@{}", digest('b'))
        );
        let meta = &job["Meta"];
        assert_eq!(meta["team"], "web");
        assert_eq!(meta["stella.release.id"], "rel-1");
        assert_eq!(meta["stella.deployment.id"], "dep-1");
        assert_eq!(meta["stella.digest.api"], digest('a'));
        assert_eq!(meta["stella.digest.worker"], digest('b'));
        assert_eq!(meta["stella.spec.sha256"], built.spec_hash.as_str());
        assert_eq!(runner["Meta"]["stella.component"], "worker");
    }

    #[test]
    fn hash_ignores_the_deployment_but_not_the_release() {
        let t = parsed();
        let mut a = spec(&[("api", "demo/api", 'a')]);
        let h1 = t.build(&a, "web", "default", None).unwrap().spec_hash;
        a.deployment_id = "dep-2".to_string();
        let h2 = t.build(&a, "web", "default", None).unwrap().spec_hash;
        assert_eq!(h1, h2);
        a.release_id = "rel-2".to_string();
        let h3 = t.build(&a, "web", "default", None).unwrap().spec_hash;
        assert_ne!(h1, h3);
        let b = spec(&[("api", "demo/api", 'c')]);
        assert_ne!(h1, t.build(&b, "web", "default", None).unwrap().spec_hash);
    }

    #[test]
    fn unmatched_component_is_refused() {
        let s = spec(&[("db", "postgres", 'a')]);
        match parsed().build(&s, "web", "default", None) {
            Err(PluginError::InvalidConfig(m)) => assert!(m.contains("\"db\""), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn template_errors_name_the_field() {
        let cases = [
            (json!("job {}"), "job_template"),
            (json!({"ID": "other", "TaskGroups": []}), "job_template.ID"),
            (json!({"Namespace": "x"}), "job_template.Namespace"),
            (json!({"Type": "batch"}), "job_template.Type"),
            (json!({"Stop": true}), "job_template.Stop"),
            (
                json!({"Meta": {"stella.release.id": "x"}}),
                "job_template.Meta.stella.release.id",
            ),
            (json!({"Meta": {"a": 1}}), "job_template.Meta.a"),
            (json!({"TaskGroups": []}), "job_template.TaskGroups"),
            (
                json!({"TaskGroups": [{"Tasks": [{"Name": "a"}]}]}),
                "job_template.TaskGroups[0].Name",
            ),
            (
                json!({"TaskGroups": [{"Name": "g", "Count": -1, "Tasks": [{"Name": "a"}]}]}),
                "job_template.TaskGroups[0].Count",
            ),
            (
                json!({"TaskGroups": [{"Name": "g"}]}),
                "job_template.TaskGroups[0].Tasks",
            ),
            (
                json!({"TaskGroups": [{"Name": "g", "Tasks": [{"Name": "a"}, {"Name": "a"}]}]}),
                "job_template.TaskGroups[0].Tasks[1].Name",
            ),
            (
                json!({"TaskGroups": [{"Name": "g", "Tasks": [{"Name": "a", "Config": "x"}]}]}),
                "job_template.TaskGroups[0].Tasks[0].Config",
            ),
            (
                json!({"TaskGroups": [{"Name": "g", "Tasks": [{"Name": "a"}]}, {"Name": "g", "Tasks": [{"Name": "b"}]}]}),
                "job_template.TaskGroups[1].Name",
            ),
        ];
        for (value, field) in cases {
            match parse("job_template", &value, "web", "default", None) {
                Err(PluginError::InvalidConfig(m)) => {
                    assert!(m.contains(field), "{value}: {m:?} does not name {field}")
                }
                other => panic!("{value}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn image_references() {
        assert_eq!(repository_of("demo/app:1"), "demo/app");
        assert_eq!(
            repository_of("registry:5000/demo/app"),
            "registry:5000/demo/app"
        );
        assert_eq!(repository_of("demo/app@sha256:abc"), "demo/app");
        assert_eq!(digest_of("demo/app@sha256:abc"), Some("sha256:abc"));
        assert_eq!(digest_of("demo/app:1"), None);
    }
}
