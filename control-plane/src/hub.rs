//! Which agents hold a session with this plane right now, and how to wake their offer loops.
//!
//! Work is pushed down the stream an agent opened: creating a job notifies the agent's session,
//! which reads pending jobs from the database (the database, not the hub, is the source of truth,
//! so a notification lost to a race only delays an offer until the next wake or reconnect).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, oneshot};

pub struct SessionHandle {
    pub session_id: u64,
    pub wake: Arc<Notify>,
    /// Dropping the sender ends the session (a newer session of the same agent replaced it).
    _evict: oneshot::Sender<()>,
}

#[derive(Default)]
pub struct Hub {
    sessions: Mutex<HashMap<String, SessionHandle>>,
    next_session: AtomicU64,
}

pub struct Registration {
    pub session_id: u64,
    pub wake: Arc<Notify>,
    pub evicted: oneshot::Receiver<()>,
}

impl Hub {
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

    /// Removes the session only if it is still the registered one (a newer one may have replaced it).
    pub fn unregister(&self, agent_id: &str, session_id: u64) {
        if let Ok(mut sessions) = self.sessions.lock()
            && sessions
                .get(agent_id)
                .is_some_and(|h| h.session_id == session_id)
        {
            sessions.remove(agent_id);
        }
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
