//! Several planes on one database ("replicas"), leader-less: who is alive, and how one replica
//! tells the others that something they act on changed.
//!
//! The database stays the source of truth; signals only make the others look now instead of at
//! their next sweep. On PostgreSQL they travel as `NOTIFY` on one channel (delivered at commit
//! to every listening replica, never stored); a replica that missed some (its listening
//! connection dropped) wakes everything it holds once it listens again, and a periodic sweep
//! wakes sessions whose agents have queued jobs, so a lost signal delays work and never loses it.
//! On SQLite there is one plane per database file and signals stay in the process.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::state::{AppState, PlaneEvent, SharedState};
use crate::store::{Backend, now_ms};

/// The PostgreSQL channel every replica listens on.
pub const CHANNEL: &str = "stella_plane";
/// How often a replica refreshes its row in `plane_replicas`.
pub const PRESENCE_INTERVAL: Duration = Duration::from_secs(5);
/// A replica whose row is older than this is taken for gone.
pub const PRESENCE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a replica wakes its sessions whose agents have queued jobs (the safety net under
/// the signals).
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Largest `NOTIFY` payload PostgreSQL accepts is 8000 bytes; signals are far smaller, but an
/// event id is user data: anything longer is dropped (the sweep and SSE reload cover it).
const MAX_PAYLOAD: usize = 7900;

/// What one replica tells the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "signal", rename_all = "snake_case")]
pub enum Signal {
    /// An agent has new jobs: the replica holding its session offers them.
    Work { agent: String },
    /// An agent was revoked: the replica holding its session ends it.
    Evict { agent: String },
    /// A trust bundle was published (key rotation): reload shared keys, push the bundle.
    Trust,
    /// Something a workflow run waits on changed (approval, cancellation, a settled deployment).
    Runner,
    /// A change for server-sent event subscribers.
    Event {
        kind: String,
        id: String,
        promotion: Option<String>,
        at: String,
    },
}

impl Signal {
    pub fn name(&self) -> &'static str {
        match self {
            Signal::Work { .. } => "work",
            Signal::Evict { .. } => "evict",
            Signal::Trust => "trust",
            Signal::Runner => "runner",
            Signal::Event { .. } => "event",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    from: String,
    #[serde(flatten)]
    signal: Signal,
}

/// This replica: its id, and the queue its signals leave by.
pub struct Replica {
    pub id: String,
    outbox: Option<mpsc::UnboundedSender<Signal>>,
    outbox_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Signal>>>,
    /// Signals sent to and received from the other replicas since start, by name.
    pub sent: crate::state::NamedCounts,
    pub received: crate::state::NamedCounts,
}

/// Where a replica keeps its id in its data directory.
pub const REPLICA_ID_FILE: &str = "replica.id";

/// This data directory's replica id, created on first start. Kept across restarts so that a
/// replica restarted after a crash takes its own leases back at once instead of waiting for
/// them to run out (on SQLite, where it is the only plane, always).
pub fn load_or_create_id(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join(REPLICA_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if is_replica_id(id.trim()) => Ok(id.trim().to_string()),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} does not hold a replica id; remove it to get a new one",
                path.display()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = crate::store::new_id("replica");
            std::fs::write(&path, format!("{id}\n"))?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

fn is_replica_id(id: &str) -> bool {
    id.strip_prefix("replica_").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 64 && rest.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

impl Replica {
    /// The replica `id`; `shared` when other replicas may use the same database.
    pub fn new(id: String, shared: bool) -> Self {
        let (outbox, outbox_rx) = if shared {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Self {
            id,
            outbox,
            outbox_rx: std::sync::Mutex::new(outbox_rx),
            sent: Default::default(),
            received: Default::default(),
        }
    }

    /// Sends `signal` to the other replicas (nothing on SQLite). Never blocks nor fails: a
    /// signal that cannot be sent is covered by the others' sweeps.
    pub fn signal(&self, signal: Signal) {
        if let Some(outbox) = &self.outbox {
            let _ = outbox.send(signal);
        }
    }
}

impl AppState {
    /// New jobs wait for `agent_id`: wake its session here, and wherever else it is held.
    pub fn agent_has_work(&self, agent_id: &str) {
        self.hub.notify(agent_id);
        self.replica.signal(Signal::Work {
            agent: agent_id.to_string(),
        });
    }

    /// Ends `agent_id`'s session on every replica (revocation).
    pub fn evict_agent(&self, agent_id: &str) {
        self.hub.evict(agent_id);
        self.replica.signal(Signal::Evict {
            agent: agent_id.to_string(),
        });
    }

    /// Wakes the workflow runners of every replica.
    pub fn wake_runners(&self) {
        self.runner_wake.notify_one();
        self.replica.signal(Signal::Runner);
    }

    /// A trust bundle was published: every session on every replica pushes it.
    pub fn trust_changed(&self) {
        self.hub.notify_all();
        self.replica.signal(Signal::Trust);
    }
}

pub fn event_signal(event: &PlaneEvent) -> Signal {
    Signal::Event {
        kind: event.kind.to_string(),
        id: event.id.clone(),
        promotion: event.promotion.clone(),
        at: event.at.clone(),
    }
}

/// Acts on a signal from another replica.
async fn receive(state: &SharedState, signal: Signal) {
    crate::state::count(&state.replica.received, signal.name());
    match signal {
        Signal::Work { agent } => state.hub.notify(&agent),
        Signal::Evict { agent } => state.hub.evict(&agent),
        Signal::Trust => {
            // Apart from the listener: a reload may re-sign waiting jobs, and the next signal
            // should not wait for that.
            let state = state.clone();
            tokio::spawn(async move {
                reload_keys(&state).await;
                state.hub.notify_all();
            });
        }
        Signal::Runner => state.runner_wake.notify_one(),
        Signal::Event {
            kind,
            id,
            promotion,
            at,
        } => state.publish_local(PlaneEvent {
            kind: kind.into(),
            id,
            promotion,
            at,
        }),
    }
}

/// Another replica rotated keys: take the shared ones from the database (a no-op when the keys
/// are files, i.e. without `--key-encryption-key-file`).
async fn reload_keys(state: &SharedState) {
    match crate::trust::reload_shared_keys(state).await {
        Ok(true) => tracing::info!("took the shared keys another replica changed"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot reload the shared keys"),
    }
}

/// Clears the session marks a previous run of this replica left (it crashed, so they were never
/// cleared): before any agent connects, nothing is held here.
pub async fn forget_stale_sessions(state: &AppState) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("UPDATE agents SET session_replica = NULL WHERE session_replica = $1")
            .bind(&state.replica.id)
            .execute(&state.db)
            .await?
            .rows_affected(),
    )
}

/// Starts this replica's presence, signalling and sweep tasks.
pub fn spawn(state: SharedState, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let mut tasks = vec![tokio::spawn(presence(state.clone(), shutdown.clone()))];
    if Backend::of(&state.db) == Backend::Postgres {
        let outbox = state
            .replica
            .outbox_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(outbox) = outbox {
            tasks.push(tokio::spawn(send_signals(
                state.clone(),
                outbox,
                shutdown.clone(),
            )));
        }
        tasks.push(tokio::spawn(listen(state.clone(), shutdown.clone())));
        tasks.push(tokio::spawn(sweep(state, shutdown)));
    }
    tasks
}

/// Keeps this replica's row fresh; removes it and gives up its leases at shutdown, so the
/// others take over its runs at once instead of after the lease runs out.
async fn presence(state: SharedState, mut shutdown: watch::Receiver<bool>) {
    let started = now_ms();
    let host = hostname();
    let endpoints = serde_json::to_string(&state.config.agent_endpoints).unwrap_or_default();
    let mut every = tokio::time::interval(PRESENCE_INTERVAL);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.wait_for(|v| *v) => break,
        }
        let upsert = sqlx::query(
            "INSERT INTO plane_replicas (id, host, api_url, agent_endpoints, started_at, seen_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET host = excluded.host, api_url = excluded.api_url,
                 agent_endpoints = excluded.agent_endpoints, started_at = excluded.started_at,
                 seen_at = excluded.seen_at",
        )
        .bind(&state.replica.id)
        .bind(&host)
        .bind(&state.config.api_url)
        .bind(&endpoints)
        .bind(started)
        .bind(now_ms())
        .execute(&state.db)
        .await;
        if let Err(e) = upsert {
            tracing::warn!(error = %e, "cannot refresh this replica's presence");
        }
    }
    let gone = async {
        sqlx::query("DELETE FROM plane_replicas WHERE id = $1")
            .bind(&state.replica.id)
            .execute(&state.db)
            .await?;
        crate::runs::release_leases(&state).await
    };
    match gone.await {
        Ok(released) if released > 0 => {
            tracing::info!(
                runs = released,
                "workflow runs handed to the other replicas"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot give up this replica's leases"),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// Sends queued signals as `NOTIFY`, merging repeats queued at the same moment.
async fn send_signals(
    state: SharedState,
    mut outbox: mpsc::UnboundedReceiver<Signal>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            n = outbox.recv_many(&mut batch, 256) => if n == 0 { return },
            _ = shutdown.wait_for(|v| *v) => return,
        }
        let mut seen = std::collections::HashSet::new();
        for signal in batch.drain(..) {
            let name = signal.name();
            let wire = Wire {
                from: state.replica.id.clone(),
                signal,
            };
            let Ok(payload) = serde_json::to_string(&wire) else {
                continue;
            };
            if payload.len() > MAX_PAYLOAD || !seen.insert(payload.clone()) {
                continue;
            }
            if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(&payload)
                .execute(&state.db)
                .await
            {
                tracing::warn!(error = %e, "cannot signal the other replicas; their sweeps will catch up");
            } else {
                crate::state::count(&state.replica.sent, name);
            }
        }
    }
}

/// Listens for the other replicas' signals; after a lost connection, wakes everything once
/// (signals sent meanwhile are gone).
async fn listen(state: SharedState, mut shutdown: watch::Receiver<bool>) {
    let url = state.db.connect_options().database_url.to_string();
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for the other replicas; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.wait_for(|v| *v) => return,
                }
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "cannot listen for the other replicas; retrying");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = shutdown.wait_for(|v| *v) => return,
            }
        }
        // Anything signalled before this point was missed.
        catch_up(&state).await;
        loop {
            let received = tokio::select! {
                r = listener.try_recv() => r,
                _ = shutdown.wait_for(|v| *v) => return,
            };
            match received {
                Ok(Some(notification)) => {
                    match serde_json::from_str::<Wire>(notification.payload()) {
                        Ok(wire) if wire.from != state.replica.id => {
                            receive(&state, wire.signal).await
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "unreadable signal from another replica")
                        }
                    }
                }
                // The connection was lost; `try_recv` reconnects on the next call.
                Ok(None) => {
                    tracing::warn!("lost the connection listening for the other replicas");
                    catch_up(&state).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listening for the other replicas failed; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => break,
                        _ = shutdown.wait_for(|v| *v) => return,
                    }
                }
            }
        }
    }
}

