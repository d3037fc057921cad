//! `stella-agent`: enroll once, then run. The agent only dials out.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stella_agent::config::DataDir;
use stella_agent::enroll::{self, EnrollOptions};
use stella_agent::executors;
use stella_agent::runtime::{self, RunOptions};

#[derive(Parser)]
#[command(
    name = "stella-agent",
    version,
    about = "Stella agent: runs signed jobs from a Stella control plane on this host",
    long_about = "Stella agent.\n\nEnroll once with a join token (`stella token create` on the plane prints one with the \
CA fingerprint), then `run`. The agent generates its private key here, dials out to the plane \
(no inbound port is needed) and verifies every job's signature, audience, expiry and sequence \
before it acts."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this host: generate a key, send a CSR with the join token, store the identity.
    Enroll {
        /// The control plane's API URL, e.g. https://plane.example:7443.
        #[arg(long, env = "STELLA_SERVER")]
        server: String,
        /// One-time join token.
        #[arg(long, env = "STELLA_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// sha256 fingerprint of the plane's CA, printed with the token; the only CA trusted.
        #[arg(long)]
        ca_fingerprint: String,
        /// Where the agent keeps its identity and state.
        #[arg(
            long,
            env = "STELLA_AGENT_DATA_DIR",
            default_value = "/var/lib/stella-agent"
        )]
        data_dir: PathBuf,
        /// Agent name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Label to request (repeatable, k=v); labels from the join token take precedence.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Executors not to offer even if available (repeatable, e.g. docker); also
        /// `health-check` (HTTP probes run by the agent) and `script`.
        #[arg(long = "disable")]
        disabled: Vec<String>,
        /// Offer to run workflow script steps on this host (signed jobs only; off by default).
        #[arg(long, env = "STELLA_AGENT_ALLOW_SCRIPTS")]
        allow_scripts: bool,
    },
    /// Run the agent: hold a session with the plane and execute jobs until stopped.
    Run {
        #[arg(
            long,
            env = "STELLA_AGENT_DATA_DIR",
            default_value = "/var/lib/stella-agent"
        )]
        data_dir: PathBuf,
        /// Executors not to start even if available (repeatable); also `health-check` and
        /// `script`.
        #[arg(long = "disable")]
        disabled: Vec<String>,
        /// Run workflow script steps on this host: signed jobs whose command runs here as the
        /// agent's user, without a shell unless the command names one. Off by default.
        #[arg(long, env = "STELLA_AGENT_ALLOW_SCRIPTS")]
        allow_scripts: bool,
        /// How often inventory is reported when nothing changed (e.g. 30s, 5m); changes
        /// the executor can watch and finished jobs are reported at once anyway.
        #[arg(long, env = "STELLA_AGENT_INVENTORY_INTERVAL", default_value = "60s", value_parser = parse_interval)]
        inventory_interval: std::time::Duration,
        /// Plane agent endpoint to dial before the stored ones (repeatable, in order;
        /// https://host:port or quic://host:port). The agent fails over between all of them.
        #[arg(
            long = "endpoint",
            env = "STELLA_AGENT_ENDPOINTS",
            value_delimiter = ','
        )]
        endpoints: Vec<String>,
    },
    /// Show the plane endpoints this agent dials, or replace the stored list (`--set URL...`,
    /// in order). A running agent picks the new list up at its next start.
    Endpoints {
        #[arg(
            long,
            env = "STELLA_AGENT_DATA_DIR",
            default_value = "/var/lib/stella-agent"
        )]
        data_dir: PathBuf,
        /// The new list, first preferred (https://host:port or quic://host:port).
        #[arg(long, num_args = 1..)]
        set: Vec<String>,
    },
    /// Relay for agents that cannot reach the plane: they connect here (mTLS, the plane's CA)
    /// and the relay carries their sessions upstream, storing and forwarding both ways while
    /// the uplink is down. Enroll the relay with a join token labelled role=relay.
    #[command(args_conflicts_with_subcommands = true)]
    Relay {
        #[command(subcommand)]
        command: Option<RelayCommand>,
        #[command(flatten)]
        run: RelayRunArgs,
    },
}

