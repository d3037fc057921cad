//! Workflow steps the agent runs itself, on its own host, with no executor: HTTP health probes
//! and scripts. Both arrive as signed jobs (`JobKind::HealthCheck`, `JobKind::Script`) that the
//! verifier already checked, including their parameters, and both end in one [`StepResult`]
//! that the worker journals, signs and reports like a deploy result.
//!
//! A probe is read-only and may run again after a restart. A script may not be idempotent, so
//! it runs at most once: a marker file is written before the child starts, and a script job
//! that finds its marker (the agent died while it ran) is failed as `script_interrupted`
//! instead of being started a second time. The workflow's retry decides whether to run it again,
//! as a new job.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use stella_pki::{HealthCheckJob, JobKind, JobPayload, ScriptJob};
use stella_plugin_sdk::ProgressSink;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Most bytes of each output stream (stdout, stderr) a script result carries: the last ones.
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024;
/// A single probe request waits the interval, but at least the minimum (a loaded host or a
/// slow first connection is not an unhealthy service) and at most the maximum. A request in
/// flight when the step's timeout passes is still judged.
const MIN_PROBE_REQUEST: Duration = Duration::from_secs(5);
const MAX_PROBE_REQUEST: Duration = Duration::from_secs(10);
/// After the script's process group is gone, output still buffered in the pipes is read for at
/// most this long (a process that left the group could hold them open forever).
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// Markers of scripts that ran are kept this long, then pruned.
const MARKER_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// The PATH a script gets: its environment is not the agent's (which may hold executor
/// credentials), only this, `HOME`, `LANG` and the job's `STELLA_*` variables.
const SCRIPT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The end of a step job, in the terms of a job result.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// `succeeded` or `failed`.
    pub status: &'static str,
    /// Empty on success; a stable code otherwise.
    pub reason_code: &'static str,
    pub message: String,
    pub outcome: serde_json::Value,
}

impl StepResult {
    fn succeeded(message: String, outcome: serde_json::Value) -> Self {
        StepResult {
            status: "succeeded",
            reason_code: "",
            message,
            outcome,
        }
    }

    fn failed(reason_code: &'static str, message: String, outcome: serde_json::Value) -> Self {
        StepResult {
            status: "failed",
            reason_code,
            message,
            outcome,
        }
    }
}

/// Runs `job` if it is a step job (`None` for a deploy, which belongs to an executor).
/// `state_dir` holds the script markers.
pub async fn run(
    state_dir: &Path,
    job: &JobPayload,
    progress: &dyn ProgressSink,
) -> Option<StepResult> {
    match &job.kind {
        JobKind::Deploy => None,
        JobKind::HealthCheck(check) => Some(probe_http(check, progress).await),
        JobKind::Script(script) => {
            let env = [
                ("STELLA_JOB_ID", job.job_id.as_str()),
                ("STELLA_TARGET", job.target.name.as_str()),
                ("STELLA_TARGET_KIND", job.target.kind.as_str()),
                ("STELLA_RELEASE", job.release_name.as_str()),
                ("STELLA_RELEASE_ID", job.release_id.as_str()),
                ("STELLA_DEPLOYMENT_ID", job.deployment_id.as_str()),
            ];
            Some(run_script_once(state_dir, &job.job_id, script, &env, progress).await)
        }
    }
}

// ---- HTTP probes

