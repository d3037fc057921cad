//! The compose command-line tool: which one this host has, and running it with its output
//! streamed line by line.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use stella_plugin_sdk::output::{OutputTail, Stream};
use stella_plugin_sdk::{PluginError, ProgressSink};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tracing::{debug, info};

const DETECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of compose output kept for error messages.
const TAIL_LINES: usize = 40;

/// Settings compose reads from the environment that would override what Stella passes on the
/// command line or make it keep orphans; the agent's environment must not steer deployments.
const SCRUBBED_ENV: &[&str] = &[
    "COMPOSE_FILE",
    "COMPOSE_PROJECT_NAME",
    "COMPOSE_PROFILES",
    "COMPOSE_IGNORE_ORPHANS",
    "COMPOSE_REMOVE_ORPHANS",
    "COMPOSE_PATH_SEPARATOR",
    "COMPOSE_ENV_FILES",
];

/// The compose tool found on this host: the `docker compose` CLI plugin (v2) or the standalone
/// `docker-compose` (v1 or v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeTool {
    program: String,
    prefix: Vec<String>,
    version: String,
}

/// How one compose run ended.
pub(crate) struct RunOutput {
    pub status: ExitStatus,
    /// The last lines of its combined output.
    pub tail: OutputTail,
}

impl RunOutput {
    pub(crate) fn tail_text(&self) -> String {
        self.tail.text()
    }

    /// The last line, usually compose's error message.
    pub(crate) fn last_line(&self) -> &str {
        self.tail.last()
    }
}

impl ComposeTool {
    /// Tries `docker compose version`, then `docker-compose version`.
    pub async fn detect() -> Result<Self, PluginError> {
        detect_from(&[("docker", &["compose"]), ("docker-compose", &[])]).await
    }

    /// How an operator would type it: `docker compose` or `docker-compose`.
    pub fn command_line(&self) -> String {
        let mut parts = vec![self.program.as_str()];
        parts.extend(self.prefix.iter().map(String::as_str));
        parts.join(" ")
    }

    /// The first line of its `version` output, e.g. `docker-compose version 1.29.2, build unknown`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Runs `<tool> --project-directory DIR -p PROJECT -f FILE ARGS...` in `dir`. Output lines go
    /// to `progress` when given; the last ones are returned either way. A run exceeding
    /// `timeout` is killed.
    pub(crate) async fn run(
        &self,
        dir: &Path,
        project: &str,
        file: &Path,
        args: &[&str],
        progress: Option<&dyn ProgressSink>,
        timeout: Duration,
    ) -> Result<RunOutput, PluginError> {
        let shown = format!("{} {}", self.command_line(), args.join(" "));
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.prefix)
            .arg("--project-directory")
            .arg(dir)
            .arg("-p")
            .arg(project)
            .arg("-f")
            .arg(file)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A deploy abandoned by its caller must not leave compose running on its own.
            .kill_on_drop(true);
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        debug!(command = %shown, project, "running compose");
        let mut child = cmd
            .spawn()
            .map_err(|e| PluginError::Backend(format!("cannot start {shown}: {e}")))?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(PluginError::Backend(format!(
                "{shown}: output pipes unavailable"
            )));
        };
        let mut tail = OutputTail::new(TAIL_LINES);
        let drive = async {
            pump(stdout, stderr, |line| {
                if let Some(p) = progress {
                    p.progress(&format!("compose: {line}"));
                }
                // Compose writes its progress and its errors alike to stderr: one stream here.
                tail.push(Stream::Stdout, line);
            })
            .await;
            child.wait().await
        };
        let outcome = tokio::time::timeout(timeout, drive).await;
        let status = match outcome {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return Err(PluginError::Backend(format!("{shown}: {e}"))),
            Err(_) => {
                // Killed on drop as well; an explicit kill makes the intent plain.
                let _ = child.start_kill();
                return Err(PluginError::Timeout {
                    what: shown,
                    seconds: timeout.as_secs(),
                });
            }
        };
        info!(command = %shown, project, %status, "compose finished");
        Ok(RunOutput { status, tail })
    }
}

