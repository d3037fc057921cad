//! The `winrm` executor: puts releases on Windows hosts through WS-Management remote shells
//! (WinRS, MS-WSMV) over HTTP or HTTPS, with Basic or NTLMv2 authentication.
//!
//! A deploy runs the target's `deploy_script` with
//! `powershell -NoProfile -NonInteractive -EncodedCommand <base64 UTF-16LE>`; the release is set
//! as environment variables at the top of that script (`STELLA_RELEASE_ID`,
//! `STELLA_RELEASE_NAME`, `STELLA_DEPLOYMENT_ID`, `STELLA_JOB_ID`, `STELLA_TARGET`,
//! `STELLA_COMPONENTS` as JSON, and `STELLA_IMAGE_<NAME>=repo@digest` per component). Its
//! stdout and stderr are streamed as progress lines; a non-zero exit fails the job with the
//! exit code and the last lines of output; past `timeout_secs` the command is signalled to
//! terminate and the job fails with a timeout. The shell is deleted after every operation,
//! failed or not.
//!
//! The version sticker lives on the target (`sticker_path`, default
//! `C:\ProgramData\Stella\stella.version.json`), written by PowerShell to a temporary name and
//! moved over the old one, and read back the same way.
//!
//! Target config keys: `endpoint` (`http://host:5985/wsman` or `https://host:5986/wsman`),
//! `username` (`user`, `DOMAIN\user` or a UPN), `password_env` or `password_file` (on the agent
//! host), `auth` (`ntlm`, the default, or `basic`), `ca_file` (PEM, required for https unless
//! `insecure_skip_verify: true`), `sticker_path`, `deploy_script`, `inventory_script` (prints
//! JSON lines `{"component","digest","state"}`; without it inventory is the sticker's
//! components in state `unknown`), `timeout_secs` (300), `operation_timeout_secs` (60, the
//! WS-Man OperationTimeout of each Receive long-poll), `connect_timeout_secs` (10).
//!
//! NTLM over plain HTTP encrypts every message with the NTLM session keys, as Windows demands
//! by default (`AllowUnencrypted=false`); over HTTPS it binds the login to the TLS channel
//! (channel binding token). Basic over plain HTTP needs `AllowUnencrypted=true` on the
//! listener and sends the password base64-encoded in every request: prefer https. Kerberos
//! and CredSSP are not implemented. The password is read when an operation starts and is
//! never logged or put in errors.
//!
//! Limits: a script travels on the command line (`-EncodedCommand`), so deploy and inventory
//! scripts plus the release variables must stay under about 12 000 characters, and a sticker
//! under about 8 KiB (a release of a few dozen components); longer input is refused before
//! anything runs on the target.

mod config;
mod ntlm;
#[cfg(test)]
mod ntlm_tests;
mod powershell;
mod transport;
mod wsman;
mod xml;
#[cfg(test)]
mod xml_tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use stella_plugin_sdk::output::{OutputTail, Stream};
use stella_plugin_sdk::{
    ComponentAction, ComponentOutcome, ComponentSpec, DeployOutcome, DeploySpec, Executor,
    ExecutorContext, InventoryItem, PluginError, ProgressSink, STICKER_SCHEMA, TargetRef,
    VersionSticker, is_valid_digest,
};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{PasswordSource, TargetConfig};
use crate::transport::{Transport, TransportError};
use crate::wsman::{Client, WsmanError};

pub use crate::config::{
    DEFAULT_CONNECT_TIMEOUT_SECS, DEFAULT_OPERATION_TIMEOUT_SECS, DEFAULT_STICKER_PATH,
    DEFAULT_TIMEOUT_SECS,
};

/// The executor kind this crate implements.
pub const KIND: &str = "winrm";

/// Lines of output kept for error messages.
/// Budget for Signal and Delete after the operation itself ended (also after its deadline).
const CLEANUP_BUDGET: Duration = Duration::from_secs(10);
/// Output kept in full for parsing (sticker, inventory); deploy output is only streamed.
const MAX_KEPT_STDOUT: usize = 8 << 20;

/// Runs releases on Windows hosts reached over WinRM.
pub struct WinrmExecutor {
    ctx: ExecutorContext,
    /// Two jobs for the same target must not interleave their steps.
    target_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for WinrmExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WinrmExecutor")
            .field("state_dir", &self.ctx.state_dir)
            .finish_non_exhaustive()
    }
}

