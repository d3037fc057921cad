//! Which simulated agents hold a session right now, seen from the fleet side.
//!
//! The agent runtime logs "session established" when the plane's welcome arrives and one of a
//! few messages when a session ends. Each simulated agent runs inside a `bench_agent{idx}` span,
//! so a tracing layer can attribute those events to an agent without touching the agent crate.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

pub const AGENT_SPAN: &str = "bench_agent";

#[derive(Debug, Clone, Copy, Default)]
struct AgentSession {
    up: bool,
    /// Unix ms of the latest "session established".
    last_up_ms: i64,
}

#[derive(Default)]
pub struct Tracker {
    agents: Mutex<Vec<AgentSession>>,
    up: AtomicUsize,
    ended: AtomicU64,
    silent: AtomicU64,
}

pub static TRACKER: LazyLock<Tracker> = LazyLock::new(Tracker::default);

impl Tracker {
    fn set(&self, idx: usize, up: bool) {
        let mut agents = self
            .agents
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if agents.len() <= idx {
            agents.resize(idx + 1, AgentSession::default());
        }
        let a = &mut agents[idx];
        if up {
            a.last_up_ms = crate::noop::now_ms();
            if !a.up {
                self.up.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            self.ended.fetch_add(1, Ordering::Relaxed);
            if a.up {
                self.up.fetch_sub(1, Ordering::Relaxed);
            }
        }
        a.up = up;
    }

    /// Agents holding a session now.
    pub fn up(&self) -> usize {
        self.up.load(Ordering::Relaxed)
    }

    /// Sessions the agent dropped because the plane went silent (heartbeats unanswered for
    /// three intervals): it noticed a dead plane only by waiting, not from the transport.
    pub fn silent(&self) -> u64 {
        self.silent.load(Ordering::Relaxed)
    }

    /// Sessions that ended or attempts that failed, since the start.
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }

    /// When agents `0..n` all hold a session established at or after `since_ms`: the latest
    /// establishment time. None while any of them is still missing.
    pub fn all_up_since(&self, n: usize, since_ms: i64) -> Option<i64> {
        let agents = self
            .agents
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if agents.len() < n {
            return None;
        }
        let mut latest = since_ms;
        for a in &agents[..n] {
            if !a.up || a.last_up_ms < since_ms {
                return None;
            }
            latest = latest.max(a.last_up_ms);
        }
        Some(latest)
    }
}

struct AgentIdx(usize);

#[derive(Default)]
struct IdxVisitor(Option<usize>);

impl Visit for IdxVisitor {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "idx" {
            self.0 = usize::try_from(value).ok();
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "idx" {
            self.0 = usize::try_from(value).ok();
        }
    }
    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

#[derive(Default)]
struct MessageVisitor {
    message: String,
    error: String,
}

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "error" => self.error = value.to_string(),
            _ => {}
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "error" => self.error = format!("{value:?}"),
            _ => {}
        }
    }
}

/// The tracing layer feeding [`TRACKER`]. Filter it to `stella_agent::runtime` events and
/// `bench_agent` spans (see `main.rs`).
pub struct SessionLayer;

impl<S> tracing_subscriber::Layer<S> for SessionLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != AGENT_SPAN {
            return;
        }
        let mut v = IdxVisitor::default();
        attrs.record(&mut v);
        if let (Some(idx), Some(span)) = (v.0, ctx.span(id)) {
            span.extensions_mut().insert(AgentIdx(idx));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut m = MessageVisitor::default();
        event.record(&mut m);
        if m.message == "session failed" && m.error.contains("heartbeats unanswered") {
            TRACKER.silent.fetch_add(1, Ordering::Relaxed);
        }
        let up = match m.message.as_str() {
            "session established" => true,
            "session failed"
            | "session closed by the plane"
            | "plane asked us to reconnect later" => false,
            other if other.starts_with("the control plane refuses this agent") => false,
            _ => return,
        };
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            if let Some(AgentIdx(idx)) = span.extensions().get::<AgentIdx>() {
                TRACKER.set(*idx, up);
                return;
            }
        }
    }
}
