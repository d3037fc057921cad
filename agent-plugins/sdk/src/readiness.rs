//! When a freshly started container counts as up, for executors that drive a Docker Engine
//! (through an API client or the `docker` CLI): the decision, the polling loop around it, and the
//! small text helpers for the error an operator sees when it fails.
//!
//! A container is ready when it runs and its health check (if it has one) reports healthy. One
//! without a health check counts as up once it has stayed running for a settle period, so that a
//! container crashing right after start is reported instead of being declared a success. A
//! restart beyond the allowed baseline, an exit, a failing health check or any other state is a
//! failure.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::PluginError;
use crate::digest::short_id;

/// How long a container without a health check must stay running to count as up.
pub const SETTLE: Duration = Duration::from_secs(2);
/// Lines of container log shown with a readiness failure.
pub const LOG_TAIL_LINES: usize = 50;
/// How long fetching those lines may take; a failure report must not hang on it.
pub const LOG_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a health check's output a failure message quotes.
const HEALTH_OUTPUT_CHARS: usize = 200;

/// One look at a container, in the engine's own words (`docker inspect`'s `State`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerState {
    /// `running`, `created`, `exited`, ...; empty when the engine did not say.
    pub status: String,
    /// `starting` / `healthy` / `unhealthy`; `None` without a health check (see
    /// [`health_status`]).
    pub health: Option<String>,
    pub restart_count: i64,
    pub exit_code: i64,
    pub oom_killed: bool,
    /// The engine's error for the last start, if any.
    pub error: String,
    /// RFC 3339; identifies the container's current incarnation.
    pub started_at: String,
    /// Output of the last health probe.
    pub health_output: String,
}

/// A health status as the engine reports it, `None` for "no health check" (`none` or empty).
pub fn health_status(raw: &str) -> Option<&str> {
    Some(raw).filter(|s| !s.is_empty() && *s != "none")
}

/// What one look at a container means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Up; `healthy` tells whether a health check vouched for it.
    Ready { healthy: bool },
    /// It will not come up; the detail says why.
    Failed(String),
    /// Not yet.
    Pending,
}

/// Decides readiness from successive looks at one container.
#[derive(Debug)]
pub struct Readiness {
    baseline_restarts: Option<i64>,
    settle: Duration,
    /// (StartedAt, when this process first saw that incarnation running)
    seen_running: Option<(String, Instant)>,
}

impl Readiness {
    /// `baseline_restarts` is the restart count the container is allowed to have; `None` takes
    /// whatever it has when first seen.
    pub fn new(baseline_restarts: Option<i64>, settle: Duration) -> Self {
        Self {
            baseline_restarts,
            settle,
            seen_running: None,
        }
    }

    pub fn observe(&mut self, state: &ContainerState) -> Verdict {
        let restarts = state.restart_count;
        let baseline = *self.baseline_restarts.get_or_insert(restarts);
        let exit_code = state.exit_code;
        match state.status.as_str() {
            "running" if restarts > baseline => Verdict::Failed(format!(
                "container restarted {} time(s) (last exit code {exit_code})",
                restarts - baseline
            )),
            "running" => match state.health.as_deref() {
                Some("healthy") => Verdict::Ready { healthy: true },
                Some("unhealthy") => Verdict::Failed(format!(
                    "health check reports unhealthy{}",
                    health_output_suffix(&state.health_output)
                )),
                Some(_) => Verdict::Pending,
                None => {
                    let first_seen = match &self.seen_running {
                        Some((s, at)) if *s == state.started_at => *at,
                        _ => {
                            let now = Instant::now();
                            self.seen_running = Some((state.started_at.clone(), now));
                            now
                        }
                    };
                    if first_seen.elapsed() >= self.settle
                        || engine_uptime(&state.started_at) >= self.settle
                    {
                        Verdict::Ready { healthy: false }
                    } else {
                        Verdict::Pending
                    }
                }
            },
            "created" | "" => Verdict::Pending,
            "restarting" => Verdict::Failed(format!(
                "container keeps restarting (last exit code {exit_code})"
            )),
            "exited" | "dead" => {
                let mut detail = format!("container exited with code {exit_code}");
                if state.oom_killed {
                    detail.push_str(" (killed: out of memory)");
                }
                if !state.error.is_empty() {
                    detail.push_str(&format!(" ({})", state.error));
                }
                Verdict::Failed(detail)
            }
            other => Verdict::Failed(format!("container is {other}")),
        }
    }
}