/// One line an `inventory_script` prints. Further fields are ignored.
#[derive(Debug, serde::Deserialize)]
struct InventoryLine {
    component: String,
    digest: String,
    state: String,
    #[serde(default)]
    health: Option<String>,
    #[serde(default)]
    workload_id: Option<String>,
}

/// Splits a byte stream into lines (`\n` or `\r\n`), keeping an unfinished last line.
#[derive(Default)]
struct LineSplitter {
    buf: Vec<u8>,
    started: bool,
}

impl LineSplitter {
    fn line(&mut self, mut raw: &[u8]) -> String {
        if raw.ends_with(b"\r") {
            raw = &raw[..raw.len() - 1];
        }
        let text = String::from_utf8_lossy(raw).into_owned();
        if self.started {
            text
        } else {
            self.started = true;
            text.trim_start_matches('\u{feff}').to_string()
        }
    }

    fn push(&mut self, data: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.buf.drain(..=i).collect();
            lines.push(self.line(&raw[..raw.len() - 1]));
        }
        lines
    }

    fn finish(&mut self) -> Option<String> {
        if self.buf.is_empty() {
            return None;
        }
        let raw = std::mem::take(&mut self.buf);
        Some(self.line(&raw))
    }
}

/// What a finished command left behind.
#[derive(Default)]
struct RunOutput {
    exit_code: i64,
    stdout: Vec<u8>,
    tail: OutputTail,
}

impl RunOutput {
    fn tail_text(&self) -> String {
        self.tail.text()
    }

    fn keep(&mut self, line: String, stream: Stream, on_line: Option<&dyn ProgressSink>) {
        if let Some(sink) = on_line {
            sink.progress(&line);
        }
        self.tail.push(stream, line);
    }
}

enum RunError {
    TimedOut,
    TooLong(String),
    Wsman(WsmanError),
}

/// An open remote shell on one target.
struct Session {
    client: Client,
    shell_id: String,
    dest: String,
}

fn backend(dest: &str, what: &str, e: &WsmanError) -> PluginError {
    match e {
        WsmanError::Transport(TransportError::Auth(m)) => {
            PluginError::Backend(format!("{dest}: authentication failed: {m}"))
        }
        e => PluginError::Backend(format!("{dest}: {what}: {e}")),
    }
}