async fn detect_from(candidates: &[(&str, &[&str])]) -> Result<ComposeTool, PluginError> {
    let mut tried = Vec::new();
    for (program, prefix) in candidates {
        let shown = std::iter::once(*program)
            .chain(prefix.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = Command::new(program);
        cmd.args(*prefix)
            .arg("version")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(DETECT_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) => {
                let stdout = String::from_utf8_lossy(&out.stdout);
                let first = stdout.lines().map(str::trim).find(|l| !l.is_empty());
                match first {
                    // Older docker CLIs print their help with status 0 for unknown commands.
                    Some(line)
                        if out.status.success() && line.to_lowercase().contains("compose") =>
                    {
                        info!(tool = %shown, version = line, "found compose tool");
                        return Ok(ComposeTool {
                            program: program.to_string(),
                            prefix: prefix.iter().map(|s| s.to_string()).collect(),
                            version: line.to_string(),
                        });
                    }
                    _ => {
                        let stderr = String::from_utf8_lossy(&out.stderr);
                        let why = stderr
                            .lines()
                            .map(str::trim)
                            .find(|l| !l.is_empty())
                            .unwrap_or("no version output");
                        tried.push(format!("`{shown} version` failed ({}): {why}", out.status));
                    }
                }
            }
            Ok(Err(e)) => tried.push(format!("`{shown}`: {e}")),
            Err(_) => tried.push(format!(
                "`{shown} version` did not answer within {}s",
                DETECT_TIMEOUT.as_secs()
            )),
        }
    }
    Err(PluginError::Backend(format!(
        "no compose tool on this host: install the docker compose plugin or docker-compose ({})",
        tried.join("; ")
    )))
}

/// Reads both pipes to their end, handing each non-empty line to `sink`. Compose rewrites its
/// progress lines with `\r` and colours them when it thinks it has a terminal; both are reduced
/// to plain lines.
async fn pump(
    stdout: impl AsyncRead + Unpin,
    stderr: impl AsyncRead + Unpin,
    mut sink: impl FnMut(String),
) {
    let mut out = BufReader::new(stdout);
    let mut err = BufReader::new(stderr);
    let (mut out_buf, mut err_buf) = (Vec::new(), Vec::new());
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        // `read_until` keeps partial reads in the buffer, so losing a select race loses nothing.
        tokio::select! {
            r = out.read_until(b'\n', &mut out_buf), if out_open => {
                if matches!(r, Ok(0) | Err(_)) {
                    out_open = false;
                }
                emit(&mut out_buf, &mut sink);
            }
            r = err.read_until(b'\n', &mut err_buf), if err_open => {
                if matches!(r, Ok(0) | Err(_)) {
                    err_open = false;
                }
                emit(&mut err_buf, &mut sink);
            }
        }
    }
}

fn emit(buf: &mut Vec<u8>, sink: &mut impl FnMut(String)) {
    let text = String::from_utf8_lossy(buf);
    for piece in text.split(['\r', '\n']) {
        let line = strip_ansi(piece);
        let line = line.trim();
        if !line.is_empty() {
            sink(line.to_string());
        }
    }
    buf.clear();
}

/// Removes `ESC [ ... final-byte` sequences and other control characters.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for f in chars.by_ref() {
                    if ('@'..='~').contains(&f) {
                        break;
                    }
                }
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_and_carriage_returns_are_reduced_to_lines() {
        let mut lines = Vec::new();
        let mut buf =
            b"Creating x_web_1 ... \r\x1b[1A\x1b[2K\rCreating x_web_1 ... \x1b[32mdone\x1b[0m\r\n"
                .to_vec();
        emit(&mut buf, &mut |l| lines.push(l));
        assert_eq!(
            lines,
            vec!["Creating x_web_1 ...", "Creating x_web_1 ... done"]
        );
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn pump_reads_both_pipes() {
        let mut lines = Vec::new();
        pump(&b"a\nb"[..], &b"c\n"[..], |l| lines.push(l)).await;
        lines.sort();
        assert_eq!(lines, vec!["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_missing_tool_is_a_clear_error() {
        let err = detect_from(&[
            ("stella-no-such-docker", &["compose"]),
            ("stella-no-such-docker-compose", &[]),
        ])
        .await
        .unwrap_err();
        match err {
            PluginError::Backend(m) => {
                assert!(m.contains("no compose tool"), "{m}");
                assert!(m.contains("stella-no-such-docker compose"), "{m}");
                assert!(m.contains("stella-no-such-docker-compose"), "{m}");
            }
            other => panic!("expected Backend, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_tool_that_is_not_compose_is_skipped() {
        // `true` succeeds but says nothing about compose.
        assert!(detect_from(&[("true", &[])]).await.is_err());
    }
}