/// GETs the URL every `interval` until `healthy_after` consecutive answers carry the expected
/// status (succeeded) or no further probe fits in the timeout (failed). Redirects are not
/// followed: a probe judges the answer of the URL it was given.
pub async fn probe_http(check: &HealthCheckJob, progress: &dyn ProgressSink) -> StepResult {
    let started = Instant::now();
    let timeout = Duration::from_millis(check.timeout_ms);
    let interval = Duration::from_millis(check.interval_ms);
    let deadline = started + timeout;
    let url = &check.http.url;
    let expect = check.http.expect_status;
    let client = match probe_client() {
        Ok(c) => c,
        Err(e) => {
            return StepResult::failed(
                "health_check_failed",
                format!("cannot set up the HTTP client: {e}"),
                serde_json::json!({ "url": url }),
            );
        }
    };
    progress.progress(&format!(
        "probing {url} for HTTP {expect}, {} in a row needed",
        check.healthy_after
    ));
    let mut probes: u32 = 0;
    let mut in_a_row: u32 = 0;
    let mut last = String::new();
    loop {
        let request_timeout = interval.clamp(MIN_PROBE_REQUEST, MAX_PROBE_REQUEST);
        probes += 1;
        let observation = match client
            .get(url.as_str())
            .timeout(request_timeout)
            .send()
            .await
        {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if status == expect {
                    in_a_row += 1;
                } else {
                    in_a_row = 0;
                }
                format!("HTTP {status}")
            }
            Err(e) => {
                in_a_row = 0;
                probe_error(&e)
            }
        };
        if observation != last {
            progress.progress(&format!("probe {probes}: {observation}"));
            last = observation;
        }
        let outcome = || {
            serde_json::json!({
                "url": url, "expect_status": expect, "probes": probes,
                "healthy_in_a_row": in_a_row, "healthy_after": check.healthy_after,
                "last": last,
            })
        };
        if in_a_row >= check.healthy_after {
            return StepResult::succeeded(
                format!("{url}: HTTP {expect} {in_a_row} times in a row"),
                outcome(),
            );
        }
        if Instant::now() + interval > deadline {
            return StepResult::failed(
                "health_check_failed",
                format!(
                    "{url} was not healthy within {}: last answer {last} (expected HTTP {expect}, \
                     {} in a row) after {probes} probes",
                    human(timeout),
                    check.healthy_after
                ),
                outcome(),
            );
        }
        tokio::time::sleep(interval).await;
    }
}

fn probe_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "no answer in time".to_string()
    } else if e.is_connect() {
        "connection refused or unreachable".to_string()
    } else {
        // The error chain names the cause (TLS, protocol) without the URL's query.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        text
    }
}

/// HTTPS probes trust the host's store (ring only, like every TLS in Stella).
fn probe_client() -> Result<reqwest::Client, String> {
    let (tls, _) = stella_pki::client_config_host_trust(None).map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())
}

fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

// ---- scripts

/// Where the marker of `job_id`'s script lives (named by hash: job ids never become paths).
fn marker_path(state_dir: &Path, job_id: &str) -> PathBuf {
    let name = hex::encode(Sha256::digest(job_id.as_bytes()));
    state_dir.join("scripts").join(format!("{name}.started"))
}

/// Runs the script unless it already started once (see the module docs).
pub async fn run_script_once(
    state_dir: &Path,
    job_id: &str,
    script: &ScriptJob,
    env: &[(&str, &str)],
    progress: &dyn ProgressSink,
) -> StepResult {
    let marker = marker_path(state_dir, job_id);
    match write_marker(&marker) {
        Ok(true) => {}
        Ok(false) => {
            return StepResult::failed(
                "script_interrupted",
                "the script started before the agent restarted and may have run in part; it is \
                 not started twice (a retry of the step runs it again as a new job)"
                    .to_string(),
                serde_json::json!({ "command": script.command }),
            );
        }
        Err(e) => {
            return StepResult::failed(
                "script_not_started",
                format!(
                    "cannot record the script's start in {}: {e}",
                    marker.display()
                ),
                serde_json::json!({ "command": script.command }),
            );
        }
    }
    prune_markers(marker.parent());
    run_script(script, env, progress).await
}

/// Creates the marker; false when it already exists.
fn write_marker(marker: &Path) -> std::io::Result<bool> {
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(marker)
    {
        Ok(file) => {
            // Durable before the child starts: a crash right after must find it.
            file.sync_all()?;
            if let Some(dir) = marker.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

fn prune_markers(dir: Option<&Path>) {
    let Some(entries) = dir.and_then(|d| std::fs::read_dir(d).ok()) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > MARKER_RETENTION);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The last [`MAX_OUTPUT_BYTES`] of a stream, and how much there was in all.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
    total: u64,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > MAX_OUTPUT_BYTES {
            let cut = self.bytes.len() - MAX_OUTPUT_BYTES;
            self.bytes.drain(..cut);
        }
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        if self.total > self.bytes.len() as u64 {
            format!(
                "[… {} earlier bytes dropped]\n{text}",
                self.total - self.bytes.len() as u64
            )
        } else {
            text.into_owned()
        }
    }
}

async fn read_tail(mut stream: impl AsyncRead + Unpin) -> Tail {
    let mut tail = Tail::default();
    let mut buf = vec![0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return tail,
            Ok(n) => tail.push(&buf[..n]),
        }
    }
}

