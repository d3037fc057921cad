//! Which agents hold a session with this plane right now, and how to wake their offer loops.
//!
//! Work is pushed down the stream an agent opened: creating a job notifies the agent's session,
//! which reads pending jobs from the database (the database, not the hub, is the source of truth,
//! so a notification lost to a race only delays an offer until the next wake or reconnect).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};

pub struct SessionHandle {
    pub session_id: u64,
    pub wake: Arc<Notify>,
    /// Dropping the sender ends the session (a newer session of the same agent replaced it).
    _evict: oneshot::Sender<()>,
}

pub struct Hub {
    sessions: Mutex<HashMap<String, SessionHandle>>,
    next_session: AtomicU64,
    /// Latest heartbeat per agent (unix ms), written to the database in batches
    /// (`take_heartbeats`) rather than on every heartbeat.
    heartbeats: Mutex<HashMap<String, i64>>,
    pub admission: Admission,
    /// TLS handshakes in progress on the agent endpoints, bounded like session setups.
    pub handshakes: crate::handshakes::HandshakeLimit,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(AdmissionConfig::default())
    }
}

pub struct Registration {
    pub session_id: u64,
    pub wake: Arc<Notify>,
    pub evicted: oneshot::Receiver<()>,
}

impl Hub {
    pub fn new(admission: AdmissionConfig) -> Self {
        Self {
            sessions: Mutex::default(),
            next_session: AtomicU64::default(),
            heartbeats: Mutex::default(),
            handshakes: crate::handshakes::HandshakeLimit::new(admission.max_session_setups),
            admission: Admission::new(admission),
        }
    }

    pub fn record_heartbeat(&self, agent_id: &str, at_ms: i64) {
        if let Ok(mut heartbeats) = self.heartbeats.lock() {
            heartbeats.insert(agent_id.to_string(), at_ms);
        }
    }

    /// The latest heartbeat seen since the last flush, if any.
    pub fn last_heartbeat(&self, agent_id: &str) -> Option<i64> {
        self.heartbeats.lock().ok()?.get(agent_id).copied()
    }

    /// Heartbeats seen since the last call, for one batched write.
    pub fn take_heartbeats(&self) -> Vec<(String, i64)> {
        self.heartbeats
            .lock()
            .map(|mut h| h.drain().collect())
            .unwrap_or_default()
    }

    /// Registers a new session for `agent_id`, evicting any older one of the same agent.
    pub fn register(&self, agent_id: &str) -> Registration {
        let session_id = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        let wake = Arc::new(Notify::new());
        let (tx, rx) = oneshot::channel();
        let handle = SessionHandle {
            session_id,
            wake: wake.clone(),
            _evict: tx,
        };
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(agent_id.to_string(), handle);
        }
        Registration {
            session_id,
            wake,
            evicted: rx,
        }
    }

    /// Removes the session only if it is still the registered one (a newer one may have
    /// replaced it); true when it was.
    pub fn unregister(&self, agent_id: &str, session_id: u64) -> bool {
        if let Ok(mut sessions) = self.sessions.lock()
            && sessions
                .get(agent_id)
                .is_some_and(|h| h.session_id == session_id)
        {
            sessions.remove(agent_id);
            return true;
        }
        false
    }

    pub fn notify(&self, agent_id: &str) {
        if let Ok(sessions) = self.sessions.lock()
            && let Some(handle) = sessions.get(agent_id)
        {
            handle.wake.notify_one();
        }
    }

    /// Wakes every session (e.g. a new trust bundle to push).
    pub fn notify_all(&self) {
        if let Ok(sessions) = self.sessions.lock() {
            for handle in sessions.values() {
                handle.wake.notify_one();
            }
        }
    }

    pub fn is_connected(&self, agent_id: &str) -> bool {
        self.sessions
            .lock()
            .map(|s| s.contains_key(agent_id))
            .unwrap_or(false)
    }

    /// Sessions registered since start (a reconnect counts again; a migrated QUIC path does not).
    pub fn sessions_started(&self) -> u64 {
        self.next_session.load(Ordering::Relaxed)
    }

    pub fn connected_count(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Ends a session (revocation, shutdown): dropping its handle closes its evict channel.
    pub fn evict(&self, agent_id: &str) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.remove(agent_id);
        }
    }
}

