//! An in-process stand-in for a Nomad server's HTTP API, for the endpoints the executor uses
//! (no Nomad binary can be had where these tests run).
//!
//! It follows the shapes of Nomad's published API: `GET/POST /v1/job/:id` (register with
//! `{"Job", "EnforceIndex", "JobModifyIndex"}`), `GET /v1/job/:id/versions`,
//! `GET /v1/job/:id/deployment`, `GET /v1/job/:id/allocations`, `POST /v1/job/:id/revert`,
//! `GET /v1/deployment/:id`, `POST /v1/deployment/promote/:id`,
//! `POST /v1/deployment/fail/:id`, `GET/PUT /v1/var/:path`; objects use Nomad's field names;
//! errors are plain-text bodies with Nomad's status codes (403 `Permission denied` /
//! `ACL token not found`, 404 `job not found`, 500 for RPC errors such as a failed
//! check-and-set). Every response carries `X-Nomad-Index`; a GET with `index` at or above the
//! current index blocks until the index moves or `wait` (Go duration, default 5m, capped here
//! at 30s) runs out.
//!
//! Scheduling is simulated deterministically, one step per `step` interval: a registration that
//! changes the spec creates version N+1 and a `running` deployment; each step moves each
//! allocation one stage (placed `pending` → `running` → healthy), so the order of events is
//! always the same. An allocation whose task image contains a string of the "failing" set fails
//! to start and turns unhealthy, which fails the deployment; one in the "stalled" set runs but
//! never turns healthy. Groups with `Update.Canary` place canaries first on an update and wait
//! for a promotion (`Update.AutoPromote` promotes by itself). A healthy new allocation stops
//! one of an older version; a successful deployment marks the version stable and stops the
//! rest. Revert registers an earlier version's spec as a new version. Tests can make the next
//! reads of a path fail with 500 "No cluster leader", as during a leader election.
//!
//! What a real Nomad adds: placement on real client nodes (constraints, resources, drivers
//! pulling images), health from task state and Consul/Nomad service checks over
//! `min_healthy_time`/`healthy_deadline`, `progress_deadline` failing stuck deployments by
//! itself, `auto_revert`, rescheduling of failed allocations, in-place updates, evaluations,
//! multi-region, per-table indexes with jittered waits, ACL policies with capabilities (here a
//! single token allows everything), and variable encryption and locks.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};

const MAX_WAIT: Duration = Duration::from_secs(30);
const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// TLS for the fake server.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// When set, clients must present a certificate signed by this CA (mTLS).
    pub client_ca_pem: Option<String>,
}

#[derive(Clone)]
pub struct Options {
    /// ACL token every request must carry; None: ACLs off.
    pub token: Option<String>,
    /// Time between two scheduler steps.
    pub step: Duration,
    pub tls: Option<ServerTls>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            token: None,
            step: Duration::from_millis(20),
            tls: None,
        }
    }
}

/// A request the server saw.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub token: Option<String>,
    pub body: Option<Value>,
}

#[derive(Debug, Clone, Default)]
struct DepGroup {
    auto_promote: bool,
    promoted: bool,
    desired_canaries: u64,
    desired_total: u64,
    placed_allocs: u64,
    healthy_allocs: u64,
    unhealthy_allocs: u64,
    placed_canaries: Vec<String>,
}

#[derive(Debug, Clone)]
struct Deployment {
    id: String,
    namespace: String,
    job_id: String,
    job_version: u64,
    status: String,
    description: String,
    groups: BTreeMap<String, DepGroup>,
    create_index: u64,
    modify_index: u64,
}

impl Deployment {
    fn active(&self) -> bool {
        self.status == "running"
    }

    fn to_json(&self) -> Value {
        let groups: serde_json::Map<String, Value> = self
            .groups
            .iter()
            .map(|(name, g)| {
                (
                    name.clone(),
                    json!({
                        "AutoRevert": false,
                        "AutoPromote": g.auto_promote,
                        "ProgressDeadline": 600_000_000_000u64,
                        "Promoted": g.promoted,
                        "PlacedCanaries": if g.placed_canaries.is_empty() { Value::Null } else { json!(g.placed_canaries) },
                        "DesiredCanaries": g.desired_canaries,
                        "DesiredTotal": g.desired_total,
                        "PlacedAllocs": g.placed_allocs,
                        "HealthyAllocs": g.healthy_allocs,
                        "UnhealthyAllocs": g.unhealthy_allocs,
                    }),
                )
            })
            .collect();
        json!({
            "ID": self.id,
            "Namespace": self.namespace,
            "JobID": self.job_id,
            "JobVersion": self.job_version,
            "JobModifyIndex": self.create_index,
            "JobSpecModifyIndex": self.create_index,
            "JobCreateIndex": self.create_index,
            "IsMultiregion": false,
            "TaskGroups": groups,
            "Status": self.status,
            "StatusDescription": self.description,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        })
    }
}

