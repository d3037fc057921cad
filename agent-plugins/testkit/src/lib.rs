//! Test support for Stella's executor plugins; a dev-dependency only, never linked into an agent.
//!
//! - [`docker`]: the `docker` CLI as tests use it, tiny images imported from the static busybox
//!   binary (nothing is ever pulled), and [`docker::Cleanup`] / [`docker::Scratch`], which remove
//!   what a test made on the engine when dropped, also when the test fails.
//! - [`expect`]: one-line assertions on the errors every executor reports, and the sticker
//!   round trip every executor must pass.
//! - [`process`]: waiting (on a pidfd) for a killed process that is not the test's child to end.
//! - [`sshd`]: a real OpenSSH server per test, with its own host key, client keys and port.
//! - [`registry`]: a real OCI registry (distribution 2.8) per test, anonymous, htpasswd or
//!   token auth, http or https, that locally imported images are pushed to.
//! - Small shared pieces: [`unique`] names, [`free_port`], [`spec`] and the [`Recorder`]
//!   progress sink.
//!
//! Helpers panic with a message on failure: they run inside tests, where a panic is the report.

pub mod docker;
pub mod expect;
pub mod process;
pub mod registry;
pub mod sshd;

use std::fmt::Display;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use stella_plugin_sdk::{
    ComponentSpec, DeployOutcome, DeploySpec, Executor, NoProgress, PluginError, ProgressSink,
    TargetRef,
};

/// The value, or a panic naming `what` failed and why.
pub(crate) fn must<T, E: Display>(result: Result<T, E>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A name part unique to this process and call (`<pid>-<nanos hex>-<n>`), so that tests running
/// in parallel, in one process or several, never share repositories, targets or projects.
pub fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A TCP port on 127.0.0.1 nobody listens on right now (another process may take it before the
/// caller binds it: callers that bind retry on a new one).
pub fn free_port() -> u16 {
    let listener = must(TcpListener::bind("127.0.0.1:0"), "bind 127.0.0.1:0");
    must(listener.local_addr(), "local address").port()
}

/// The deploy spec of release `release` (job `job-<release>`, deployment `dep-<release>`, name
/// `Release <release>`) onto `target`.
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

/// Deploys release `release` of `components` onto `target` (see [`spec`]); panics unless it
/// succeeds.
pub async fn deploy(
    exec: &dyn Executor,
    target: &TargetRef,
    release: &str,
    components: Vec<ComponentSpec>,
) -> DeployOutcome {
    let s = spec(target, release, components);
    must(exec.deploy(&s, &NoProgress).await, "deploy")
}

/// Deploys like [`deploy`] and returns the error it must end with.
pub async fn deploy_fails(
    exec: &dyn Executor,
    target: &TargetRef,
    release: &str,
    components: Vec<ComponentSpec>,
) -> PluginError {
    let s = spec(target, release, components);
    expect::failure(exec.deploy(&s, &NoProgress).await)
}

/// A progress sink that keeps every line.
#[derive(Debug, Default)]
pub struct Recorder(Mutex<Vec<String>>);

impl ProgressSink for Recorder {
    fn progress(&self, message: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(message.to_string());
    }
}

impl Recorder {
    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ports_specs_and_progress() {
        assert_ne!(unique(), unique());
        assert_ne!(free_port(), 0);
        let target = TargetRef {
            name: "t".to_string(),
            kind: "docker".to_string(),
            config: serde_json::Value::Null,
        };
        let s = spec(&target, "r1", Vec::new());
        assert_eq!(
            (
                s.job_id.as_str(),
                s.deployment_id.as_str(),
                s.release_name.as_str()
            ),
            ("job-r1", "dep-r1", "Release r1")
        );
        let r = Recorder::default();
        r.progress("a");
        r.progress("b");
        assert_eq!(r.lines(), vec!["a".to_string(), "b".to_string()]);
    }
}