#[derive(clap::Args)]
struct RelayDataDir {
    #[arg(
        long,
        env = "STELLA_AGENT_DATA_DIR",
        default_value = "/var/lib/stella-agent"
    )]
    data_dir: PathBuf,
}

#[derive(clap::Args)]
struct RelayRunArgs {
    #[command(flatten)]
    dir: RelayDataDir,
    /// Address downstream agents connect to (host:port).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The plane's agent endpoint or an upstream relay (https://host:port or quic://host:port);
    /// default: the endpoint from enrollment.
    #[arg(long)]
    upstream: Option<String>,
    /// DNS name or IP address the relay's server certificate carries (repeatable); default:
    /// the listen address.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Also serve agent sessions over QUIC on this UDP address (host:port; the same port as
    /// --listen is fine). Enrollment stays on --listen.
    #[arg(long)]
    quic_listen: Option<std::net::SocketAddr>,
    /// URL agents enrolling through this relay are told to dial (default https://LISTEN;
    /// quic://HOST:PORT for the --quic-listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Disk budget for what the relay stores while the uplink is down (bytes; K, M, G
    /// suffixes). Beyond it inventory is dropped and new results and jobs are refused (the
    /// agents keep their results spooled), never dropped.
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    max_backlog_bytes: u64,
}

#[derive(Subcommand)]
enum RelayCommand {
    /// Store the signed jobs of an air-gap file (`stella airgap export`) for the agents
    /// behind this relay; a running relay offers them within seconds.
    Import {
        file: PathBuf,
        #[command(flatten)]
        dir: RelayDataDir,
    },
    /// Write what the agents behind this relay reported (results with receipts, inventory),
    /// signed by the relay, for `stella airgap import`.
    ExportResults {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        dir: RelayDataDir,
    },
    /// Show the relay's backlog.
    Status {
        #[command(flatten)]
        dir: RelayDataDir,
    },
}

/// A byte count with an optional K, M or G (binary) suffix.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, factor) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a byte count such as 512M"))?;
    n.checked_mul(factor)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{s:?}: must be more than 0 and fit in 64 bits"))
}

async fn relay_command(
    command: Option<RelayCommand>,
    run: RelayRunArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use stella_agent::relay::{self, RelayOptions, airgap, store::Store};
    const STORE_FOR_FILES: u64 = u64::MAX;
    match command {
        None => {
            let listen = run
                .listen
                .ok_or_else(|| anyhow::anyhow!("--listen ADDR is required to run a relay"))?;
            relay::run(
                DataDir::new(run.dir.data_dir),
                RelayOptions {
                    listen,
                    upstream: run.upstream,
                    names: run.server_names,
                    quic_listen: run.quic_listen,
                    advertise: run.advertise,
                    max_backlog_bytes: run.max_backlog_bytes,
                },
                shutdown,
            )
            .await
        }
        Some(RelayCommand::Import { file, dir }) => {
            let dir = DataDir::new(dir.data_dir);
            // The operator's import is not refused for space: the budget governs what arrives
            // unattended.
            let store = Store::open(dir.root.join("relay"), STORE_FOR_FILES)?;
            let summary = airgap::import_jobs(&dir, &store, &file)?;
            println!(
                "imported {} new jobs for {} agents ({} already here)",
                summary.new_jobs, summary.agents, summary.known_jobs
            );
            Ok(())
        }
        Some(RelayCommand::ExportResults { out, dir }) => {
            let dir = DataDir::new(dir.data_dir);
            let store = Store::open(dir.root.join("relay"), STORE_FOR_FILES)?;
            let summary = airgap::export_results(&dir, &store, &out)?;
            println!(
                "exported {} messages ({} results) of {} agents to {}",
                summary.messages,
                summary.results,
                summary.agents,
                out.display()
            );
            Ok(())
        }
        Some(RelayCommand::Status { dir }) => {
            let dir = DataDir::new(dir.data_dir);
            let store = Store::open(dir.root.join("relay"), STORE_FOR_FILES)?;
            let backlog = store.backlog();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "backlog_messages": backlog.messages(),
                    "to_plane_messages": backlog.to_plane_messages,
                    "results": backlog.results,
                    "to_agents_messages": backlog.to_agents_messages,
                    "backlog_bytes": backlog.bytes,
                    "agents": store.leaves().len(),
                }))?
            );
            Ok(())
        }
    }
}

