//! `stella dev`: a control plane and one local agent in one command.
//!
//! The agent runs as its own `stella-agent` process (the plane never links executor plugins),
//! enrolled once with a join token; a second `stella dev` on the same data directory reuses the
//! CA, the agent's identity and all state.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use stella_control_plane::server;
use stella_control_plane::tokens::{self, CreateJoinToken};
use tokio::process::{Child, Command};

use crate::cli::DevArgs;

const AGENT_DIR: &str = "agent";
const AGENT_NAME: &str = "local";

pub async fn wait_for_shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn find_agent_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    if let Ok(me) = std::env::current_exe()
        && let Some(dir) = me.parent()
    {
        let sibling = dir.join("stella-agent");
        if sibling.exists() {
            return Ok(sibling);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("stella-agent");
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "stella-agent not found next to stella or on PATH; build it (`cargo build --bins`) or pass --agent-bin"
    )
}

pub async fn run(data_dir: PathBuf, args: DevArgs) -> anyhow::Result<()> {
    let plane = server::start(args.listen.options(data_dir.clone())).await?;
    let agent_dir = data_dir.join(AGENT_DIR);
    let mut agent: Option<Child> = None;
    if !args.no_agent {
        match start_local_agent(&plane, &agent_dir, args.agent_bin.clone()).await {
            Ok(child) => agent = Some(child),
            Err(e) => {
                plane.shutdown().await;
                return Err(e.context("starting the local agent"));
            }
        }
    }

    let data = data_dir.display();
    let flag = if data_dir == Path::new(".stella") {
        String::new()
    } else {
        format!(" --data-dir {data}")
    };
    println!();
    println!("Stella dev is running.");
    println!("  API:            {}", plane.api_url);
    println!(
        "  admin token:    {} (the CLI reads it from there)",
        plane.admin_token_path.display()
    );
    println!("  CA fingerprint: {}", plane.ca_fingerprint);
    if agent.is_some() {
        println!(
            "  local agent:    {AGENT_NAME} (data in {})",
            agent_dir.display()
        );
    }
    println!();
    println!(
        "Deploy a demo release (IMAGE@DIGEST: a local image, e.g. `docker image inspect -f '{{{{.Id}}}}' IMAGE`):"
    );
    println!(
        "  stella{flag} env create dev && stella{flag} target create web --env dev --kind docker --agent {AGENT_NAME}"
    );
    println!("  stella{flag} release create demo-1 --component web=IMAGE@DIGEST");
    println!("  stella{flag} deploy demo-1 --env dev");
    println!();
    println!("Press Ctrl-C to stop.");

    let outcome = match agent.as_mut() {
        Some(child) => {
            tokio::select! {
                r = wait_for_shutdown_signal() => r,
                status = child.wait() => {
                    match status {
                        Ok(s) => eprintln!("the local agent exited ({s}); the control plane keeps running"),
                        Err(e) => eprintln!("lost the local agent: {e}"),
                    }
                    agent = None;
                    wait_for_shutdown_signal().await
                }
            }
        }
        None => wait_for_shutdown_signal().await,
    };
    println!("stopping");
    if let Some(child) = agent {
        stop_child(child).await;
    }
    plane.shutdown().await;
    outcome
}

async fn start_local_agent(
    plane: &server::RunningPlane,
    agent_dir: &Path,
    agent_bin: Option<PathBuf>,
) -> anyhow::Result<Child> {
    let bin = find_agent_binary(agent_bin)?;
    if !agent_dir.join("agent.json").exists() {
        let token = tokens::create_join_token(
            &plane.state,
            CreateJoinToken {
                ttl_secs: 600,
                labels: [("stella.dev".to_string(), "true".to_string())].into(),
                max_uses: 1,
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("creating a join token: {e}"))?;
        println!("enrolling the local agent");
        let status = Command::new(&bin)
            .arg("enroll")
            .arg("--server")
            .arg(&plane.api_url)
            .arg("--token")
            .arg(&token.token)
            .arg("--ca-fingerprint")
            .arg(&token.ca_fingerprint)
            .arg("--data-dir")
            .arg(agent_dir)
            .arg("--name")
            .arg(AGENT_NAME)
            .stdin(Stdio::null())
            .status()
            .await
            .with_context(|| format!("running {}", bin.display()))?;
        if !status.success() {
            bail!("stella-agent enroll failed ({status})");
        }
    }
    let child = Command::new(&bin)
        .arg("run")
        .arg("--data-dir")
        .arg(agent_dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(child)
}

/// SIGTERM first so the agent finishes its current step and flushes its spool; SIGKILL after 10s.
async fn stop_child(mut child: Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
