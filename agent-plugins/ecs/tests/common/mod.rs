//! A moto server per test (moto speaks the real ECS JSON API), plus an SDK client to set up
//! and inspect the cluster from outside the executor.
//!
//! moto comes from the Python test virtualenv (`${STELLA_PY_VENV:-/opt/stella-test-venv}`,
//! `pip install 'moto[server]>=5.2,<5.3'`). Tests fail, never skip, when it is missing.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use aws_sdk_ecs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ecs::types::{
    Compatibility, ContainerDefinition, NetworkMode, Tag, TaskDefinition, TaskDefinitionField,
};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use serde_json::{Value, json};
use stella_plugin_ecs::EcsExecutor;
use stella_plugin_sdk::{ComponentSpec, DeploySpec, ExecutorContext, ProgressSink, TargetRef};

/// Names of the environment variables the test targets take their credentials from.
pub const KEY_ID_ENV: &str = "STELLA_ECS_TEST_ACCESS_KEY_ID";
pub const SECRET_ENV: &str = "STELLA_ECS_TEST_SECRET_ACCESS_KEY";
pub const REGION: &str = "eu-west-1";

static ENV: Once = Once::new();

/// Puts the test credentials into the environment. Every test calls this first, before it
/// starts a runtime or reads the environment, and `Once` serialises the write, so no thread
/// reads the environment while it changes.
pub fn init() {
    ENV.call_once(|| {
        // SAFETY: see above: no other thread of this process touches the environment yet
        // (nextest runs each test in its own process; under `cargo test` all tests wait here).
        unsafe {
            std::env::set_var(KEY_ID_ENV, "AKIDSTELLATEST");
            std::env::set_var(SECRET_ENV, "stella-test-secret");
        }
    });
}

pub fn venv() -> PathBuf {
    PathBuf::from(
        std::env::var("STELLA_PY_VENV").unwrap_or_else(|_| "/opt/stella-test-venv".to_string()),
    )
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") && &buf[9..12] == b"200"
}

pub struct Moto {
    pub port: u16,
    child: Child,
    pub client: aws_sdk_ecs::Client,
}