/// `N`, `Ns`, `Nm` or `Nh`, from one second to one day.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let (digits, unit) = match s.trim().char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.trim().split_at(i),
        None => (s.trim(), "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("interval {s:?}: expected a number with s, m or h, e.g. 30s"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        other => {
            return Err(format!(
                "interval {s:?}: unknown unit {other:?}; use s, m or h"
            ));
        }
    };
    if !(1..=86_400).contains(&secs) {
        return Err(format!("interval {s:?}: must be between 1s and 24h"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} must be KEY=VALUE"))
}

async fn shutdown_signal() {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll {
            server,
            token,
            ca_fingerprint,
            data_dir,
            name,
            labels,
            disabled,
            allow_scripts,
        } => {
            let dir = DataDir::new(data_dir);
            let capabilities = [
                executors::capabilities(&executors::detect(&dir, &disabled).await),
                executors::step_capabilities(&disabled, allow_scripts),
            ]
            .concat();
            let config = enroll::enroll(
                &dir,
                EnrollOptions {
                    server,
                    token,
                    ca_fingerprint,
                    name: name.unwrap_or_else(enroll::hostname),
                    labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                    capabilities: capabilities.clone(),
                },
            )
            .await?;
            println!("enrolled as agent {} ({})", config.agent_id, config.name);
            println!(
                "capabilities: {}",
                if capabilities.is_empty() {
                    "none".to_string()
                } else {
                    capabilities.join(", ")
                }
            );
            println!("agent endpoints: {}", config.endpoints().join(", "));
            println!(
                "start it with: stella-agent run --data-dir {}",
                dir.root.display()
            );
            Ok(())
        }
        Command::Relay { command, run } => relay_command(command, run, shutdown_signal()).await,
        Command::Endpoints { data_dir, set } => {
            let dir = DataDir::new(data_dir);
            let config = if set.is_empty() {
                dir.load_config()?
            } else {
                let config = dir.set_endpoints(&set)?;
                println!("stored; a running agent uses the new list from its next start");
                config
            };
            println!("configured ({}):", dir.agent_file().display());
            for url in config.endpoints() {
                println!("  {url}");
            }
            let advertised = dir.load_plane_endpoints()?;
            if !advertised.is_empty() {
                println!(
                    "advertised by the plane ({}):",
                    dir.plane_endpoints_file().display()
                );
                for url in &advertised {
                    println!("  {url}");
                }
            }
            println!(
                "dial order: {}",
                stella_agent::config::dial_order(&[&config.endpoints(), &advertised]).join(", ")
            );
            Ok(())
        }
        Command::Run {
            data_dir,
            disabled,
            allow_scripts,
            inventory_interval,
            endpoints,
        } => {
            // Refused before anything starts, with the URL and what is wrong with it.
            if !endpoints.is_empty() {
                stella_agent::config::validate_endpoints(&endpoints)
                    .map_err(|e| anyhow::anyhow!("--endpoint: {e}"))?;
            }
            runtime::run(
                DataDir::new(data_dir),
                RunOptions {
                    disabled_executors: disabled,
                    allow_scripts,
                    inventory_interval: Some(inventory_interval),
                    endpoints,
                },
                shutdown_signal(),
            )
            .await
        }
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STELLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_interval;
    use std::time::Duration;

    #[test]
    fn inventory_intervals_parse_with_units_and_bounds() {
        assert_eq!(parse_interval("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_interval("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_interval("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_interval("15"), Ok(Duration::from_secs(15)));
        assert!(
            parse_interval("0s")
                .unwrap_err()
                .contains("between 1s and 24h")
        );
        assert!(
            parse_interval("25h")
                .unwrap_err()
                .contains("between 1s and 24h")
        );
        assert!(parse_interval("5d").unwrap_err().contains("unknown unit"));
        assert!(
            parse_interval("soon")
                .unwrap_err()
                .contains("expected a number")
        );
    }
}
