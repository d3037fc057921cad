//! `stella-bench`: the fleet benchmark. A real control plane (`stella serve`, its own process)
//! and a simulated fleet in this process: N real agents (own key, certificate and mTLS session,
//! DSSE verification, journal, spool, signed receipts) whose only simulated part is a no-op
//! executor of kind `docker`.

mod api;
mod db;
mod fleet;
mod noop;
mod plane;
mod report;
mod scenarios;
mod sys;
mod track;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Parser)]
#[command(
    name = "stella-bench",
    version,
    about = "Fleet benchmark of the Stella control plane: a real plane, N real agents, a no-op executor",
    long_about = "Fleet benchmark of the Stella control plane.\n\n\
Each scenario starts the real plane (`stella --data-dir D serve` on loopback ports, its own \
process, SQLite store) and a simulated fleet in this process: N agents that each enroll with \
their own one-time join token, key and certificate, hold their own gRPC/mTLS session, verify \
every signed job and answer with a signed result from a no-op `docker` executor. Each agent \
serves one docker target of the environment `bench`; a deployment of the release `bench-1` \
is one signed job per agent.\n\n\
Job timings come from the plane's database (created_at when the job is written, finished_at \
when its result is stored). Progress goes to stderr; the result table (or, with --json, one \
JSON object) to stdout. The exit status is non-zero when a job is lost or runs twice.\n\n\
Build first: cargo build --release --bins -p stella-control-plane -p stella-bench"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N idle sessions: sessions established, plane RSS before/after and per session,
    /// plane CPU while idle (heartbeats only).
    Hold {
        #[command(flatten)]
        common: Common,
        /// How long to watch the idle fleet (CPU is averaged over this window).
        #[arg(long, default_value_t = 20)]
        idle_seconds: u64,
    },
    /// Fan-out: one signed no-op job to every agent at once (one deployment); per-agent latency
    /// from job creation to result stored (p50/p99/max) and time until all results are stored.
    Fanout {
        #[command(flatten)]
        common: Common,
        /// Deployments, one after the other (latencies are pooled; all_results_ms is the median).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Sustained throughput: deployments to all agents back to back (up to --window running at
    /// once) for --seconds; signed jobs completed end to end per second.
    Throughput {
        #[command(flatten)]
        common: Common,
        /// How long to keep creating deployments.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Deployments running at once (each is one job per agent; agents run jobs one at a time).
        #[arg(long, default_value_t = 4)]
        window: usize,
    },
    /// Pickup: latency from job creation to the agent starting it (the no-op executor stamps
    /// its start) on an idle fleet, and to the plane recording the agent's acceptance.
    Pickup {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Reconnect storm: SIGKILL the plane with a fan-out in flight, restart it on the same ports
    /// and data directory, time until every agent is back (GET /api/v1/agents), peak concurrent
    /// handshakes, and check every job ends with exactly one outcome (lost = duplicated = 0).
    Storm {
        #[command(flatten)]
        common: Common,
        /// Kill the plane once this fraction of the fan-out's results is stored (at least one).
        #[arg(long, default_value_t = 0.05)]
        kill_at: f64,
    },
}

#[derive(Args, Clone)]
pub struct Common {
    /// Number of simulated agents.
    #[arg(long, short = 'n', default_value_t = 100)]
    agents: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// The `stella` binary to run as the plane (default: next to this executable).
    #[arg(long, env = "STELLA_BIN")]
    stella_bin: Option<PathBuf>,
    /// Directory for the plane's data directory and log (default: a new one under $TMPDIR).
    /// Must not exist yet or be empty.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Where the agents' data directories go (default: a new one under /dev/shm when it exists,
    /// since every simulated agent stands for a host with its own disk; else under --work-dir).
    #[arg(long)]
    fleet_dir: Option<PathBuf>,
    /// Keep the work and fleet directories (and the plane's log) after the run.
    #[arg(long)]
    keep: bool,
    /// Concurrent enrollments and target creations during setup.
    #[arg(long, default_value_t = 16)]
    setup_concurrency: usize,
    /// Agents started at once while connecting the fleet (each wave waits for its sessions).
    #[arg(long, default_value_t = 500)]
    connect_wave: usize,
    /// The plane's heartbeat interval (`stella serve --heartbeat-interval`).
    #[arg(long, default_value = "10s")]
    heartbeat_interval: String,
    /// The agents' transport: `grpc` (HTTP/2 over TLS) or `quic` (the plane then also listens
    /// on a UDP port and hands enrolling agents a `quic://` endpoint).
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "quic"])]
    transport: String,
    /// The plane's bound on concurrent agent session setups and TLS handshakes
    /// (`stella serve --max-session-setups`); unset: the plane's default (256).
    #[arg(long)]
    max_session_setups: Option<u32>,
    /// The plane's log filter (STELLA_LOG); `stella serve` defaults to info.
    #[arg(long, default_value = "info")]
    plane_log: String,
    /// Give up on connecting the fleet (or, in `storm`, on the reconnect) after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Stop waiting for a deployment's outcomes after this many seconds; its unfinished jobs are
    /// then reported as lost.
    #[arg(long, default_value_t = 180)]
    settle_timeout: u64,
}

fn init_tracing() {
    let fmt_filter = EnvFilter::try_from_env("STELLA_BENCH_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn,stella_bench=info,stella_agent=error,sqlx=error"));
    let session_filter = tracing_subscriber::filter::filter_fn(|m| {
        (m.target().starts_with("stella_agent::runtime") && *m.level() <= tracing::Level::INFO)
            || (m.is_span() && m.name() == track::AGENT_SPAN)
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(fmt_filter),
        )
        .with(track::SessionLayer.with_filter(session_filter))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stella-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.scenario {
            Scenario::Hold {
                common,
                idle_seconds,
            } => scenarios::hold(&common, idle_seconds).await,
            Scenario::Fanout { common, rounds } => scenarios::fanout(&common, rounds).await,
            Scenario::Throughput {
                common,
                seconds,
                window,
            } => scenarios::throughput(&common, seconds, window).await,
            Scenario::Pickup { common, rounds } => scenarios::pickup(&common, rounds).await,
            Scenario::Storm { common, kill_at } => scenarios::storm(&common, kill_at).await,
        }
    });
    // Agent tasks may still be winding down; do not wait for them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stella-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