/// Kills every process of the script's group (the script and whatever it started).
fn kill_group(pid: Option<u32>) {
    let Some(pgid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0) else {
        return;
    };
    // SAFETY: kill(2) has no memory effects; a negative pid addresses the process group the
    // child leads (it was started with process_group(0)), never this agent's own group.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// A script must not outlive an agent that is killed (SIGKILL, OOM): `kill_on_drop` and the
/// group kill never run then, and the orphan would go on unsupervised, with no timeout, finish
/// its effect after the restarted agent failed its job as `script_interrupted`, and run beside a
/// retry of the step. The kernel sends the script SIGKILL when the agent goes (parent-death
/// signal; it is tied to the thread that spawned the script, a runtime worker thread, which lives
/// as long as the agent). The signal is not inherited across fork: a command the script is
/// running at that moment finishes, but nothing after it in the script starts.
fn die_with_agent(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (prctl, getppid), allocating nothing.
    let agent = std::process::id();
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent died between fork and prctl: the signal will never come.
            if u32::try_from(libc::getppid()).ok() != Some(agent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Runs `script.command` as a child process (no shell unless the command names one), in its own
/// process group, with a cleared environment, stdin closed, output captured (the tail of each
/// stream) and the whole group killed when `timeout_ms` passes or when the script ends.
pub async fn run_script(
    script: &ScriptJob,
    env: &[(&str, &str)],
    progress: &dyn ProgressSink,
) -> StepResult {
    let timeout = Duration::from_millis(script.timeout_ms);
    let Some((program, args)) = script.command.split_first() else {
        return StepResult::failed(
            "script_not_started",
            "the script has no command".to_string(),
            serde_json::json!({ "command": script.command }),
        );
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", SCRIPT_PATH)
        .env("LANG", "C.UTF-8")
        .envs(env.iter().copied())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    die_with_agent(&mut command);
    if let Some(home) = std::env::var_os("HOME") {
        command.env("HOME", home);
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return StepResult::failed(
                "script_not_started",
                format!("cannot start {program:?}: {e}"),
                serde_json::json!({ "command": script.command }),
            );
        }
    };
    let pid = child.id();
    progress.progress(&format!(
        "script started (pid {}), timeout {}",
        pid.unwrap_or_default(),
        human(timeout)
    ));
    let stdout = child.stdout.take().map(|s| tokio::spawn(read_tail(s)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(read_tail(s)));

    let waited = tokio::time::timeout(timeout, child.wait()).await;
    // Whatever the script left behind in its group ends with it (and a timed-out script is
    // killed with all its children, so nothing holds the output pipes open).
    kill_group(pid);
    let exit = match waited {
        Ok(status) => Some(status),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    };
    let collect = |handle: Option<tokio::task::JoinHandle<Tail>>| async move {
        let Some(handle) = handle else {
            return Tail::default();
        };
        let abort = handle.abort_handle();
        match tokio::time::timeout(OUTPUT_DRAIN, handle).await {
            Ok(Ok(tail)) => tail,
            _ => {
                abort.abort();
                Tail::default()
            }
        }
    };
    let (out, err) = (collect(stdout).await, collect(stderr).await);
    let outcome = |exit_code: Option<i32>, signal: Option<i32>, timed_out: bool| {
        serde_json::json!({
            "command": script.command,
            "exit_code": exit_code,
            "signal": signal,
            "timed_out": timed_out,
            "stdout": out.text(),
            "stderr": err.text(),
            "stdout_bytes": out.total,
            "stderr_bytes": err.total,
        })
    };
    let last_line = |t: &Tail| {
        String::from_utf8_lossy(&t.bytes)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| format!(": {}", l.chars().take(500).collect::<String>()))
            .unwrap_or_default()
    };
    match exit {
        None => StepResult::failed(
            "script_timeout",
            format!(
                "the script was still running after {} and was killed",
                human(timeout)
            ),
            outcome(None, Some(libc::SIGKILL), true),
        ),
        Some(Err(e)) => StepResult::failed(
            "script_failed",
            format!("cannot wait for the script: {e}"),
            outcome(None, None, false),
        ),
        Some(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(0), _) => StepResult::succeeded(
                    "the script exited with code 0".to_string(),
                    outcome(Some(0), None, false),
                ),
                (Some(code), _) => StepResult::failed(
                    "script_failed",
                    format!("the script exited with code {code}{}", last_line(&err)),
                    outcome(Some(code), None, false),
                ),
                (None, signal) => StepResult::failed(
                    "script_failed",
                    format!(
                        "the script was killed by signal {}",
                        signal.unwrap_or_default()
                    ),
                    outcome(None, signal, false),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::Mutex;

    use super::*;
    use stella_pki::HttpProbe;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<String>>);

    impl ProgressSink for Recorded {
        fn progress(&self, message: &str) {
            self.0.lock().unwrap().push(message.to_string());
        }
    }

    /// A loopback HTTP server answering the statuses of `plan` in turn (the last one forever),
    /// counting the requests it answered.
    struct Server {
        url: String,
        answered: std::sync::Arc<std::sync::atomic::AtomicU32>,
    }

    fn serve(plan: Vec<u16>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = answered.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                // Request line and headers up to the blank line.
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    if line == "\r\n" {
                        break;
                    }
                    line.clear();
                }
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) as usize;
                let status = plan[n.min(plan.len() - 1)];
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        Server { url, answered }
    }

    fn check(url: &str, healthy_after: u32, timeout_ms: u64) -> HealthCheckJob {
        HealthCheckJob {
            http: HttpProbe {
                url: url.to_string(),
                expect_status: 200,
            },
            interval_ms: 10,
            healthy_after,
            timeout_ms,
        }
    }

    #[tokio::test]
    async fn a_probe_succeeds_after_enough_healthy_answers_in_a_row() {
        // 200, 500 (resets the count), then 200 three times.
        let server = serve(vec![200, 500, 200]);
        let progress = Recorded::default();
        let result = probe_http(&check(&server.url, 3, 60_000), &progress).await;
        assert_eq!(result.status, "succeeded", "{result:?}");
        assert_eq!(result.outcome["probes"], 5);
        assert_eq!(result.outcome["healthy_in_a_row"], 3);
        assert_eq!(server.answered.load(std::sync::atomic::Ordering::SeqCst), 5);
        let seen = progress.0.lock().unwrap().clone();
        assert!(seen.iter().any(|m| m == "probe 2: HTTP 500"), "{seen:?}");
        assert!(seen.iter().any(|m| m == "probe 3: HTTP 200"), "{seen:?}");
    }

    #[tokio::test]
    async fn a_probe_that_never_gets_the_expected_status_fails_at_its_timeout() {
        let server = serve(vec![500]);
        let result = probe_http(&check(&server.url, 1, 200), &Recorded::default()).await;
        assert_eq!(result.status, "failed");
        assert_eq!(result.reason_code, "health_check_failed");
        assert!(
            result
                .message
                .contains("last answer HTTP 500 (expected HTTP 200"),
            "{}",
            result.message
        );
        assert!(result.outcome["probes"].as_u64().unwrap() >= 1);
    }

    #[tokio::test]
    async fn a_probe_of_a_closed_port_fails_with_the_reason() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/");
        let result = probe_http(&check(&url, 1, 100), &Recorded::default()).await;
        assert_eq!(result.reason_code, "health_check_failed");
        assert!(
            result.message.contains("connection refused"),
            "{}",
            result.message
        );
    }

    #[tokio::test]
    async fn a_redirect_is_judged_not_followed() {
        let server = serve(vec![302]);
        let mut probe = check(&server.url, 1, 60_000);
        probe.http.expect_status = 302;
        let result = probe_http(&probe, &Recorded::default()).await;
        assert_eq!(result.status, "succeeded", "{result:?}");
    }

    fn script(command: &[&str], timeout_ms: u64) -> ScriptJob {
        ScriptJob {
            command: command.iter().map(|s| s.to_string()).collect(),
            timeout_ms,
        }
    }

    #[tokio::test]
    async fn a_script_that_exits_zero_succeeds_with_its_output() {
        let result = run_script(
            &script(
                &[
                    "/bin/sh",
                    "-c",
                    "echo out; echo err >&2; echo \"$STELLA_TARGET\"",
                ],
                60_000,
            ),
            &[("STELLA_TARGET", "web-1")],
            &Recorded::default(),
        )
        .await;
        assert_eq!(result.status, "succeeded", "{result:?}");
        assert_eq!(result.outcome["exit_code"], 0);
        assert_eq!(result.outcome["stdout"], "out\nweb-1\n");
        assert_eq!(result.outcome["stderr"], "err\n");
    }

    #[tokio::test]
    async fn a_script_runs_without_a_shell_and_without_the_agents_environment() {
        // No shell: the metacharacters reach the program as they are.
        let result = run_script(
            &script(&["/bin/echo", "$HOME", ";", "|"], 60_000),
            &[],
            &Recorded::default(),
        )
        .await;
        assert_eq!(result.outcome["stdout"], "$HOME ; |\n");
        let result = run_script(
            &script(&["/usr/bin/env"], 60_000),
            &[("STELLA_JOB_ID", "job_1")],
            &Recorded::default(),
        )
        .await;
        let env = result.outcome["stdout"].as_str().unwrap().to_string();
        let mut names: Vec<&str> = env
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        names.sort();
        names.retain(|n| *n != "HOME");
        assert_eq!(names, ["LANG", "PATH", "STELLA_JOB_ID"], "{env}");
    }

    #[tokio::test]
    async fn a_failing_script_reports_its_exit_code_and_last_error_line() {
        let result = run_script(
            &script(
                &["/bin/sh", "-c", "echo 'no such table' >&2; exit 3"],
                60_000,
            ),
            &[],
            &Recorded::default(),
        )
        .await;
        assert_eq!(result.status, "failed");
        assert_eq!(result.reason_code, "script_failed");
        assert_eq!(
            result.message,
            "the script exited with code 3: no such table"
        );
        assert_eq!(result.outcome["exit_code"], 3);
    }

    #[tokio::test]
    async fn a_program_that_does_not_exist_is_not_started() {
        let result = run_script(
            &script(&["/nonexistent/program"], 60_000),
            &[],
            &Recorded::default(),
        )
        .await;
        assert_eq!(result.reason_code, "script_not_started");
        assert!(
            result.message.contains("/nonexistent/program"),
            "{}",
            result.message
        );
    }

    #[tokio::test]
    async fn a_script_past_its_timeout_is_killed_with_its_children() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("child.pid");
        // The shell starts a background sleeper that keeps the output pipe open, then waits.
        let cmd = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let result = run_script(
            &script(&["/bin/sh", "-c", &cmd], 2000),
            &[],
            &Recorded::default(),
        )
        .await;
        assert_eq!(result.status, "failed");
        assert_eq!(result.reason_code, "script_timeout");
        assert_eq!(result.outcome["timed_out"], true);
        assert!(result.message.contains("killed"), "{}", result.message);
        // The background child is gone too (SIGKILL is delivered asynchronously: wait for the
        // end rather than look once).
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        stella_plugin_testkit::process::assert_exits(
            pid,
            std::time::Duration::from_secs(10),
            "the script's background child",
        );
    }

    #[tokio::test]
    async fn long_output_keeps_its_tail_and_says_how_much_was_dropped() {
        let result = run_script(
            &script(
                &[
                    "/bin/sh",
                    "-c",
                    "i=0; while [ $i -lt 5000 ]; do echo line-$i; i=$((i+1)); done",
                ],
                60_000,
            ),
            &[],
            &Recorded::default(),
        )
        .await;
        let stdout = result.outcome["stdout"].as_str().unwrap();
        assert!(stdout.starts_with("[… "), "{}", &stdout[..80]);
        assert!(stdout.ends_with("line-4999\n"));
        assert!(stdout.len() <= MAX_OUTPUT_BYTES + 64);
        let total: u64 = (0..5000).map(|i| format!("line-{i}\n").len() as u64).sum();
        assert_eq!(result.outcome["stdout_bytes"], total);
    }

    #[tokio::test]
    async fn a_script_job_runs_at_most_once() {
        let tmp = tempfile::tempdir().unwrap();
        let flag = tmp.path().join("ran");
        let job = script(&["/usr/bin/touch", flag.to_str().unwrap()], 60_000);
        let first = run_script_once(tmp.path(), "job_1", &job, &[], &Recorded::default()).await;
        assert_eq!(first.status, "succeeded", "{first:?}");
        std::fs::remove_file(&flag).unwrap();
        // The same job again (a restart resumed it): refused, and the command did not run.
        let again = run_script_once(tmp.path(), "job_1", &job, &[], &Recorded::default()).await;
        assert_eq!(again.reason_code, "script_interrupted");
        assert!(!flag.exists(), "the script ran twice");
        // Another job runs.
        let other = run_script_once(tmp.path(), "job_2", &job, &[], &Recorded::default()).await;
        assert_eq!(other.status, "succeeded");
    }
}