async fn catch_up(state: &SharedState) {
    reload_keys(state).await;
    state.hub.notify_all();
    state.runner_wake.notify_one();
}

/// Wakes the sessions held here whose agents have queued jobs: covers a signal lost between
/// replicas. Cheap: an index range (`jobs_by_status`), and only connected agents are woken.
async fn sweep(state: SharedState, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
        let waiting: Result<Vec<(String,)>, _> =
            sqlx::query_as("SELECT DISTINCT agent_id FROM jobs WHERE status = 'queued'")
                .fetch_all(&state.db)
                .await;
        match waiting {
            Ok(agents) => {
                for (agent,) in agents {
                    state.hub.notify(&agent);
                }
            }
            Err(e) => tracing::warn!(error = %e, "replica sweep failed"),
        }
    }
}

/// Replicas whose presence is fresh, for `stella replicas` and the agent list.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaView {
    pub id: String,
    pub host: String,
    pub api_url: String,
    pub agent_endpoints: Vec<String>,
    pub started_at: String,
    pub seen_at: String,
    /// Workflow runs whose lease this replica holds now.
    pub runs_leased: i64,
    /// Whether this is the replica that answered.
    pub this: bool,
}

pub async fn list(state: &AppState) -> crate::error::ApiResult<Vec<ReplicaView>> {
    let now = now_ms();
    let fresh = now - PRESENCE_TIMEOUT.as_millis() as i64;
    let rows: Vec<(String, String, String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT r.id, r.host, r.api_url, r.agent_endpoints, r.started_at, r.seen_at,
             (SELECT COUNT(*) FROM workflow_runs w
              WHERE w.lease_owner = r.id AND w.lease_until > $1 AND w.status = 'running')
         FROM plane_replicas r WHERE r.seen_at > $2 ORDER BY r.started_at, r.id",
    )
    .bind(now)
    .bind(fresh)
    .fetch_all(&state.db)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, host, api_url, endpoints, started, seen, runs_leased)| ReplicaView {
                this: id == state.replica.id,
                id,
                host,
                api_url,
                agent_endpoints: serde_json::from_str(&endpoints).unwrap_or_default(),
                started_at: crate::store::rfc3339(started),
                seen_at: crate::store::rfc3339(seen),
                runs_leased,
            },
        )
        .collect())
}