#[derive(Debug, Clone)]
struct TaskRun {
    state: String,
    failed: bool,
    events: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct Alloc {
    id: String,
    namespace: String,
    job_id: String,
    job_version: u64,
    group: String,
    index_in_group: u64,
    /// task name → image.
    tasks: Vec<(String, String)>,
    client_status: String,
    desired_status: String,
    task_states: BTreeMap<String, TaskRun>,
    deployment_id: Option<String>,
    healthy: Option<bool>,
    canary: bool,
    create_index: u64,
    modify_index: u64,
}

impl Alloc {
    fn to_json(&self) -> Value {
        let states: serde_json::Map<String, Value> = self
            .task_states
            .iter()
            .map(|(task, s)| {
                let events: Vec<Value> = s
                    .events
                    .iter()
                    .map(|(kind, msg)| json!({"Type": kind, "DisplayMessage": msg, "Time": 0}))
                    .collect();
                (
                    task.clone(),
                    json!({"State": s.state, "Failed": s.failed, "Restarts": 0, "Events": events}),
                )
            })
            .collect();
        json!({
            "ID": self.id,
            "EvalID": format!("eval-{}", self.id),
            "Name": format!("{}.{}[{}]", self.job_id, self.group, self.index_in_group),
            "Namespace": self.namespace,
            "NodeID": "node-0000-0000-0000-000000000001",
            "NodeName": "fake-node",
            "JobID": self.job_id,
            "JobType": "service",
            "JobVersion": self.job_version,
            "TaskGroup": self.group,
            "DesiredStatus": self.desired_status,
            "DesiredDescription": "",
            "ClientStatus": self.client_status,
            "ClientDescription": "",
            "TaskStates": if states.is_empty() { Value::Null } else { Value::Object(states) },
            "DeploymentStatus": if self.deployment_id.is_some() {
                json!({"Healthy": self.healthy, "Canary": self.canary, "Timestamp": "0001-01-01T00:00:00Z", "ModifyIndex": self.modify_index})
            } else { Value::Null },
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
            "CreateTime": 0,
            "ModifyTime": 0,
        })
    }