impl Moto {
    pub async fn start() -> Self {
        init();
        let bin = venv().join("bin/moto_server");
        assert!(
            bin.exists(),
            "{} missing: create the test venv with `python3 -m venv {}` and \
             `{}/bin/pip install 'moto[server]>=5.2,<5.3'` (or set STELLA_PY_VENV)",
            bin.display(),
            venv().display(),
            venv().display()
        );
        // The free port may be taken by a parallel test between probing and moto's bind:
        // retry on a new one.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto_server starts");
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut up = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if answers(port) {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if up {
                let client = sdk_client(&format!("http://127.0.0.1:{port}")).await;
                return Self {
                    port,
                    child,
                    client,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server did not start");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A target config for `service` in `cluster`; `extra` keys override (null removes).
    pub fn config(&self, cluster: &str, service: &str, extra: Value) -> Value {
        let mut v = json!({
            "cluster": cluster,
            "service": service,
            "region": REGION,
            "endpoint_url": self.endpoint(),
            "credentials": {
                "access_key_id_env": KEY_ID_ENV,
                "secret_access_key_env": SECRET_ENV,
            },
            "container_map": {"api": "app"},
            "settle_timeout_secs": 30,
            "poll_interval_secs": 1,
            "connect_timeout_secs": 2,
            "api_timeout_secs": 10,
        });
        for (k, val) in extra.as_object().unwrap() {
            if val.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = val.clone();
            }
        }
        v
    }

    pub fn target(&self, cluster: &str, service: &str, extra: Value) -> TargetRef {
        TargetRef {
            name: format!("ecs-{service}"),
            kind: "ecs".to_string(),
            config: self.config(cluster, service, extra),
        }
    }

    /// A cluster, the base task definition (family `<name>-fam`: containers `web`, `app` and a
    /// sidecar `envoy`) and a service on it with `desired` tasks. Returns (cluster, service).
    pub async fn setup(&self, name: &str, desired: i32) -> (String, String) {
        let cluster = format!("{name}-cluster");
        let service = format!("{name}-svc");
        self.client
            .create_cluster()
            .cluster_name(&cluster)
            .send()
            .await
            .unwrap();
        let container = |name: &str, image: &str, essential: bool| {
            ContainerDefinition::builder()
                .name(name)
                .image(image)
                .memory(128)
                .essential(essential)
                .environment(
                    aws_sdk_ecs::types::KeyValuePair::builder()
                        .name("MODE")
                        .value("prod")
                        .build(),
                )
                .docker_labels("team", "web")
                .build()
        };
        // moto answers 500 to a task definition without cpu and memory.
        let td = self
            .client
            .register_task_definition()
            .family(format!("{name}-fam"))
            .container_definitions(container("web", "registry.example:5000/demo/web:0", true))
            .container_definitions(container("app", "registry.example:5000/demo/api:0", true))
            .container_definitions(container("envoy", "envoyproxy/envoy:v1.31", false))
            .cpu("256")
            .memory("512")
            .network_mode(NetworkMode::Bridge)
            .requires_compatibilities(Compatibility::Ec2)
            .execution_role_arn("arn:aws:iam::123456789012:role/ecs-exec")
            .task_role_arn("arn:aws:iam::123456789012:role/app")
            .tags(Tag::builder().key("team").value("web").build())
            .send()
            .await
            .unwrap();
        let arn = td
            .task_definition()
            .unwrap()
            .task_definition_arn()
            .unwrap()
            .to_string();
        self.client
            .create_service()
            .cluster(&cluster)
            .service_name(&service)
            .task_definition(arn)
            .desired_count(desired)
            .send()
            .await
            .unwrap();
        (cluster, service)
    }

    /// ARNs of a family's revisions, oldest first.
    pub async fn revisions(&self, family: &str) -> Vec<String> {
        let mut arns = self
            .client
            .list_task_definitions()
            .family_prefix(family)
            .send()
            .await
            .unwrap()
            .task_definition_arns()
            .to_vec();
        arns.sort_by_key(|a| a.rsplit(':').next().unwrap().parse::<u32>().unwrap());
        arns
    }

    /// The task definition the service is on, with its tags.
    pub async fn service_task_definition(
        &self,
        cluster: &str,
        service: &str,
    ) -> (TaskDefinition, Vec<Tag>) {
        let svc = self
            .client
            .describe_services()
            .cluster(cluster)
            .services(service)
            .send()
            .await
            .unwrap();
        let arn = svc.services()[0].task_definition().unwrap().to_string();
        let out = self
            .client
            .describe_task_definition()
            .task_definition(arn)
            .include(TaskDefinitionField::Tags)
            .send()
            .await
            .unwrap();
        (out.task_definition().unwrap().clone(), out.tags().to_vec())
    }

    pub async fn service_tags(&self, cluster: &str, service: &str) -> Vec<Tag> {
        let svc = self
            .client
            .describe_services()
            .cluster(cluster)
            .services(service)
            .send()
            .await
            .unwrap();
        let arn = svc.services()[0].service_arn().unwrap().to_string();
        self.client
            .list_tags_for_resource()
            .resource_arn(arn)
            .send()
            .await
            .unwrap()
            .tags()
            .to_vec()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn sdk_client(endpoint: &str) -> aws_sdk_ecs::Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .http_client(http)
        .credentials_provider(Credentials::new("AKIDSETUP", "setup", None, None, "test"))
        .endpoint_url(endpoint)
        .load()
        .await;
    aws_sdk_ecs::Client::new(&shared)
}

pub fn executor() -> EcsExecutor {
    EcsExecutor::new(ExecutorContext {
        state_dir: std::env::temp_dir().join("stella-ecs-test-state"),
    })
}

pub fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

/// Components `web` (container `web`) and `api` (container `app` through `container_map`).
pub fn components(web: char, api: char) -> Vec<ComponentSpec> {
    vec![
        ComponentSpec {
            name: "web".to_string(),
            image: "registry.example:5000/demo/web:1".to_string(),
            digest: digest(web),
        },
        ComponentSpec {
            name: "api".to_string(),
            image: "registry.example:5000/demo/api:1".to_string(),
            digest: digest(api),
        },
    ]
}

pub fn spec(target: &TargetRef, release: &str, components: Vec<ComponentSpec>) -> DeploySpec {
    DeploySpec {
        job_id: format!("job-{release}"),
        deployment_id: format!("dep-{release}"),
        release_id: release.to_string(),
        release_name: format!("Release {release}"),
        target: target.clone(),
        components,
        strategy: Default::default(),
    }
}

#[derive(Default)]
pub struct Recorder(Mutex<Vec<String>>);

impl ProgressSink for Recorder {
    fn progress(&self, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

impl Recorder {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}