/// How [`wait_ready`] polls.
#[derive(Debug, Clone)]
pub struct WaitOptions {
    /// See [`Readiness::new`].
    pub baseline_restarts: Option<i64>,
    pub settle: Duration,
    pub poll_interval: Duration,
    /// A container still pending at this instant is reported as not ready.
    pub give_up_at: Instant,
    /// How the time limit reads in that report, e.g. `within 60s`.
    pub within: String,
}

impl WaitOptions {
    /// Waiting at most `timeout` from now, reported as `within <timeout>s`; the settle time is
    /// [`SETTLE`], but at most half the timeout.
    pub fn for_timeout(
        timeout: Duration,
        poll_interval: Duration,
        baseline_restarts: Option<i64>,
    ) -> Self {
        Self {
            baseline_restarts,
            settle: SETTLE.min(timeout / 2),
            poll_interval,
            give_up_at: Instant::now() + timeout,
            within: format!("within {}s", timeout.as_secs()),
        }
    }
}

/// Polls container `id` of `component` until it is ready (see [`Readiness`]) and returns
/// whether a health check vouched for it. `inspect` looks at the container (`None`: it is
/// gone). When it will not become ready, the error is `Unhealthy` with the failure detail and
/// the log tail `log_tail` fetches (given the detail, e.g. to log it; best effort: it must not
/// fail).
pub async fn wait_ready<I, IFut, L, LFut>(
    id: &str,
    component: &str,
    options: WaitOptions,
    mut inspect: I,
    log_tail: L,
) -> Result<bool, PluginError>
where
    I: FnMut() -> IFut,
    IFut: Future<Output = Result<Option<ContainerState>, PluginError>>,
    L: FnOnce(&str) -> LFut,
    LFut: Future<Output = String>,
{
    let mut readiness = Readiness::new(options.baseline_restarts, options.settle);
    loop {
        let Some(state) = inspect().await? else {
            return Err(PluginError::Unhealthy {
                component: component.to_string(),
                detail: format!("container {} disappeared", short_id(id)),
                log_tail: String::new(),
            });
        };
        let failure = match readiness.observe(&state) {
            Verdict::Ready { healthy } => return Ok(healthy),
            Verdict::Failed(detail) => Some(detail),
            Verdict::Pending if Instant::now() >= options.give_up_at => Some(format!(
                "not ready {} (state {}, health {})",
                options.within,
                state.status,
                state.health.as_deref().unwrap_or("none")
            )),
            Verdict::Pending => None,
        };
        if let Some(detail) = failure {
            let log_tail = log_tail(&detail).await;
            return Err(PluginError::Unhealthy {
                component: component.to_string(),
                detail,
                log_tail,
            });
        }
        tokio::time::sleep(options.poll_interval).await;
    }
}

/// How long the engine says the container has been running; zero when unknown. The engine's
/// clock may not be ours: a skewed host only makes this estimate wrong, and the local settle
/// timer still bounds the wait.
pub fn engine_uptime(started_at: &str) -> Duration {
    time::OffsetDateTime::parse(started_at, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| (time::OffsetDateTime::now_utc() - t).try_into().ok())
        .unwrap_or(Duration::ZERO)
}

/// `: <output>` (trimmed, at most 200 characters) for a health check's last output, or nothing
/// when it printed nothing.
pub fn health_output_suffix(output: &str) -> String {
    let output = output.trim();
    if output.is_empty() {
        String::new()
    } else {
        let cut: String = output.chars().take(HEALTH_OUTPUT_CHARS).collect();
        format!(": {cut}")
    }
}