/// How many session setups (identity check, welcome, bookkeeping) may run at once, and how long
/// an agent turned away is told to wait.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    pub max_session_setups: usize,
    /// How long a setup may wait for a free slot before the agent is told to come back later:
    /// a burst queues briefly (setups take milliseconds), only a sustained excess is turned away.
    pub queue_wait: Duration,
    /// The reconnect delay of a deferred agent is drawn uniformly from this range, so a
    /// fleet turned away at the same moment does not come back at the same moment.
    pub retry_after_min: Duration,
    pub retry_after_max: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_session_setups: 256,
            queue_wait: Duration::from_secs(5),
            retry_after_min: Duration::from_secs(1),
            retry_after_max: Duration::from_secs(10),
        }
    }
}

/// Admission control for session setups. In a reconnect storm every agent arrives at once; past
/// a few hundred concurrent setups the database pool queue outgrows the agents' welcome timeout,
/// they give up, retry and the storm feeds itself. The excess is answered at once with a
/// server-assigned reconnect delay instead.
pub struct Admission {
    config: AdmissionConfig,
    permits: Arc<Semaphore>,
    in_setup: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    deferred: AtomicU64,
}

/// Held by an admitted session until its setup is done.
pub struct SetupPermit {
    _permit: OwnedSemaphorePermit,
}

/// Counts a session setup in progress while held (measured independently of the permits, so
/// the peak shows whether admission actually bounded it).
pub struct SetupInProgress {
    in_setup: Arc<AtomicUsize>,
}

impl Drop for SetupInProgress {
    fn drop(&mut self) {
        self.in_setup.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_session_setups.max(1)));
        Self {
            config,
            permits,
            in_setup: Arc::default(),
            peak: Arc::default(),
            deferred: AtomicU64::default(),
        }
    }

    /// A permit to set up a session, waiting up to `queue_wait` for one; otherwise the delay to
    /// tell the agent to come back after.
    pub async fn admit(&self) -> Result<SetupPermit, Duration> {
        match tokio::time::timeout(self.config.queue_wait, self.permits.clone().acquire_owned())
            .await
        {
            Ok(Ok(permit)) => Ok(SetupPermit { _permit: permit }),
            _ => {
                self.deferred.fetch_add(1, Ordering::Relaxed);
                Err(self.retry_after())
            }
        }
    }

    fn retry_after(&self) -> Duration {
        let (min, max) = (self.config.retry_after_min, self.config.retry_after_max);
        if max <= min {
            return min;
        }
        rand::thread_rng().gen_range(min..=max)
    }

    /// Marks the start of a session setup's work; the returned guard marks its end.
    pub fn setup_started(&self) -> SetupInProgress {
        let now = self.in_setup.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(now, Ordering::AcqRel);
        SetupInProgress {
            in_setup: self.in_setup.clone(),
        }
    }

    pub fn limit(&self) -> usize {
        self.config.max_session_setups.max(1)
    }

    /// Most session setups seen in progress at once since start.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }

    /// Session attempts turned away with a reconnect delay since start.
    pub fn deferred(&self) -> u64 {
        self.deferred.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_at_once(queue_wait: Duration) -> Admission {
        Admission::new(AdmissionConfig {
            max_session_setups: 2,
            queue_wait,
            retry_after_min: Duration::from_millis(100),
            retry_after_max: Duration::from_millis(200),
        })
    }

    #[tokio::test]
    async fn admits_up_to_the_limit_then_defers_with_a_delay_in_range() {
        let admission = two_at_once(Duration::from_millis(20));
        let _first = admission.admit().await.expect("first admitted");
        let _second = admission.admit().await.expect("second admitted");
        // Nothing frees a slot: the third waits out the queue time and is deferred.
        let delay = admission.admit().await.err().expect("third deferred");
        assert!((Duration::from_millis(100)..=Duration::from_millis(200)).contains(&delay));
        assert_eq!(admission.deferred(), 1);
    }

    #[tokio::test]
    async fn a_setup_waiting_in_the_queue_gets_the_slot_a_finished_one_frees() {
        let admission = Arc::new(two_at_once(Duration::from_secs(60)));
        let first = admission.admit().await.expect("first admitted");
        let _second = admission.admit().await.expect("second admitted");
        let waiting = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit().await.is_ok() }
        });
        tokio::task::yield_now().await;
        drop(first);
        assert!(waiting.await.expect("task"), "the queued setup is admitted");
        assert_eq!(admission.deferred(), 0);
    }

    #[test]
    fn the_peak_counts_setups_in_progress_at_once() {
        let admission = Admission::new(AdmissionConfig::default());
        let a = admission.setup_started();
        let b = admission.setup_started();
        drop(a);
        let _c = admission.setup_started();
        drop(b);
        assert_eq!(admission.peak(), 2);
    }
}