    fn terminal(&self) -> bool {
        matches!(self.client_status.as_str(), "complete" | "failed" | "lost")
            || self.desired_status != "run"
    }
}

#[derive(Default)]
struct StateInner {
    index: u64,
    next_id: u64,
    /// (namespace, job id) → versions, oldest first.
    jobs: BTreeMap<(String, String), Vec<Value>>,
    deployments: Vec<Deployment>,
    allocs: Vec<Alloc>,
    variables: BTreeMap<(String, String), Value>,
    failing: Vec<String>,
    stalled: Vec<String>,
    /// (path prefix, how many more GETs to it answer 500 "No cluster leader").
    leaderless: Vec<(String, u32)>,
    requests: Vec<Recorded>,
}

impl StateInner {
    fn new_id(&mut self) -> String {
        self.next_id += 1;
        let n = self.next_id;
        format!("{n:08x}-0000-4000-8000-{n:012x}")
    }
}

struct Shared {
    state: Mutex<StateInner>,
    index_tx: watch::Sender<u64>,
    work: Notify,
    token: Option<String>,
    step: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, StateInner> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits a change: a new index for everyone blocked on the old one.
    fn bump(&self, st: &mut StateInner) -> u64 {
        st.index += 1;
        let index = st.index;
        self.index_tx.send_replace(index);
        index
    }
}

pub struct FakeNomad {
    pub addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeNomad {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl FakeNomad {
    pub async fn start(options: Options) -> Self {
        let (index_tx, _) = watch::channel(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(StateInner {
                index: 1,
                ..Default::default()
            }),
            index_tx,
            work: Notify::new(),
            token: options.token.clone(),
            step: options.step,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let acceptor = options.tls.as_ref().map(tls_acceptor);
        let server = tokio::spawn(serve(listener, app, acceptor));
        let scheduler = tokio::spawn(schedule(shared.clone()));
        Self {
            addr,
            tls: options.tls.is_some(),
            shared,
            tasks: vec![server, scheduler],
        }
    }

    pub fn address(&self) -> String {
        format!(
            "{}://127.0.0.1:{}",
            if self.tls { "https" } else { "http" },
            self.addr.port()
        )
    }

    /// Allocations whose task image contains `needle` fail to start.
    pub fn fail_image(&self, needle: &str) {
        self.shared.lock().failing.push(needle.to_string());
    }

    /// Allocations whose task image contains `needle` run but never turn healthy.
    pub fn stall_image(&self, needle: &str) {
        self.shared.lock().stalled.push(needle.to_string());
    }

    /// The next `count` GETs to paths starting with `prefix` fail as during a leader
    /// election.
    pub fn fail_reads(&self, prefix: &str, count: u32) {
        self.shared
            .lock()
            .leaderless
            .push((prefix.to_string(), count));
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// The current version of a job in namespace `default`.
    pub fn job(&self, id: &str) -> Option<Value> {
        self.job_in("default", id)
    }

    pub fn job_in(&self, namespace: &str, id: &str) -> Option<Value> {
        self.shared
            .lock()
            .jobs
            .get(&(namespace.to_string(), id.to_string()))
            .and_then(|v| v.last().cloned())
    }

    /// All versions, oldest first.
    pub fn versions(&self, id: &str) -> Vec<Value> {
        self.shared
            .lock()
            .jobs
            .get(&("default".to_string(), id.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// All deployments, oldest first.
    pub fn deployments(&self) -> Vec<Value> {
        self.shared
            .lock()
            .deployments
            .iter()
            .map(Deployment::to_json)
            .collect()
    }

    pub fn allocations(&self) -> Vec<Value> {
        self.shared
            .lock()
            .allocs
            .iter()
            .map(Alloc::to_json)
            .collect()
    }

    pub fn variable(&self, path: &str) -> Option<Value> {
        self.shared
            .lock()
            .variables
            .get(&("default".to_string(), path.to_string()))
            .cloned()
    }
}

fn tls_acceptor(tls: &ServerTls) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("server cert pem");
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).expect("server key pem");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match &tls.client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(c.expect("client ca pem")).expect("client ca");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .expect("server cert and key");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn serve(listener: TcpListener, app: Router, tls: Option<tokio_rustls::TlsAcceptor>) {
    // Dropped (and with it every connection) when the server task is aborted.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let service = TowerToHyperService::new(app.clone());
        let tls = tls.clone();
        connections.spawn(async move {
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

/// Go duration as Nomad accepts for `wait` (`10s`, `500ms`, `5m`).
fn parse_wait(text: &str) -> Option<Duration> {
    let (num, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))?;
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(status: StatusCode, index: u64, message: &str) -> Response {
    let mut r = (status, message.to_string()).into_response();
    r.headers_mut()
        .insert("X-Nomad-Index", HeaderValue::from(index));
    r
}

fn reply(index: u64, body: Value) -> Response {
    let mut r = axum::Json(body).into_response();
    let h = r.headers_mut();
    h.insert("X-Nomad-Index", HeaderValue::from(index));
    h.insert("X-Nomad-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Nomad-LastContact", HeaderValue::from_static("0"));
    r
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers
        .get("X-Nomad-Token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body_json: Option<Value> = serde_json::from_slice(&body).ok();
    let path = uri.path().to_string();
    {
        let mut st = shared.lock();
        st.requests.push(Recorded {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            token: token.clone(),
            body: body_json.clone(),
        });
    }
    let current = shared.lock().index;
    if let Some(want) = &shared.token {
        match &token {
            None => return text(StatusCode::FORBIDDEN, current, "Permission denied"),
            Some(t) if t != want => {
                return text(StatusCode::FORBIDDEN, current, "ACL token not found");
            }
            Some(_) => {}
        }
    }
    if let Some(region) = query.get("region")
        && region != "global"
    {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            current,
            &format!("No path to region {region:?}"),
        );
    }
    if method == Method::GET {
        let mut st = shared.lock();
        if let Some(entry) = st
            .leaderless
            .iter_mut()
            .find(|(prefix, left)| *left > 0 && path.starts_with(prefix.as_str()))
        {
            entry.1 -= 1;
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                current,
                "No cluster leader",
            );
        }
    }
    let namespace = query
        .get("namespace")
        .cloned()
        .unwrap_or_else(|| "default".to_string());

    // Blocking query: wait for the index to pass the one the client has seen.
    if method == Method::GET
        && let Some(min) = query.get("index").and_then(|i| i.parse::<u64>().ok())
        && min > 0
    {
        let wait = query
            .get("wait")
            .and_then(|w| parse_wait(w))
            .unwrap_or(DEFAULT_WAIT)
            .min(MAX_WAIT);
        let mut rx = shared.index_tx.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|i| *i > min)).await;
    }

    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (method.clone(), seg.as_slice()) {
        (Method::GET, ["v1", "job", id]) => get_job(&shared, &namespace, id),
        (Method::POST | Method::PUT, ["v1", "job", id]) => {
            register(&shared, &namespace, id, body_json)
        }
        (Method::GET, ["v1", "job", id, "versions"]) => versions(&shared, &namespace, id),
        (Method::GET, ["v1", "job", id, "deployment"]) => {
            latest_deployment(&shared, &namespace, id)
        }
        (Method::GET, ["v1", "job", id, "allocations"]) => allocations(&shared, &namespace, id),
        (Method::POST | Method::PUT, ["v1", "job", id, "revert"]) => {
            revert(&shared, &namespace, id, body_json)
        }
        (Method::GET, ["v1", "deployment", id]) => get_deployment(&shared, id),
        (Method::POST | Method::PUT, ["v1", "deployment", "promote", id]) => {
            promote(&shared, id, body_json)
        }
        (Method::POST | Method::PUT, ["v1", "deployment", "fail", id]) => fail(&shared, id),
        (Method::GET, ["v1", "var", rest @ ..]) if !rest.is_empty() => {
            get_variable(&shared, &namespace, &rest.join("/"))
        }
        (Method::PUT | Method::POST, ["v1", "var", rest @ ..]) if !rest.is_empty() => {
            put_variable(&shared, &namespace, &rest.join("/"), body_json)
        }
        _ => text(StatusCode::NOT_FOUND, current, "Invalid URL"),
    }
}

fn key(namespace: &str, id: &str) -> (String, String) {
    (namespace.to_string(), id.to_string())
}

fn get_job(shared: &Shared, namespace: &str, id: &str) -> Response {
    let st = shared.lock();
    match st.jobs.get(&key(namespace, id)).and_then(|v| v.last()) {
        Some(job) => reply(st.index, job.clone()),
        None => text(StatusCode::NOT_FOUND, st.index, "job not found"),
    }
}

fn versions(shared: &Shared, namespace: &str, id: &str) -> Response {
    let st = shared.lock();
    match st.jobs.get(&key(namespace, id)) {
        Some(v) => {
            let newest_first: Vec<Value> = v.iter().rev().cloned().collect();
            reply(st.index, json!({"Versions": newest_first, "Diffs": null}))
        }
        None => text(StatusCode::NOT_FOUND, st.index, "job versions not found"),
    }
}

fn latest_deployment(shared: &Shared, namespace: &str, id: &str) -> Response {
    let st = shared.lock();
    let latest = st
        .deployments
        .iter()
        .filter(|d| d.namespace == namespace && d.job_id == id)
        .max_by_key(|d| d.create_index)
        .map(Deployment::to_json)
        .unwrap_or(Value::Null);
    reply(st.index, latest)
}

fn get_deployment(shared: &Shared, id: &str) -> Response {
    let st = shared.lock();
    match st.deployments.iter().find(|d| d.id == id) {
        Some(d) => reply(st.index, d.to_json()),
        None => text(StatusCode::NOT_FOUND, st.index, "deployment not found"),
    }
}

fn allocations(shared: &Shared, namespace: &str, id: &str) -> Response {
    let st = shared.lock();
    let list: Vec<Value> = st
        .allocs
        .iter()
        .filter(|a| a.namespace == namespace && a.job_id == id)
        .map(Alloc::to_json)
        .collect();
    reply(st.index, Value::Array(list))
}

/// Fields Nomad sets itself; they never count as a spec change.
const SERVER_FIELDS: [&str; 8] = [
    "Version",
    "Stable",
    "Status",
    "StatusDescription",
    "CreateIndex",
    "ModifyIndex",
    "JobModifyIndex",
    "SubmitTime",
];

fn spec_of(job: &Value) -> Value {
    let mut spec = job.clone();
    if let Some(m) = spec.as_object_mut() {
        for f in SERVER_FIELDS {
            m.remove(f);
        }
    }
    spec
}

/// Fills the defaults Nomad's canonicalisation adds, so equal submissions compare equal.
fn canonicalize(job: &mut Value, namespace: &str) {
    let Some(m) = job.as_object_mut() else { return };
    let id = m.get("ID").cloned().unwrap_or(Value::Null);
    m.entry("Name").or_insert(id);
    m.insert("Namespace".to_string(), json!(namespace));
    m.entry("Region").or_insert(json!("global"));
    m.entry("Type").or_insert(json!("service"));
    m.entry("Priority").or_insert(json!(50));
    m.entry("Stop").or_insert(json!(false));
    m.entry("Meta").or_insert(Value::Null);
    if let Some(groups) = m.get_mut("TaskGroups").and_then(Value::as_array_mut) {
        for g in groups.iter_mut().filter_map(Value::as_object_mut) {
            g.entry("Count").or_insert(json!(1));
            g.entry("Meta").or_insert(Value::Null);
            if let Some(tasks) = g.get_mut("Tasks").and_then(Value::as_array_mut) {
                for t in tasks.iter_mut().filter_map(Value::as_object_mut) {
                    t.entry("Meta").or_insert(Value::Null);
                    t.entry("Config").or_insert(Value::Null);
                }
            }
        }
    }
}

fn task_images(job: &Value, group: &str) -> Vec<(String, String)> {
    job["TaskGroups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["Name"] == group)
        .flat_map(|g| g["Tasks"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            (
                t["Name"].as_str().unwrap_or_default().to_string(),
                t["Config"]["image"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

/// Stores `job` as the job's next version if its spec changed (as Nomad does: an identical
/// registration keeps the version). Returns the write's index.
fn upsert(shared: &Shared, st: &mut StateInner, namespace: &str, mut job: Value) -> u64 {
    canonicalize(&mut job, namespace);
    let id = job["ID"].as_str().unwrap_or_default().to_string();
    let k = key(namespace, &id);
    let existing = st.jobs.get(&k).and_then(|v| v.last()).cloned();
    let changed = existing
        .as_ref()
        .is_none_or(|e| spec_of(e) != spec_of(&job));
    let index = shared.bump(st);
    if !changed {
        let versions = st.jobs.get_mut(&k).expect("existing job");
        let last = versions.last_mut().expect("a version");
        last["ModifyIndex"] = json!(index);
        return index;
    }
    let version = existing
        .as_ref()
        .map_or(0, |e| e["Version"].as_u64().unwrap_or(0) + 1);
    let m = job.as_object_mut().expect("job object");
    m.insert("Version".to_string(), json!(version));
    m.insert("Stable".to_string(), json!(false));
    m.insert("Status".to_string(), json!("running"));
    m.insert("StatusDescription".to_string(), json!(""));
    m.insert("JobModifyIndex".to_string(), json!(index));
    m.insert("ModifyIndex".to_string(), json!(index));
    m.insert(
        "CreateIndex".to_string(),
        existing
            .as_ref()
            .map_or(json!(index), |e| e["CreateIndex"].clone()),
    );
    m.insert("SubmitTime".to_string(), json!(index));
    st.jobs.entry(k).or_default().push(job.clone());

    // A newer version cancels the deployment of an older one.
    for d in st
        .deployments
        .iter_mut()
        .filter(|d| d.namespace == namespace && d.job_id == id && d.active())
    {
        d.status = "cancelled".to_string();
        d.description = "Cancelled due to newer version of job".to_string();
        d.modify_index = index;
    }
    let mut groups = BTreeMap::new();
    for g in job["TaskGroups"].as_array().into_iter().flatten() {
        let name = g["Name"].as_str().unwrap_or_default().to_string();
        let has_old = st.allocs.iter().any(|a| {
            a.namespace == namespace && a.job_id == id && a.group == name && !a.terminal()
        });
        // Canaries only make sense for an update: a first placement has nothing to protect.
        let canaries = if has_old {
            g["Update"]["Canary"].as_u64().unwrap_or(0)
        } else {
            0
        };
        groups.insert(
            name,
            DepGroup {
                auto_promote: g["Update"]["AutoPromote"].as_bool().unwrap_or(false),
                desired_canaries: canaries,
                desired_total: g["Count"].as_u64().unwrap_or(1),
                ..Default::default()
            },
        );
    }
    let dep_id = st.new_id();
    st.deployments.push(Deployment {
        id: dep_id,
        namespace: namespace.to_string(),
        job_id: id,
        job_version: version,
        status: "running".to_string(),
        description: "Deployment is running".to_string(),
        groups,
        create_index: index,
        modify_index: index,
    });
    shared.work.notify_one();
    index
}

fn register(shared: &Shared, namespace: &str, id: &str, body: Option<Value>) -> Response {
    let mut st = shared.lock();
    let index = st.index;
    let Some(body) = body else {
        return text(StatusCode::BAD_REQUEST, index, "Request body is not JSON");
    };
    let Some(job) = body.get("Job").filter(|j| j.is_object()).cloned() else {
        return text(StatusCode::BAD_REQUEST, index, "Job must be specified");
    };
    match job["ID"].as_str() {
        None => {
            return text(
                StatusCode::BAD_REQUEST,
                index,
                "Job ID hasn't been provided",
            );
        }
        Some(job_id) if job_id != id => {
            return text(StatusCode::BAD_REQUEST, index, "Job ID does not match name");
        }
        Some(_) => {}
    }
    let namespace = job["Namespace"].as_str().unwrap_or(namespace).to_string();
    if body["EnforceIndex"].as_bool() == Some(true) {
        let want = body["JobModifyIndex"].as_u64().unwrap_or(0);
        let existing = st
            .jobs
            .get(&key(&namespace, id))
            .and_then(|v| v.last())
            .map(|j| j["JobModifyIndex"].as_u64().unwrap_or(0));
        let conflict = match (want, existing) {
            (0, Some(_)) => Some("job already exists".to_string()),
            (w, None) if w != 0 => Some("job does not exist".to_string()),
            (w, Some(e)) if w != e => {
                Some(format!("job exists with conflicting job modify index: {e}"))
            }
            _ => None,
        };
        if let Some(c) = conflict {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                index,
                &format!("Enforcing job modify index {want}: {c}"),
            );
        }
    }
    let index = upsert(shared, &mut st, &namespace, job);
    let job_modify_index = st
        .jobs
        .get(&key(&namespace, id))
        .and_then(|v| v.last())
        .map(|j| j["JobModifyIndex"].clone())
        .unwrap_or(Value::Null);
    let eval = st.new_id();
    reply(
        index,
        json!({
            "EvalID": eval,
            "EvalCreateIndex": index,
            "JobModifyIndex": job_modify_index,
            "Warnings": "",
            "Index": index,
            "LastContact": 0,
            "KnownLeader": true,
        }),
    )
}

fn revert(shared: &Shared, namespace: &str, id: &str, body: Option<Value>) -> Response {
    let mut st = shared.lock();
    let index = st.index;
    let Some(body) = body else {
        return text(StatusCode::BAD_REQUEST, index, "Request body is not JSON");
    };
    match body["JobID"].as_str() {
        None | Some("") => return text(StatusCode::BAD_REQUEST, index, "JobID must be specified"),
        Some(j) if j != id => return text(StatusCode::BAD_REQUEST, index, "Job ID does not match"),
        Some(_) => {}
    }
    let Some(versions) = st.jobs.get(&key(namespace, id)) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, index, "job not found");
    };
    let current = versions
        .last()
        .and_then(|j| j["Version"].as_u64())
        .unwrap_or(0);
    let want = body["JobVersion"].as_u64().unwrap_or(0);
    if want == current {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            index,
            "can't revert to current version",
        );
    }
    if let Some(prior) = body["EnforcePriorVersion"].as_u64()
        && prior != current
    {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            index,
            &format!("current job has version {current}; enforcing version {prior}"),
        );
    }
    let Some(old) = versions
        .iter()
        .find(|j| j["Version"].as_u64() == Some(want))
        .cloned()
    else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            index,
            &format!("job version {want} not found"),
        );
    };
    let index = upsert(shared, &mut st, namespace, old);
    let eval = st.new_id();
    reply(
        index,
        json!({"EvalID": eval, "EvalCreateIndex": index, "JobModifyIndex": index, "Warnings": "", "Index": index}),
    )
}

fn promote(shared: &Shared, id: &str, body: Option<Value>) -> Response {
    let mut st = shared.lock();
    let index = st.index;
    if body
        .as_ref()
        .and_then(|b| b["DeploymentID"].as_str())
        .is_some_and(|b| b != id)
    {
        return text(
            StatusCode::BAD_REQUEST,
            index,
            "Deployment ID does not match",
        );
    }
    let Some(pos) = st.deployments.iter().position(|d| d.id == id) else {
        return text(StatusCode::NOT_FOUND, index, "deployment not found");
    };
    let d = &st.deployments[pos];
    if !d.active() {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            index,
            "can't promote terminal deployment",
        );
    }
    let waiting: Vec<String> = d
        .groups
        .iter()
        .filter(|(_, g)| g.desired_canaries > 0 && !g.promoted)
        .map(|(n, _)| n.clone())
        .collect();
    if waiting.is_empty() {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            index,
            "no canaries to promote",
        );
    }
    for name in &waiting {
        let g = &d.groups[name];
        if g.healthy_allocs < g.desired_canaries {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                index,
                &format!(
                    "Task group {name:?} has {}/{} healthy allocations",
                    g.healthy_allocs, g.desired_canaries
                ),
            );
        }
    }
    let index = shared.bump(&mut st);
    let d = &mut st.deployments[pos];
    for name in &waiting {
        if let Some(g) = d.groups.get_mut(name) {
            g.promoted = true;
        }
    }
    d.description = "Deployment is running".to_string();
    d.modify_index = index;
    shared.work.notify_one();
    let eval = st.new_id();
    reply(
        index,
        json!({"EvalID": eval, "EvalCreateIndex": index, "DeploymentModifyIndex": index, "Index": index}),
    )
}

fn fail(shared: &Shared, id: &str) -> Response {
    let mut st = shared.lock();
    let index = st.index;
    let Some(pos) = st.deployments.iter().position(|d| d.id == id) else {
        return text(StatusCode::NOT_FOUND, index, "deployment not found");
    };
    if !st.deployments[pos].active() {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            index,
            "can't fail terminal deployment",
        );
    }
    let index = shared.bump(&mut st);
    let d = &mut st.deployments[pos];
    d.status = "failed".to_string();
    d.description = "Deployment marked as failed".to_string();
    d.modify_index = index;
    let eval = st.new_id();
    reply(
        index,
        json!({"EvalID": eval, "EvalCreateIndex": index, "DeploymentModifyIndex": index, "Index": index}),
    )
}

fn get_variable(shared: &Shared, namespace: &str, path: &str) -> Response {
    let st = shared.lock();
    match st.variables.get(&key(namespace, path)) {
        Some(v) => reply(st.index, v.clone()),
        None => text(StatusCode::NOT_FOUND, st.index, "variable not found"),
    }
}

fn put_variable(shared: &Shared, namespace: &str, path: &str, body: Option<Value>) -> Response {
    let mut st = shared.lock();
    let index = st.index;
    let Some(body) = body else {
        return text(StatusCode::BAD_REQUEST, index, "Request body is not JSON");
    };
    let valid_path = path.len() <= 128
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '~' | '/'));
    if !valid_path {
        return text(
            StatusCode::BAD_REQUEST,
            index,
            &format!("invalid path {path:?}"),
        );
    }
    let Some(items) = body["Items"].as_object().filter(|i| !i.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            index,
            "variable missing required Items object",
        );
    };
    if items.values().any(|v| !v.is_string()) {
        return text(
            StatusCode::BAD_REQUEST,
            index,
            "json: cannot unmarshal into Go struct field VariableDecrypted.Items of type string",
        );
    }
    let size: usize = items
        .iter()
        .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
        .sum();
    if size > 65_536 {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            index,
            "variables are limited to 64KiB in total size",
        );
    }
    let index = shared.bump(&mut st);
    let create_index = st
        .variables
        .get(&key(namespace, path))
        .map_or(json!(index), |v| v["CreateIndex"].clone());
    let variable = json!({
        "Namespace": namespace,
        "Path": path,
        "Items": items,
        "CreateIndex": create_index,
        "ModifyIndex": index,
        "CreateTime": 0,
        "ModifyTime": 0,
    });
    st.variables.insert(key(namespace, path), variable.clone());
    reply(index, variable)
}