/// The last `n` of `lines`, joined with newlines.
pub fn last_lines<S: AsRef<str>>(lines: &[S], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn running(started_at: &str) -> ContainerState {
        ContainerState {
            status: "running".to_string(),
            started_at: started_at.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn health_checks_decide_when_there_is_one() {
        let mut r = Readiness::new(Some(0), SETTLE);
        let mut s = running("2025-01-01T00:00:00Z");
        s.health = Some("starting".to_string());
        assert_eq!(r.observe(&s), Verdict::Pending);
        s.health = Some("healthy".to_string());
        assert_eq!(r.observe(&s), Verdict::Ready { healthy: true });
        s.health = Some("unhealthy".to_string());
        s.health_output = "  probe failed\n".to_string();
        assert_eq!(
            r.observe(&s),
            Verdict::Failed("health check reports unhealthy: probe failed".to_string())
        );
        assert_eq!(health_status("none"), None);
        assert_eq!(health_status(""), None);
        assert_eq!(health_status("healthy"), Some("healthy"));
    }

    #[test]
    fn without_a_health_check_a_container_must_stay_up() {
        // Started long ago by the engine's clock: up at once.
        let mut r = Readiness::new(Some(0), SETTLE);
        assert_eq!(
            r.observe(&running("2025-01-01T00:00:00Z")),
            Verdict::Ready { healthy: false }
        );
        // Just started (unparsable time counts as zero uptime): pending until the settle time.
        let mut r = Readiness::new(Some(0), Duration::from_millis(30));
        assert_eq!(r.observe(&running("now")), Verdict::Pending);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(
            r.observe(&running("now")),
            Verdict::Ready { healthy: false }
        );
        // A new incarnation starts the settle time again.
        assert_eq!(r.observe(&running("later")), Verdict::Pending);
    }

    #[test]
    fn restarts_exits_and_odd_states_fail() {
        let mut r = Readiness::new(None, SETTLE);
        let mut s = running("x");
        s.restart_count = 2;
        s.health = Some("starting".to_string());
        assert_eq!(
            r.observe(&s),
            Verdict::Pending,
            "baseline taken when first seen"
        );
        s.restart_count = 3;
        s.exit_code = 7;
        assert_eq!(
            r.observe(&s),
            Verdict::Failed("container restarted 1 time(s) (last exit code 7)".to_string())
        );
        let state = |status: &str| ContainerState {
            status: status.to_string(),
            exit_code: 137,
            oom_killed: true,
            error: "boom".to_string(),
            ..Default::default()
        };
        let mut r = Readiness::new(Some(0), SETTLE);
        assert_eq!(r.observe(&state("created")), Verdict::Pending);
        assert_eq!(r.observe(&state("")), Verdict::Pending);
        assert_eq!(
            r.observe(&state("exited")),
            Verdict::Failed(
                "container exited with code 137 (killed: out of memory) (boom)".to_string()
            )
        );
        assert_eq!(
            r.observe(&state("restarting")),
            Verdict::Failed("container keeps restarting (last exit code 137)".to_string())
        );
        assert_eq!(
            r.observe(&state("paused")),
            Verdict::Failed("container is paused".to_string())
        );
    }

    fn options(give_up_at: Instant) -> WaitOptions {
        WaitOptions {
            baseline_restarts: Some(0),
            settle: SETTLE,
            poll_interval: Duration::from_millis(5),
            give_up_at,
            within: "within 1s".to_string(),
        }
    }

    fn tail(_detail: &str) -> std::future::Ready<String> {
        std::future::ready("tail".to_string())
    }

    #[tokio::test]
    async fn waiting_polls_until_a_verdict_or_the_deadline() {
        let looks = Mutex::new(vec![
            running("2025-01-01T00:00:00Z"),
            ContainerState::default(),
        ]);
        let inspect = || async { Ok(looks.lock().unwrap().pop()) };
        let far = Instant::now() + Duration::from_secs(60);
        let healthy = wait_ready("c", "web", options(far), inspect, tail).await;
        assert!(
            !healthy.unwrap(),
            "up without a health check vouching for it"
        );

        let inspect = || async { Ok(Some(ContainerState::default())) };
        match wait_ready("c", "web", options(Instant::now()), inspect, tail).await {
            Err(PluginError::Unhealthy {
                component,
                detail,
                log_tail,
            }) => {
                assert_eq!(component, "web");
                assert_eq!(detail, "not ready within 1s (state , health none)");
                assert_eq!(log_tail, "tail");
            }
            other => panic!("expected Unhealthy, got {other:?}"),
        }

        let gone = || async { Ok(None) };
        match wait_ready("sha256:0123456789abcdef", "web", options(far), gone, tail).await {
            Err(PluginError::Unhealthy {
                detail, log_tail, ..
            }) => {
                assert_eq!(detail, "container 0123456789ab disappeared");
                assert!(log_tail.is_empty());
            }
            other => panic!("expected Unhealthy, got {other:?}"),
        }
    }

    #[test]
    fn text_helpers() {
        assert_eq!(health_output_suffix(" \n"), "");
        assert_eq!(health_output_suffix(&"x".repeat(300)).len(), 202);
        assert_eq!(last_lines(&["a", "b", "c"], 2), "b\nc");
        assert_eq!(last_lines(&["a".to_string()], 5), "a");
        assert_eq!(last_lines::<&str>(&[], 5), "");
        assert!(engine_uptime("2025-01-01T00:00:00.123456789Z") > Duration::from_secs(60));
        assert_eq!(engine_uptime(""), Duration::ZERO);
    }
}