fn load_password(source: &PasswordSource) -> Result<String, PluginError> {
    let password = match source {
        PasswordSource::Env(name) => std::env::var(name).map_err(|_| {
            PluginError::InvalidConfig(format!(
                "password_env: environment variable {name} is not set (or not UTF-8) in the agent's environment"
            ))
        })?,
        PasswordSource::File(path) => {
            let mut s = std::fs::read_to_string(path).map_err(|e| {
                PluginError::InvalidConfig(format!(
                    "password_file: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            // Files written by editors and `echo` end in a newline that is not part of it.
            if s.ends_with('\n') {
                s.pop();
                if s.ends_with('\r') {
                    s.pop();
                }
            }
            s
        }
    };
    if password.is_empty() {
        let key = match source {
            PasswordSource::Env(_) => "password_env",
            PasswordSource::File(_) => "password_file",
        };
        return Err(PluginError::InvalidConfig(format!(
            "{key}: the password is empty"
        )));
    }
    Ok(password)
}

impl Session {
    async fn open(cfg: &TargetConfig, deadline: Instant) -> Result<Self, PluginError> {
        let dest = cfg.endpoint.url();
        let password = load_password(&cfg.password)?;
        let tls = transport::tls_connector(&cfg.tls).map_err(PluginError::InvalidConfig)?;
        let transport = Transport::new(
            cfg.endpoint.clone(),
            cfg.auth,
            cfg.username.clone(),
            password,
            tls,
            cfg.connect_timeout,
        );
        let mut client = Client::new(transport, dest.clone(), cfg.operation_timeout);
        let shell_id = match client.create_shell(deadline).await {
            Ok(id) => id,
            Err(e) if e.is_timeout() => {
                return Err(PluginError::Timeout {
                    what: format!("opening a remote shell on {dest}"),
                    seconds: cfg.timeout.as_secs(),
                });
            }
            Err(e) => return Err(backend(&dest, "cannot open a remote shell", &e)),
        };
        Ok(Self {
            client,
            shell_id,
            dest,
        })
    }

    /// Deletes the shell, which also ends whatever still runs in it. Best effort: the
    /// operation's result is already decided.
    async fn close(mut self) {
        let deadline = Instant::now() + CLEANUP_BUDGET;
        if let Err(e) = self.client.delete_shell(&self.shell_id, deadline).await {
            warn!(dest = %self.dest, shell = %self.shell_id, error = %e, "cannot delete the remote shell");
        }
    }

    /// Runs `script` in PowerShell, feeding output lines to `on_line`, until it exits or the
    /// deadline passes (then the command is signalled to terminate).
    async fn run(
        &mut self,
        script: &str,
        what: &str,
        deadline: Instant,
        on_line: Option<&dyn ProgressSink>,
    ) -> Result<RunOutput, RunError> {
        let args = powershell::command_args(script, what).map_err(RunError::TooLong)?;
        let command_id = match self
            .client
            .command(&self.shell_id, "powershell", &args, deadline)
            .await
        {
            Ok(id) => id,
            Err(e) if e.is_timeout() => return Err(RunError::TimedOut),
            Err(e) => return Err(RunError::Wsman(e)),
        };
        let mut out = RunOutput::default();
        let mut stdout_lines = LineSplitter::default();
        let mut stderr_lines = LineSplitter::default();
        let result = loop {
            match self
                .client
                .receive(&self.shell_id, &command_id, deadline)
                .await
            {
                Ok(r) => {
                    if out.stdout.len() < MAX_KEPT_STDOUT {
                        out.stdout.extend_from_slice(&r.stdout);
                    }
                    for line in stdout_lines.push(&r.stdout) {
                        out.keep(line, Stream::Stdout, on_line);
                    }
                    for line in stderr_lines.push(&r.stderr) {
                        for l in powershell::readable_stderr(&line) {
                            out.keep(l, Stream::Stderr, on_line);
                        }
                    }
                    if let Some(code) = r.exit_code {
                        break Ok(code);
                    }
                }
                Err(e) if e.is_timeout() => break Err(RunError::TimedOut),
                Err(e) => break Err(RunError::Wsman(e)),
            }
        };
        if let Some(line) = stdout_lines.finish() {
            out.keep(line, Stream::Stdout, on_line);
        }
        if let Some(line) = stderr_lines.finish() {
            for l in powershell::readable_stderr(&line) {
                out.keep(l, Stream::Stderr, on_line);
            }
        }
        // Done or not, terminating the command releases it on the server (as winrs does);
        // after a timeout or an error it is what stops the process.
        let cleanup = Instant::now() + CLEANUP_BUDGET;
        if let Err(e) = self
            .client
            .signal_terminate(&self.shell_id, &command_id, cleanup)
            .await
        {
            warn!(dest = %self.dest, command = %command_id, error = %e, "cannot signal the remote command");
        }
        out.exit_code = result?;
        Ok(out)
    }

    async fn read_sticker(
        &mut self,
        path: &str,
        deadline: Instant,
        seconds: u64,
    ) -> Result<Option<VersionSticker>, PluginError> {
        let dest = self.dest.clone();
        let out = self
            .run(
                &powershell::read_file_script(path),
                "sticker read",
                deadline,
                None,
            )
            .await
            .map_err(|e| match e {
                RunError::TimedOut => PluginError::Timeout {
                    what: format!("reading the sticker on {dest}"),
                    seconds,
                },
                RunError::TooLong(m) => PluginError::Sticker(m),
                RunError::Wsman(e) => backend(&dest, "reading the sticker", &e),
            })?;
        if out.exit_code != 0 {
            return Err(PluginError::Sticker(format!(
                "{dest}: reading {path} failed with exit code {}:\n{}",
                out.exit_code,
                out.tail_text()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let text = text.trim().trim_start_matches('\u{feff}');
        if text == powershell::NO_STICKER {
            return Ok(None);
        }
        let compact: String = text.split_whitespace().collect();
        let raw = B64.decode(compact.as_bytes()).map_err(|_| {
            PluginError::Sticker(format!("{dest}: {path}: the read script printed no base64"))
        })?;
        let sticker: VersionSticker = serde_json::from_slice(&raw).map_err(|e| {
            PluginError::Sticker(format!("{dest}: {path}: not a version sticker: {e}"))
        })?;
        if sticker.schema != STICKER_SCHEMA {
            return Err(PluginError::Sticker(format!(
                "{dest}: {path}: schema {:?}, expected {STICKER_SCHEMA:?}",
                sticker.schema
            )));
        }
        Ok(Some(sticker))
    }
}

impl WinrmExecutor {
    /// Nothing is contacted here: every operation connects to its target on its own, so an
    /// unreachable host never keeps the agent from starting.
    pub fn new(ctx: ExecutorContext) -> Self {
        Self {
            ctx,
            target_locks: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn target_lock(&self, target: &str) -> Arc<tokio::sync::Mutex<()>> {
        // A poisoned map is still a valid map: the lock only guards insertion.
        let mut locks = self
            .target_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(target.to_string()).or_default().clone()
    }

    fn parse(&self, target: &TargetRef) -> Result<TargetConfig, PluginError> {
        if target.kind != KIND {
            return Err(PluginError::InvalidConfig(format!(
                "target {} has kind {:?}, this executor handles {KIND:?}",
                target.name, target.kind
            )));
        }
        if target.name.is_empty() {
            return Err(PluginError::InvalidConfig(
                "target name must not be empty".to_string(),
            ));
        }
        config::parse(&target.config)
    }

    async fn deploy_in(
        &self,
        session: &mut Session,
        cfg: &TargetConfig,
        spec: &DeploySpec,
        script: &str,
        deadline: Instant,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        let started = Instant::now();
        let dest = session.dest.clone();
        let seconds = cfg.timeout.as_secs();
        // Only to tell created from replaced; the script runs either way (it is the ensure).
        let previous = match session
            .read_sticker(&cfg.sticker_path, deadline, seconds)
            .await
        {
            Ok(s) => s,
            Err(e @ PluginError::Timeout { .. }) => return Err(e),
            Err(e) => {
                warn!(%dest, error = %e, "cannot read the previous sticker; reporting components as created");
                None
            }
        };
        progress.progress(&format!("running deploy script on {dest}"));
        info!(%dest, job = %spec.job_id, "running deploy script");
        let out = session
            .run(script, "deploy_script", deadline, Some(progress))
            .await
            .map_err(|e| match e {
                RunError::TimedOut => {
                    warn!(%dest, seconds, "deploy script timed out; terminated");
                    PluginError::Timeout {
                        what: format!("deploy script on {dest} (terminated)"),
                        seconds,
                    }
                }
                RunError::TooLong(m) => PluginError::InvalidConfig(m),
                RunError::Wsman(e) => backend(&dest, "deploy script", &e),
            })?;
        if out.exit_code != 0 {
            warn!(%dest, exit = out.exit_code, "deploy script failed");
            return Err(PluginError::Backend(format!(
                "deploy script on {dest} failed with exit code {}; last {} line(s) of output:\n{}",
                out.exit_code,
                out.tail.len(),
                out.tail_text()
            )));
        }
        progress.progress(&format!("deploy script on {dest} succeeded"));
        let duration_ms = millis(started.elapsed());
        let components = spec
            .components
            .iter()
            .map(|c| {
                let before = previous
                    .as_ref()
                    .and_then(|s| s.components.iter().find(|p| p.name == c.name));
                let action = match before {
                    None => ComponentAction::Created,
                    Some(p)
                        if p.digest == c.digest
                            && previous
                                .as_ref()
                                .is_some_and(|s| s.release_id == spec.release_id) =>
                    {
                        ComponentAction::Unchanged
                    }
                    Some(_) => ComponentAction::Replaced,
                };
                ComponentOutcome {
                    name: c.name.clone(),
                    digest: c.digest.clone(),
                    workload_id: workload_id(cfg, &c.name),
                    action,
                    duration_ms,
                }
            })
            .collect();
        Ok(DeployOutcome {
            components,
            duration_ms,
        })
    }

    async fn inventory_in(
        &self,
        session: &mut Session,
        cfg: &TargetConfig,
        target: &str,
        deadline: Instant,
    ) -> Result<Vec<InventoryItem>, PluginError> {
        let dest = session.dest.clone();
        let seconds = cfg.timeout.as_secs();
        let sticker = session
            .read_sticker(&cfg.sticker_path, deadline, seconds)
            .await?;
        let Some(script) = cfg.inventory_script.as_deref() else {
            // Without a way to look, the sticker is all there is: what was deployed, in an
            // unknown state.
            return Ok(sticker
                .map(|s| {
                    s.components
                        .iter()
                        .map(|c| InventoryItem {
                            component: c.name.clone(),
                            digest: c.digest.clone(),
                            state: "unknown".to_string(),
                            health: None,
                            workload_id: workload_id(cfg, &c.name),
                            release_id: Some(s.release_id.clone()),
                            deployment_id: Some(s.deployment_id.clone()),
                        })
                        .collect()
                })
                .unwrap_or_default());
        };
        let out = session
            .run(
                &powershell::inventory_script(target, script),
                "inventory_script",
                deadline,
                None,
            )
            .await
            .map_err(|e| match e {
                RunError::TimedOut => PluginError::Timeout {
                    what: format!("inventory script on {dest} (terminated)"),
                    seconds,
                },
                RunError::TooLong(m) => PluginError::InvalidConfig(m),
                RunError::Wsman(e) => backend(&dest, "inventory script", &e),
            })?;
        if out.exit_code != 0 {
            return Err(PluginError::Backend(format!(
                "inventory script on {dest} failed with exit code {}; last {} line(s) of output:\n{}",
                out.exit_code,
                out.tail.len(),
                out.tail_text()
            )));
        }
        let mut items = Vec::new();
        let text = String::from_utf8_lossy(&out.stdout);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim().trim_start_matches('\u{feff}');
            if line.is_empty() {
                continue;
            }
            let item: InventoryLine = serde_json::from_str(line).map_err(|e| {
                PluginError::Backend(format!(
                    "inventory script on {dest}: line {} is not {{\"component\",\"digest\",\"state\"}} JSON: {e}",
                    n + 1
                ))
            })?;
            if item.component.is_empty() {
                return Err(PluginError::Backend(format!(
                    "inventory script on {dest}: line {} has an empty component",
                    n + 1
                )));
            }
            // The sticker says which release put a digest there; it only applies while the
            // component still runs that digest.
            let deployed = sticker.as_ref().filter(|s| {
                s.components
                    .iter()
                    .any(|c| c.name == item.component && c.digest == item.digest)
            });
            items.push(InventoryItem {
                workload_id: item
                    .workload_id
                    .unwrap_or_else(|| workload_id(cfg, &item.component)),
                component: item.component,
                digest: item.digest,
                state: item.state,
                health: item.health,
                release_id: deployed.map(|s| s.release_id.clone()),
                deployment_id: deployed.map(|s| s.deployment_id.clone()),
            });
        }
        items.sort_by(|a, b| {
            (a.component.as_str(), a.workload_id.as_str())
                .cmp(&(b.component.as_str(), b.workload_id.as_str()))
        });
        Ok(items)
    }
}

/// There is no workload id the executor could know, so endpoint and component stand in.
fn workload_id(cfg: &TargetConfig, component: &str) -> String {
    format!("winrm://{}/{component}", cfg.endpoint.authority())
}

fn validate_components(components: &[ComponentSpec]) -> Result<(), PluginError> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for c in components {
        if c.name.is_empty() {
            return Err(PluginError::InvalidConfig(
                "component names must not be empty".to_string(),
            ));
        }
        if c.name.contains('\0') || c.image.contains('\0') {
            return Err(PluginError::InvalidConfig(format!(
                "component {:?}: name and image must not contain NUL",
                c.name
            )));
        }
        if c.image.is_empty() {
            return Err(PluginError::InvalidConfig(format!(
                "component {}: image must not be empty",
                c.name
            )));
        }
        if !is_valid_digest(&c.digest) {
            return Err(PluginError::InvalidConfig(format!(
                "component {}: digest {:?} is not sha256:<64 lowercase hex>",
                c.name, c.digest
            )));
        }
        // Two components mapping to one variable would overwrite each other.
        if let Some(other) = seen.insert(powershell::image_env_name(&c.name), &c.name) {
            return Err(PluginError::InvalidConfig(format!(
                "components {other:?} and {:?} map to the same environment variable",
                c.name
            )));
        }
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait::async_trait]
impl Executor for WinrmExecutor {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate_config(&self, target: &TargetRef) -> Result<(), PluginError> {
        self.parse(target).map(|_| ())
    }

    async fn deploy(
        &self,
        spec: &DeploySpec,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        let cfg = self.parse(&spec.target)?;
        validate_components(&spec.components)?;
        // Built (and its size checked) before anything on the target happens.
        let script = powershell::deploy_script(spec, &cfg.deploy_script)?;
        powershell::command_args(&script, "deploy_script").map_err(PluginError::InvalidConfig)?;
        let target = spec.target.name.as_str();
        let lock = self.target_lock(target);
        let _guard = lock.lock().await;
        info!(
            target,
            job = %spec.job_id,
            release = %spec.release_id,
            components = spec.components.len(),
            "deploying over winrm"
        );
        let deadline = Instant::now() + cfg.timeout;
        let mut session = Session::open(&cfg, deadline).await?;
        progress.progress(&format!(
            "connected to {} as {} (shell {})",
            session.dest, cfg.username, session.shell_id
        ));
        let result = self
            .deploy_in(&mut session, &cfg, spec, &script, deadline, progress)
            .await;
        session.close().await;
        match &result {
            Ok(out) => {
                info!(target, job = %spec.job_id, duration_ms = out.duration_ms, "deploy finished")
            }
            Err(e) => warn!(target, job = %spec.job_id, error = %e, "deploy failed"),
        }
        result
    }

    async fn inventory(&self, target: &TargetRef) -> Result<Vec<InventoryItem>, PluginError> {
        let cfg = self.parse(target)?;
        let deadline = Instant::now() + cfg.timeout;
        let mut session = Session::open(&cfg, deadline).await?;
        let result = self
            .inventory_in(&mut session, &cfg, &target.name, deadline)
            .await;
        session.close().await;
        result
    }

    async fn write_sticker(
        &self,
        target: &TargetRef,
        sticker: &VersionSticker,
    ) -> Result<(), PluginError> {
        let cfg = self.parse(target)?;
        let json = serde_json::to_vec(sticker)
            .map_err(|e| PluginError::Sticker(format!("cannot encode the sticker: {e}")))?;
        let script = powershell::write_file_script(&cfg.sticker_path, &json);
        powershell::command_args(&script, "the sticker").map_err(PluginError::Sticker)?;
        let deadline = Instant::now() + cfg.timeout;
        let seconds = cfg.timeout.as_secs();
        let mut session = Session::open(&cfg, deadline).await?;
        let dest = session.dest.clone();
        let result = session
            .run(&script, "sticker write", deadline, None)
            .await
            .map_err(|e| match e {
                RunError::TimedOut => PluginError::Timeout {
                    what: format!("writing the sticker on {dest}"),
                    seconds,
                },
                RunError::TooLong(m) => PluginError::Sticker(m),
                RunError::Wsman(e) => backend(&dest, "writing the sticker", &e),
            })
            .and_then(|out| {
                if out.exit_code == 0 {
                    Ok(())
                } else {
                    Err(PluginError::Sticker(format!(
                        "{dest}: writing {} failed with exit code {}:\n{}",
                        cfg.sticker_path,
                        out.exit_code,
                        out.tail_text()
                    )))
                }
            });
        session.close().await;
        if result.is_ok() {
            info!(target = %target.name, path = %cfg.sticker_path, release = %sticker.release_id, "sticker written");
        }
        result
    }

    async fn read_sticker(
        &self,
        target: &TargetRef,
    ) -> Result<Option<VersionSticker>, PluginError> {
        let cfg = self.parse(target)?;
        let deadline = Instant::now() + cfg.timeout;
        let mut session = Session::open(&cfg, deadline).await?;
        let result = session
            .read_sticker(&cfg.sticker_path, deadline, cfg.timeout.as_secs())
            .await;
        session.close().await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_chunks() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push("\u{feff}fir".as_bytes()), Vec::<String>::new());
        assert_eq!(s.push(b"st\r\nsecond\nthi"), vec!["first", "second"]);
        assert_eq!(s.finish(), Some("thi".to_string()));
        assert_eq!(s.finish(), None);
    }

    fn component(name: &str) -> ComponentSpec {
        ComponentSpec {
            name: name.to_string(),
            image: "demo/app:1".to_string(),
            digest: format!("sha256:{}", "b".repeat(64)),
        }
    }

    #[test]
    fn components_are_validated() {
        assert!(validate_components(&[component("web"), component("api")]).is_ok());
        assert!(validate_components(&[component("a-b"), component("a_b")]).is_err());
        let mut bad = component("web");
        bad.digest = "latest".to_string();
        assert!(validate_components(&[bad]).is_err());
        assert!(validate_components(&[component("")]).is_err());
    }

    #[test]
    fn passwords_come_from_files_without_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\r\n").unwrap();
        assert_eq!(
            load_password(&PasswordSource::File(p.clone())).unwrap(),
            "s3cret"
        );
        std::fs::write(&p, "\n").unwrap();
        let e = load_password(&PasswordSource::File(p)).unwrap_err();
        assert!(e.to_string().contains("password_file"), "{e}");
        // Any variable the test process surely has stands in for a password variable.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            load_password(&PasswordSource::Env("PATH".into())).unwrap(),
            path
        );
        let e =
            load_password(&PasswordSource::Env("STELLA_WINRM_SURELY_UNSET".into())).unwrap_err();
        assert!(e.to_string().contains("STELLA_WINRM_SURELY_UNSET"), "{e}");
    }
}
