//! Shared test helpers: the fake Nomad server, a test CA, release specs and a progress
//! collector.

#![allow(dead_code)]

pub mod fake_nomad;
pub mod pki;

use std::sync::Mutex;

use serde_json::{Value, json};
use stella_plugin_nomad::NomadExecutor;
use stella_plugin_sdk::{ComponentSpec, DeploySpec, ExecutorContext, ProgressSink, TargetRef};

pub use fake_nomad::{FakeNomad, Options, Recorded, ServerTls};

pub const TOKEN: &str = "3f6c2b7e-0b7e-4d1a-9a51-5b6f0e1c2d3a";

pub fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

pub struct Env {
    pub executor: NomadExecutor,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let executor = NomadExecutor::new(ExecutorContext {
            state_dir: dir.path().join("state"),
        });
        Self { executor, dir }
    }

    /// A token file holding `token`.
    pub fn token_file(&self, token: &str) -> String {
        pki::write(&self.dir, "nomad-token", &format!("{token}\n"))
            .display()
            .to_string()
    }
}

/// Two groups: `web` runs component `api` (count 2) and a sidecar that is no component;
/// `background` runs component `worker` in a task with another name.
pub fn template() -> Value {
    json!({"Job": {
        "Datacenters": ["dc1"],
        "Meta": {"team": "web"},
        "TaskGroups": [
            {"Name": "web", "Count": 2, "Tasks": [
                {"Name": "api", "Driver": "docker", "Config": {"image": "registry.local/demo/api:latest", "ports": ["http"]}},
                {"Name": "proxy", "Driver": "docker", "Config": {"image": "envoyproxy/envoy:v1.30"}},
            ]},
            {"Name": "background", "Count": 1, "Tasks": [
                {"Name": "runner", "Driver": "docker", "Meta": {"stella.component": "worker"}, "Config": {"image": "registry.local/demo/worker"}},
            ]},
        ],
    }})
}

pub fn target(config: Value) -> TargetRef {
    TargetRef {
        name: "nomad-web".to_string(),
        kind: "nomad".to_string(),
        config,
    }
}

/// Config for `server` with the default template and the test token in a file.
pub fn config(env: &Env, server: &FakeNomad) -> Value {
    json!({
        "address": server.address(),
        "job_id": "web",
        "token_file": env.token_file(TOKEN),
        "job_template": template(),
        "deploy_timeout_secs": 30,
        "request_timeout_secs": 5,
    })
}

/// Release `n`: components `api` and `worker` with digests made of `api`/`worker` characters.
pub fn release(config: &Value, n: u32, api: char, worker: char) -> DeploySpec {
    DeploySpec {
        job_id: format!("job-{n}"),
        deployment_id: format!("dep-{n}"),
        release_id: format!("rel-{n}"),
        release_name: format!("release {n}"),
        target: target(config.clone()),
        components: vec![
            ComponentSpec {
                name: "api".to_string(),
                image: format!("registry.local/demo/api:{n}"),
                digest: digest(api),
            },
            ComponentSpec {
                name: "worker".to_string(),
                image: format!("registry.local/demo/worker:{n}"),
                digest: digest(worker),
            },
        ],
        strategy: Default::default(),
    }
}

#[derive(Default)]
pub struct Progress(pub Mutex<Vec<String>>);

impl ProgressSink for Progress {
    fn progress(&self, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

impl Progress {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }
}

/// Requests to `path_prefix` the server saw.
pub fn requests_to(server: &FakeNomad, method: &str, path_prefix: &str) -> Vec<Recorded> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.method == method && r.path.starts_with(path_prefix))
        .collect()
}