/// The replicas that have shown themselves within `PRESENCE_TIMEOUT`, this one included.
pub async fn alive(state: &AppState) -> crate::error::ApiResult<std::collections::HashSet<String>> {
    let fresh = now_ms() - PRESENCE_TIMEOUT.as_millis() as i64;
    let rows: Vec<(String,)> = sqlx::query_as("SELECT id FROM plane_replicas WHERE seen_at > $1")
        .bind(fresh)
        .fetch_all(&state.db)
        .await?;
    let mut alive: std::collections::HashSet<String> = rows.into_iter().map(|(id,)| id).collect();
    alive.insert(state.replica.id.clone());
    Ok(alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_read_back_as_sent() {
        for signal in [
            Signal::Work { agent: "a1".into() },
            Signal::Evict { agent: "a2".into() },
            Signal::Trust,
            Signal::Runner,
            Signal::Event {
                kind: "deployment".into(),
                id: "dep-1".into(),
                promotion: None,
                at: "2026-11-29T00:00:00Z".into(),
            },
        ] {
            let wire = Wire {
                from: "replica-x".into(),
                signal: signal.clone(),
            };
            let back: Wire = serde_json::from_str(&serde_json::to_string(&wire).unwrap()).unwrap();
            assert_eq!(back.from, "replica-x");
            assert_eq!(back.signal, signal);
        }
    }

    #[test]
    fn a_replica_on_its_own_database_sends_nothing() {
        let replica = Replica::new("replica_x".into(), false);
        replica.signal(Signal::Trust);
        assert!(replica.outbox.is_none());
    }

    #[test]
    fn the_replica_id_is_kept_across_restarts_and_a_bad_file_is_refused() {
        let fresh = || {
            let dir = std::env::temp_dir().join(crate::store::new_id("replica-test"));
            std::fs::create_dir_all(&dir).unwrap();
            dir
        };
        let (dir, other) = (fresh(), fresh());
        let first = load_or_create_id(&dir).unwrap();
        assert!(is_replica_id(&first), "{first}");
        assert_eq!(load_or_create_id(&dir).unwrap(), first);
        assert_ne!(load_or_create_id(&other).unwrap(), first);
        std::fs::write(dir.join(REPLICA_ID_FILE), "x'; DROP TABLE jobs; --").unwrap();
        let e = load_or_create_id(&dir).unwrap_err().to_string();
        assert!(e.contains("does not hold a replica id"), "{e}");
        for d in [dir, other] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