/// The scheduler: one step every `step` while a deployment runs.
async fn schedule(shared: Arc<Shared>) {
    loop {
        let active = shared.lock().deployments.iter().any(Deployment::active);
        if !active {
            shared.work.notified().await;
            continue;
        }
        tokio::time::sleep(shared.step).await;
        let mut st = shared.lock();
        if step(&mut st) {
            shared.bump(&mut st);
            // Stamp what changed with the new index.
            let index = st.index;
            for d in st.deployments.iter_mut().filter(|d| d.modify_index == 0) {
                d.modify_index = index;
            }
            for a in st.allocs.iter_mut().filter(|a| a.modify_index == 0) {
                a.modify_index = index;
            }
        }
    }
}

fn matches_any(images: &[(String, String)], needles: &[String]) -> bool {
    images
        .iter()
        .any(|(_, image)| needles.iter().any(|n| image.contains(n.as_str())))
}

/// Advances every running deployment by one stage. Returns whether anything changed.
fn step(st: &mut StateInner) -> bool {
    let mut changed = false;
    let failing = st.failing.clone();
    let stalled = st.stalled.clone();
    let active: Vec<usize> = (0..st.deployments.len())
        .filter(|i| st.deployments[*i].active())
        .collect();
    for di in active {
        let d = st.deployments[di].clone();
        let Some(job) = st
            .jobs
            .get(&key(&d.namespace, &d.job_id))
            .and_then(|v| {
                v.iter()
                    .find(|j| j["Version"].as_u64() == Some(d.job_version))
            })
            .cloned()
        else {
            continue;
        };
        let mut groups = d.groups.clone();
        for (gname, g) in groups.iter_mut() {
            let images = task_images(&job, gname);
            // 1. Health of allocations that were already running or failed.
            let mut newly_healthy = 0;
            for a in st
                .allocs
                .iter_mut()
                .filter(|a| a.deployment_id.as_deref() == Some(d.id.as_str()) && &a.group == gname)
            {
                if a.healthy.is_some() {
                    continue;
                }
                if a.client_status == "running" && !matches_any(&a.tasks, &stalled) {
                    a.healthy = Some(true);
                    a.modify_index = 0;
                    g.healthy_allocs += 1;
                    if !a.canary {
                        newly_healthy += 1;
                    }
                    changed = true;
                } else if a.client_status == "failed" {
                    a.healthy = Some(false);
                    a.modify_index = 0;
                    g.unhealthy_allocs += 1;
                    changed = true;
                }
            }
            // A healthy replacement takes over from one allocation of an older version.
            for _ in 0..newly_healthy {
                if let Some(old) = st.allocs.iter_mut().find(|a| {
                    a.namespace == d.namespace
                        && a.job_id == d.job_id
                        && &a.group == gname
                        && a.job_version != d.job_version
                        && !a.terminal()
                }) {
                    stop(old);
                }
            }
            // 2. Start what was placed in an earlier step.
            for a in st.allocs.iter_mut().filter(|a| {
                a.deployment_id.as_deref() == Some(d.id.as_str())
                    && &a.group == gname
                    && a.client_status == "pending"
            }) {
                let fails = matches_any(&a.tasks, &failing);
                for (task, image) in &a.tasks {
                    let run = a.task_states.entry(task.clone()).or_insert(TaskRun {
                        state: "pending".to_string(),
                        failed: false,
                        events: vec![(
                            "Received".to_string(),
                            "Task received by client".to_string(),
                        )],
                    });
                    let this_fails = failing.iter().any(|n| image.contains(n.as_str()));
                    if this_fails {
                        run.state = "dead".to_string();
                        run.failed = true;
                        run.events.push((
                            "Driver Failure".to_string(),
                            format!("failed to start task: image {image} exited with code 1"),
                        ));
                        run.events.push((
                            "Not Restarting".to_string(),
                            "Error was unrecoverable".to_string(),
                        ));
                    } else if fails {
                        // Nomad kills the other tasks of an allocation whose task failed.
                        run.state = "dead".to_string();
                        run.events.push((
                            "Sibling Task Failed".to_string(),
                            "Task's sibling failed".to_string(),
                        ));
                    } else {
                        run.state = "running".to_string();
                        run.events
                            .push(("Started".to_string(), "Task started by client".to_string()));
                    }
                }
                a.client_status = if fails { "failed" } else { "running" }.to_string();
                a.modify_index = 0;
                changed = true;
            }
            // 3. Place what the deployment still needs.
            let canary_phase = g.desired_canaries > 0 && !g.promoted;
            let want = if canary_phase {
                g.desired_canaries
            } else {
                g.desired_total
            };
            let placed = st
                .allocs
                .iter()
                .filter(|a| a.deployment_id.as_deref() == Some(d.id.as_str()) && &a.group == gname)
                .count() as u64;
            for n in placed..want {
                st.next_id += 1;
                let id_n = st.next_id;
                let id = format!("{id_n:08x}-0000-4000-8000-{id_n:012x}");
                if canary_phase {
                    g.placed_canaries.push(id.clone());
                }
                st.allocs.push(Alloc {
                    id,
                    namespace: d.namespace.clone(),
                    job_id: d.job_id.clone(),
                    job_version: d.job_version,
                    group: gname.clone(),
                    index_in_group: n,
                    tasks: images.clone(),
                    client_status: "pending".to_string(),
                    desired_status: "run".to_string(),
                    task_states: BTreeMap::new(),
                    deployment_id: Some(d.id.clone()),
                    healthy: None,
                    canary: canary_phase,
                    create_index: 0,
                    modify_index: 0,
                });
                g.placed_allocs += 1;
                changed = true;
            }
            // Groups that promote themselves do so once their canaries are healthy.
            if canary_phase && g.auto_promote && g.healthy_allocs >= g.desired_canaries {
                g.promoted = true;
                changed = true;
            }
        }

        let failed = groups.values().any(|g| g.unhealthy_allocs > 0);
        let done = groups.values().all(|g| {
            (g.desired_canaries == 0 || g.promoted) && g.healthy_allocs >= g.desired_total
        });
        let awaiting = groups
            .values()
            .any(|g| g.desired_canaries > 0 && !g.promoted);
        let (status, description) = if failed {
            ("failed", "Failed due to unhealthy allocations")
        } else if done {
            ("successful", "Deployment completed successfully")
        } else if awaiting {
            (
                "running",
                "Deployment is running but requires manual promotion",
            )
        } else {
            ("running", "Deployment is running")
        };
        let dep = &mut st.deployments[di];
        if dep.groups.iter().any(|(n, g)| {
            groups.get(n).is_some_and(|ng| {
                ng.healthy_allocs != g.healthy_allocs
                    || ng.unhealthy_allocs != g.unhealthy_allocs
                    || ng.placed_allocs != g.placed_allocs
                    || ng.promoted != g.promoted
            })
        }) || dep.status != status
            || dep.description != description
        {
            dep.groups = groups;
            dep.status = status.to_string();
            dep.description = description.to_string();
            dep.modify_index = 0;
            changed = true;
        }
        if status == "successful" {
            if let Some(versions) = st.jobs.get_mut(&key(&d.namespace, &d.job_id))
                && let Some(v) = versions
                    .iter_mut()
                    .find(|j| j["Version"].as_u64() == Some(d.job_version))
            {
                v["Stable"] = json!(true);
            }
            for a in st.allocs.iter_mut().filter(|a| {
                a.namespace == d.namespace
                    && a.job_id == d.job_id
                    && a.job_version != d.job_version
                    && !a.terminal()
            }) {
                stop(a);
            }
        }
    }
    changed
}

fn stop(a: &mut Alloc) {
    a.desired_status = "stop".to_string();
    a.client_status = "complete".to_string();
    for run in a.task_states.values_mut() {
        run.state = "dead".to_string();
        run.events
            .push(("Killed".to_string(), "Task successfully killed".to_string()));
    }
    a.modify_index = 0;
}
