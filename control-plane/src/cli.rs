//! Command-line interface. Read commands take `--output json`; every command is a REST call.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use stella_control_plane::agents::AgentView;
use stella_control_plane::client::{ApiClient, ConnectionArgs};
use stella_control_plane::deployments::Deployment;
use stella_control_plane::environments::Environment;
use stella_control_plane::releases::{Release, ReleaseComponent};
use stella_control_plane::server::ServeOptions;
use stella_control_plane::targets::{Target, TargetDetail};
use stella_control_plane::tokens::{JoinTokenCreated, JoinTokenView};
use stella_control_plane::trust::TrustStatus;
use stella_control_plane::{duration, server, store};

use crate::dev;

mod airgap;
mod drift;
mod releasing;

#[derive(Parser)]
#[command(
    name = "stella",
    version,
    about = "Stella release orchestrator: control plane server and CLI",
    long_about = "Stella release orchestrator.\n\nRun `stella dev` to start a local control plane and agent in one command. \
Every other command talks to a control plane's REST API: the server URL, admin token and CA \
certificate come from --server/--token/--ca-file, the STELLA_* environment variables, or the \
data directory (./.stella by default) that `stella dev` and `stella serve` write them to."
)]
struct Cli {
    /// Data directory of the control plane (also where the CLI finds api.url, admin.token, pki/ca.pem).
    #[arg(
        long,
        global = true,
        env = "STELLA_DATA_DIR",
        default_value = ".stella"
    )]
    data_dir: PathBuf,
    /// Control plane API URL, e.g. https://127.0.0.1:7443.
    #[arg(long, global = true, env = "STELLA_SERVER")]
    server: Option<String>,
    /// Admin API token.
    #[arg(long, global = true, env = "STELLA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) that signed the plane's server certificate.
    #[arg(long, global = true, env = "STELLA_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Output format of read commands.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local control plane on SQLite and one local agent (docker when reachable).
    Dev(DevArgs),
    /// Run the control plane server.
    Serve(ServeArgs),
    /// Apply the database's pending schema migrations and exit (`stella serve` applies them at
    /// start unless `--no-migrate`).
    Migrate(DatabaseArgs),
    /// Join tokens for enrolling agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Agents of the fleet (`stella agents` lists them).
    #[command(alias = "agent")]
    Agents {
        #[command(subcommand)]
        command: Option<AgentsCommand>,
    },
    /// Control-plane replicas sharing the database, alive now (one on SQLite).
    Replicas,
    /// Job-signing keys: status and rotation with overlap (`start`, then `finish`).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The certificate authority: status and rotation with overlap (`start`, then `finish`).
    #[command(subcommand)]
    Ca(TrustCommand),
    /// Environments (dev, stage, prod).
    #[command(alias = "envs", alias = "environment")]
    Env {
        #[command(subcommand)]
        command: Option<EnvCommand>,
    },
    /// Targets: where releases run.
    #[command(alias = "targets")]
    Target {
        #[command(subcommand)]
        command: Option<TargetCommand>,
    },
    /// Releases: immutable sets of component@digest.
    #[command(alias = "releases")]
    Release {
        #[command(subcommand)]
        command: Option<ReleaseCommand>,
    },
    /// Deploy a release to every target of an environment and follow it until done.
    Deploy(DeployArgs),
    /// Deployments and their jobs.
    #[command(alias = "deployment")]
    Deployments {
        #[command(subcommand)]
        command: Option<DeploymentsCommand>,
    },
    /// Components: image repositories in an OCI registry, and their versions (tag → digest).
    #[command(alias = "components")]
    Component {
        #[command(subcommand)]
        command: Option<releasing::ComponentCommand>,
    },
    /// Promote a release into an environment: the gates decide, approvers approve, the
    /// environment's workflow deploys it; follows it until it ends.
    Promote(releasing::PromoteArgs),
    /// Approve a promotion (role approver).
    Approve(releasing::ApproveArgs),
    /// Reject a promotion with a reason (role approver).
    Reject(releasing::RejectArgs),
    /// Promotions: list, show, explain, cancel, watch.
    #[command(alias = "promotions")]
    Promotion {
        #[command(subcommand)]
        command: Option<releasing::PromotionCommand>,
    },
    /// Put the release deployed before the current one back on an environment.
    Rollback(releasing::RollbackArgs),
    /// Drift: what runs on targets vs what should (`stella drift [--env E]`), ignore rules and
    /// remediation policy.
    Drift(drift::DriftArgs),
    /// Air-gapped sites: export the signed jobs for a relay's agents to a file, import their
    /// results back.
    #[command(subcommand)]
    Airgap(airgap::AirgapCommand),
    /// Evidence: signed, hash-chained packets of every decision, deployment and rollback;
    /// export a bundle and verify it offline.
    #[command(subcommand)]
    Evidence(releasing::EvidenceCommand),
    /// The audit log: every mutation through the API (who, what, when, from where).
    Audit {
        /// Newest entries first, at most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Args, Clone)]
pub struct PlaneListenArgs {
    /// Address of the REST API (HTTPS).
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub api_listen: SocketAddr,
    /// Address of the agent endpoint (gRPC over mTLS).
    #[arg(long, default_value = "127.0.0.1:7444")]
    pub agent_listen: SocketAddr,
    /// UDP address of the agent endpoint over QUIC (agents use `quic://host:port`); off unless set.
    #[arg(long)]
    pub quic_listen: Option<SocketAddr>,
    /// Give enrolling agents the QUIC endpoint rather than the gRPC one (needs --quic-listen).
    #[arg(long)]
    pub advertise_quic: bool,
    /// Extra DNS names or IPs for the server certificate (repeatable).
    #[arg(long = "hostname")]
    pub hostnames: Vec<String>,
    /// Host name agents use to reach the agent endpoint (default: the listen address).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// Agent endpoint URL handed to agents, in order (repeatable; https://host:port for gRPC,
    /// quic://host:port for QUIC): every address or replica of this plane. Agents fail over
    /// between them. Default: this plane's own endpoint (QUIC with --advertise-quic).
    #[arg(long = "advertise-endpoint")]
    pub advertise_endpoints: Vec<String>,
    /// SPIFFE trust domain of agent identities.
    #[arg(long, default_value = stella_pki::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Interval at which agents send heartbeats; a session silent for three intervals is closed.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub heartbeat_interval: Duration,
    /// How long a signed job stays valid (its not-after).
    #[arg(long, default_value = "1h", value_parser = duration::parse)]
    pub job_ttl: Duration,
    /// Lifetime of agent certificates; agents renew in-band at about two thirds of it.
    #[arg(long, default_value = "24h", value_parser = duration::parse)]
    pub agent_cert_ttl: Duration,
    /// How long after expiry an agent that was offline may still renew with its old key.
    #[arg(long, default_value = "30d", value_parser = duration::parse)]
    pub renewal_grace: Duration,
    /// Agent session setups handled at once; a setup waits up to 5 s for a slot, then the agent
    /// is told to reconnect after a random 1-10 s delay (admission control for reconnect storms).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_session_setups: u32,
}

impl PlaneListenArgs {
    pub fn options(&self, data_dir: PathBuf) -> ServeOptions {
        ServeOptions {
            data_dir,
            key_encryption_key_file: None,
            previous_key_encryption_key_file: None,
            api_listen: self.api_listen,
            agent_listen: self.agent_listen,
            quic_listen: self.quic_listen,
            advertise_quic: self.advertise_quic,
            hostnames: self.hostnames.clone(),
            advertise_host: self.advertise_host.clone(),
            advertise_endpoints: self.advertise_endpoints.clone(),
            trust_domain: self.trust_domain.clone(),
            heartbeat_interval: self.heartbeat_interval,
            job_ttl: self.job_ttl,
            agent_cert_validity: self.agent_cert_ttl,
            renewal_grace: self.renewal_grace,
            max_session_setups: self.max_session_setups as usize,
            database: None,
            migrate: true,
            run_lease: server::DEFAULT_RUN_LEASE,
        }
    }
}

#[derive(Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub listen: PlaneListenArgs,
    /// Do not start the local agent.
    #[arg(long)]
    pub no_agent: bool,
    /// Path of the stella-agent binary (default: next to this binary, then PATH).
    #[arg(long, env = "STELLA_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    listen: PlaneListenArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Keep the CA, job-signing and evidence keys sealed in the database with the key in this
    /// file (64 hex digits, mode 0600; `stella keys generate-kek`), shared by every replica
    /// given the same file. Without it they are files in <data-dir>/pki/.
    #[arg(long, env = "STELLA_KEY_ENCRYPTION_KEY_FILE")]
    key_encryption_key_file: Option<PathBuf>,
    /// Changing the key-encryption key: the key being replaced. Secrets still sealed with it are
    /// opened and sealed again with --key-encryption-key-file at start (docs/operations.md,
    /// "Changing the key-encryption key"). Drop it once every replica runs with the new key.
    #[arg(
        long,
        env = "STELLA_PREVIOUS_KEY_ENCRYPTION_KEY_FILE",
        requires = "key_encryption_key_file"
    )]
    previous_key_encryption_key_file: Option<PathBuf>,
    /// Do not apply pending schema migrations at start (apply them with `stella migrate`).
    #[arg(long)]
    no_migrate: bool,
    /// With several replicas on one PostgreSQL database: how long a replica's hold on a
    /// workflow run lasts without renewal (it renews twice a second). A crashed replica's runs
    /// move to the others this long after it died.
    #[arg(long, default_value = "15s", value_parser = duration::parse)]
    run_lease: Duration,
}

#[derive(Args)]
struct DatabaseArgs {
    /// The database: `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (PostgreSQL, TLS with
    /// `?sslmode=require`) or `sqlite:///PATH`; default: `stella.db` in the data directory.
    #[arg(long, env = "STELLA_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a one-time join token; prints it with the CA fingerprint agents pin.
    Create {
        /// How long the token can be used (e.g. 15m, 1h, 7d).
        #[arg(long, default_value = "1h", value_parser = duration::parse)]
        ttl: Duration,
        /// Label the enrolled agent receives (repeatable, k=v).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// How many agents may enroll with this token.
        #[arg(long, default_value_t = 1)]
        max_uses: u32,
    },
    /// List join tokens (never their secrets).
    List,
    /// Revoke a join token: no agent can enroll with it any more.
    Revoke { id: String },
    /// API tokens of users, each with one role (admin, releaser, approver, viewer).
    #[command(subcommand)]
    Api(releasing::ApiTokenCommand),
}

/// `stella ca …`, and `stella keys …` but `generate-kek`.
#[derive(Subcommand)]
enum TrustCommand {
    /// The current trust bundle, the signing key and which agents have acknowledged it.
    Status,
    /// Rotate the job-signing key.
    #[command(subcommand)]
    Rotate(RotatePhase),
}

#[derive(Subcommand)]
enum KeysCommand {
    #[command(flatten)]
    Trust(TrustCommand),
    /// Write a new random key-encryption key (for `stella serve --key-encryption-key-file`) to
    /// a new file, mode 0600; give the same file to every replica and keep a copy apart from
    /// the database's backups.
    GenerateKek {
        /// The file to create (an existing file is never replaced).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum RotatePhase {
    /// Stage a new key and distribute it to agents next to the current one.
    Start,
    /// Sign with the new key and withdraw the old one (refused while an agent lacks the new key).
    Finish {
        /// Finish even if some agents have not acknowledged the new key (they will refuse jobs).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// List agents.
    List,
    /// Show one agent (by id or name).
    Show { agent: String },
    /// Revoke an agent: its session is cut, new handshakes are refused, its unfinished jobs
    /// are cancelled with the reason.
    Revoke {
        agent: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum EnvCommand {
    /// Create an environment.
    Create {
        name: String,
        /// The environment a release must have been deployed to first.
        #[arg(long)]
        after: Option<String>,
        /// Approvals required before a promotion deploys.
        #[arg(long, default_value_t = 0)]
        approvals: u32,
        /// Separation of duties: the requester and the release's creator may not approve.
        #[arg(long)]
        separation_of_duties: bool,
    },
    /// List environments in promotion order.
    List,
    /// Show an environment with its rules.
    Show { name: String },
    /// Change an environment: order, approvals, freeze windows, variables, secrets, policies,
    /// workflow.
    Set(releasing::EnvSetArgs),
}

#[derive(Subcommand)]
enum TargetCommand {
    /// Create a target served by an agent that has the kind's capability.
    Create {
        name: String,
        #[arg(long)]
        env: String,
        /// Executor kind: docker (compose, ssh, winrm, ecs, nomad come with their plugins).
        #[arg(long)]
        kind: String,
        /// Agent id or name.
        #[arg(long)]
        agent: String,
        /// Executor configuration as a JSON object.
        #[arg(long)]
        config: Option<String>,
    },
    /// List targets.
    List {
        #[arg(long)]
        env: Option<String>,
    },
    /// Show a target: desired release vs what its agent observes.
    Show { name: String },
}

#[derive(Subcommand)]
enum ReleaseCommand {
    /// Create an immutable release.
    Create {
        name: String,
        /// COMPONENT:TAG (a registered component's tag, resolved to its digest now),
        /// COMPONENT@sha256:DIGEST, or NAME=IMAGE@sha256:DIGEST (repeatable).
        #[arg(long = "component", required = true)]
        components: Vec<String>,
        /// Label K=V (repeatable); policies can read them.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List releases.
    List,
    /// Show a release.
    Show { name: String },
    /// How two releases differ, component by component.
    Diff { from: String, to: String },
}

#[derive(Args)]
struct DeployArgs {
    /// Release name or id.
    release: String,
    /// Environment name.
    #[arg(long)]
    env: String,
    /// Only this target (repeatable; default: every target of the environment).
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Only targets whose agent has label K=V (repeatable).
    #[arg(long = "selector", value_parser = parse_label)]
    selector: Vec<(String, String)>,
    /// Return once the deployment is created instead of following it.
    #[arg(long)]
    no_wait: bool,
    /// Give up following after this long (the deployment goes on).
    #[arg(long, default_value = "10m", value_parser = duration::parse)]
    timeout: Duration,
}

#[derive(Subcommand)]
enum DeploymentsCommand {
    /// List recent deployments.
    List,
    /// Show a deployment with its jobs and their events.
    Show { id: String },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} must be KEY=VALUE"))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("STELLA_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(match cli.command {
            Command::Dev(_) | Command::Serve(_) => "info",
            _ => "warn",
        })
    });
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let conn = ConnectionArgs {
        server: cli.server.clone(),
        token: cli.token.clone(),
        ca_file: cli.ca_file.clone(),
        data_dir: cli.data_dir.clone(),
    };
    let out = cli.output;
    match cli.command {
        Command::Dev(args) => dev::run(cli.data_dir, args).await,
        Command::Serve(args) => serve(cli.data_dir, args).await,
        Command::Migrate(args) => migrate(cli.data_dir, args).await,
        Command::Token(TokenCommand::List) => {
            let client = ApiClient::connect(&conn)?;
            let tokens: Vec<JoinTokenView> = client.list("/api/v1/tokens").await?;
            render(out, &tokens, |ts| {
                table(
                    &["ID", "STATUS", "USES", "EXPIRES", "LABELS"],
                    ts.iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                t.status.clone(),
                                format!("{}/{}", t.uses, t.max_uses),
                                t.expires_at.clone(),
                                t.labels
                                    .iter()
                                    .map(|(k, v)| format!("{k}={v}"))
                                    .collect::<Vec<_>>()
                                    .join(","),
                            ]
                        })
                        .collect(),
                )
            })
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            let client = ApiClient::connect(&conn)?;
            let token: JoinTokenView = client
                .post(
                    &format!("/api/v1/tokens/{}/revoke", path_seg(&id)),
                    &json!({}),
                )
                .await?;
            render(out, &token, |t| {
                println!("join token {} is {}", t.id, t.status)
            })
        }
        Command::Token(TokenCommand::Create {
            ttl,
            labels,
            max_uses,
        }) => {
            let client = ApiClient::connect(&conn)?;
            let labels: BTreeMap<String, String> = labels.into_iter().collect();
            let created: JoinTokenCreated = client
                .post(
                    "/api/v1/tokens",
                    &json!({"ttl_secs": ttl.as_secs(), "labels": labels, "max_uses": max_uses}),
                )
                .await?;
            if out == Output::Json {
                return print_json(&created);
            }
            println!("token:          {}", created.token);
            println!("ca fingerprint: {}", created.ca_fingerprint);
            println!("expires at:     {}", created.expires_at);
            println!(
                "\nOn the agent's host:\n  stella-agent enroll --server {} --token {} --ca-fingerprint {} --data-dir /var/lib/stella-agent",
                client.base(),
                created.token,
                created.ca_fingerprint
            );
            Ok(())
        }
        Command::Agents { command } => {
            let client = ApiClient::connect(&conn)?;
            match command.unwrap_or(AgentsCommand::List) {
                AgentsCommand::List => {
                    let agents: Vec<AgentView> = client.list("/api/v1/agents").await?;
                    render(out, &agents, |a| print_agents(a))
                }
                AgentsCommand::Show { agent } => {
                    let agent: AgentView = client
                        .get(&format!("/api/v1/agents/{}", path_seg(&agent)))
                        .await?;
                    render(out, &agent, |a| print_agents(std::slice::from_ref(a)))
                }
                AgentsCommand::Revoke { agent, reason } => {
                    let agent: AgentView = client
                        .post(
                            &format!("/api/v1/agents/{}/revoke", path_seg(&agent)),
                            &json!({"reason": reason}),
                        )
                        .await?;
                    render(out, &agent, |a| {
                        println!("agent {} ({}) is {}", a.name, a.id, a.status)
                    })
                }
            }
        }
        Command::Keys(KeysCommand::GenerateKek { out: path }) => {
            let kek = stella_pki::KeyEncryptionKey::generate_file(&path)?;
            render(out, &json!({"path": path, "key_id": kek.key_id()}), |_| {
                println!(
                    "wrote key-encryption key {} to {} (mode 0600)",
                    kek.key_id(),
                    path.display()
                )
            })
        }
        Command::Keys(KeysCommand::Trust(cmd)) => {
            rotation(&conn, out, "/api/v1/trust/job-key/rotate", cmd).await
        }
        Command::Ca(cmd) => rotation(&conn, out, "/api/v1/trust/ca/rotate", cmd).await,
        Command::Env { command } => {
            let client = ApiClient::connect(&conn)?;
            match command.unwrap_or(EnvCommand::List) {
                EnvCommand::Create {
                    name,
                    after,
                    approvals,
                    separation_of_duties,
                } => {
                    let env: Environment = client
                        .post(
                            "/api/v1/environments",
                            &json!({"name": name, "after": after, "required_approvals": approvals,
                                "separation_of_duties": separation_of_duties}),
                        )
                        .await?;
                    render(out, &env, |e| {
                        println!("created environment {} ({})", e.name, e.id)
                    })
                }
                EnvCommand::List => {
                    let envs: Vec<Environment> = client.list("/api/v1/environments").await?;
                    render(out, &envs, |envs| {
                        table(
                            &["NAME", "AFTER", "APPROVALS", "SOD", "FREEZES", "ID"],
                            envs.iter()
                                .map(|e| {
                                    vec![
                                        e.name.clone(),
                                        e.after.clone().unwrap_or_else(|| "-".into()),
                                        e.required_approvals.to_string(),
                                        if e.separation_of_duties { "yes" } else { "no" }.into(),
                                        e.settings.freeze_windows.len().to_string(),
                                        e.id.clone(),
                                    ]
                                })
                                .collect(),
                        )
                    })
                }
                EnvCommand::Show { name } => {
                    let env: Environment = client
                        .get(&format!("/api/v1/environments/{}", path_seg(&name)))
                        .await?;
                    render(out, &env, print_environment)
                }
                EnvCommand::Set(args) => releasing::env_set(&client, out, args).await,
            }
        }
        Command::Target { command } => {
            let client = ApiClient::connect(&conn)?;
            match command.unwrap_or(TargetCommand::List { env: None }) {
                TargetCommand::Create {
                    name,
                    env,
                    kind,
                    agent,
                    config,
                } => {
                    let config: Option<serde_json::Value> = match config {
                        Some(c) => Some(
                            serde_json::from_str(&c).context("--config must be a JSON object")?,
                        ),
                        None => None,
                    };
                    let target: Target = client
                        .post("/api/v1/targets", &json!({"name": name, "env": env, "kind": kind, "agent": agent, "config": config}))
                        .await?;
                    render(out, &target, |t| {
                        println!(
                            "created target {} ({}) in {} served by agent {}",
                            t.name, t.kind, t.environment, t.agent_id
                        )
                    })
                }
                TargetCommand::List { env } => {
                    let path = match env {
                        Some(e) => format!("/api/v1/targets?env={}", path_seg(&e)),
                        None => "/api/v1/targets".to_string(),
                    };
                    let targets: Vec<Target> = client.list(&path).await?;
                    render(out, &targets, |ts| {
                        table(
                            &["NAME", "ENV", "KIND", "AGENT"],
                            ts.iter()
                                .map(|t| {
                                    vec![
                                        t.name.clone(),
                                        t.environment.clone(),
                                        t.kind.clone(),
                                        t.agent_id.clone(),
                                    ]
                                })
                                .collect(),
                        )
                    })
                }
                TargetCommand::Show { name } => {
                    let detail: TargetDetail = client
                        .get(&format!("/api/v1/targets/{}", path_seg(&name)))
                        .await?;
                    render(out, &detail, print_target_detail)
                }
            }
        }
        Command::Release { command } => {
            let client = ApiClient::connect(&conn)?;
            match command.unwrap_or(ReleaseCommand::List) {
                ReleaseCommand::Create {
                    name,
                    components,
                    labels,
                } => {
                    // NAME=IMAGE@DIGEST is explicit; anything else names a registered component.
                    let (explicit, refs): (Vec<&String>, Vec<&String>) =
                        components.iter().partition(|c| c.contains('='));
                    let explicit = explicit
                        .into_iter()
                        .map(|c| ReleaseComponent::parse(c))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(anyhow::Error::msg)?;
                    let labels: BTreeMap<String, String> = labels.into_iter().collect();
                    let release: Release = client
                        .post(
                            "/api/v1/releases",
                            &json!({"name": name, "components": explicit, "refs": refs,
                                "labels": labels}),
                        )
                        .await?;
                    render(out, &release, |r| {
                        println!("created release {} ({})", r.name, r.id);
                        print_components(&r.components);
                    })
                }
                ReleaseCommand::List => {
                    let releases: Vec<Release> = client.list("/api/v1/releases").await?;
                    render(out, &releases, |rs| {
                        table(
                            &["NAME", "ID", "COMPONENTS", "CREATED"],
                            rs.iter()
                                .map(|r| {
                                    vec![
                                        r.name.clone(),
                                        r.id.clone(),
                                        r.components
                                            .iter()
                                            .map(|c| c.name.clone())
                                            .collect::<Vec<_>>()
                                            .join(","),
                                        r.created_at.clone(),
                                    ]
                                })
                                .collect(),
                        )
                    })
                }
                ReleaseCommand::Diff { from, to } => {
                    let diff: stella_control_plane::releases::ReleaseDiff = client
                        .get(&format!(
                            "/api/v1/releases/{}/diff/{}",
                            path_seg(&from),
                            path_seg(&to)
                        ))
                        .await?;
                    render(out, &diff, |d| {
                        println!("{} → {}", d.from, d.to);
                        for c in &d.changes {
                            let show = |rc: &Option<ReleaseComponent>| {
                                rc.as_ref()
                                    .map(|c| format!("{}@{}", c.image, c.digest))
                                    .unwrap_or_else(|| "-".into())
                            };
                            println!(
                                "  {:<9} {}: {} → {}",
                                c.change,
                                c.component,
                                show(&c.from),
                                show(&c.to)
                            );
                        }
                    })
                }
                ReleaseCommand::Show { name } => {
                    let release: Release = client
                        .get(&format!("/api/v1/releases/{}", path_seg(&name)))
                        .await?;
                    render(out, &release, |r| {
                        println!(
                            "{} ({}) created {} by {}",
                            r.name,
                            r.id,
                            r.created_at,
                            if r.created_by.is_empty() {
                                "-"
                            } else {
                                &r.created_by
                            }
                        );
                        for (k, v) in &r.labels {
                            println!("  label {k}={v}");
                        }
                        print_components(&r.components);
                    })
                }
            }
        }
        Command::Deploy(args) => {
            let client = ApiClient::connect(&conn)?;
            deploy(&client, out, args).await
        }
        Command::Deployments { command } => {
            let client = ApiClient::connect(&conn)?;
            match command.unwrap_or(DeploymentsCommand::List) {
                DeploymentsCommand::List => {
                    let deps: Vec<Deployment> = client.list("/api/v1/deployments").await?;
                    render(out, &deps, |ds| {
                        table(
                            &["ID", "RELEASE", "ENV", "STATUS", "CREATED"],
                            ds.iter()
                                .map(|d| {
                                    vec![
                                        d.id.clone(),
                                        d.release.clone(),
                                        d.environment.clone(),
                                        d.status.clone(),
                                        d.created_at.clone(),
                                    ]
                                })
                                .collect(),
                        )
                    })
                }
                DeploymentsCommand::Show { id } => {
                    let dep: Deployment = client
                        .get(&format!("/api/v1/deployments/{}", path_seg(&id)))
                        .await?;
                    render(out, &dep, print_deployment)
                }
            }
        }
        Command::Token(TokenCommand::Api(cmd)) => {
            let client = ApiClient::connect(&conn)?;
            releasing::api_token(&client, out, cmd).await
        }
        Command::Component { command } => {
            let client = ApiClient::connect(&conn)?;
            releasing::component(
                &client,
                out,
                command.unwrap_or(releasing::ComponentCommand::List),
            )
            .await
        }
        Command::Promote(args) => {
            let client = ApiClient::connect(&conn)?;
            releasing::promote(&client, out, args).await
        }
        Command::Approve(args) => {
            let client = ApiClient::connect(&conn)?;
            releasing::approve(&client, out, args).await
        }
        Command::Reject(args) => {
            let client = ApiClient::connect(&conn)?;
            releasing::reject(&client, out, args).await
        }
        Command::Promotion { command } => {
            let client = ApiClient::connect(&conn)?;
            releasing::promotion(
                &client,
                out,
                command.unwrap_or(releasing::PromotionCommand::List),
            )
            .await
        }
        Command::Rollback(args) => {
            let client = ApiClient::connect(&conn)?;
            releasing::rollback(&client, out, args).await
        }
        Command::Airgap(command) => {
            let client = ApiClient::connect(&conn)?;
            airgap::run(&client, command).await
        }
        Command::Drift(args) => {
            let client = ApiClient::connect(&conn)?;
            drift::run(&client, out, args).await
        }
        Command::Evidence(releasing::EvidenceCommand::Verify { file, trusted_keys }) => {
            releasing::verify_evidence(out, &file, trusted_keys.as_deref())
        }
        Command::Evidence(cmd) => {
            let client = ApiClient::connect(&conn)?;
            releasing::evidence(&client, out, cmd).await
        }
        Command::Audit { limit } => {
            let client = ApiClient::connect(&conn)?;
            releasing::audit(&client, out, limit).await
        }
        Command::Replicas => {
            let client = ApiClient::connect(&conn)?;
            let replicas: Vec<stella_control_plane::replicas::ReplicaView> =
                client.get("/api/v1/replicas").await?;
            render(out, &replicas, |replicas| {
                table(
                    &["ID", "HOST", "API", "RUNS LEASED", "STARTED", "SEEN"],
                    replicas
                        .iter()
                        .map(|r| {
                            vec![
                                if r.this {
                                    format!("{} (answered)", r.id)
                                } else {
                                    r.id.clone()
                                },
                                r.host.clone(),
                                r.api_url.clone(),
                                r.runs_leased.to_string(),
                                r.started_at.clone(),
                                r.seen_at.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
    }
}

async fn serve(data_dir: PathBuf, args: ServeArgs) -> anyhow::Result<()> {
    let mut options = args.listen.options(data_dir);
    options.key_encryption_key_file = args.key_encryption_key_file;
    options.previous_key_encryption_key_file = args.previous_key_encryption_key_file;
    options.database = args.database.database;
    options.migrate = !args.no_migrate;
    options.run_lease = args.run_lease;
    let plane = server::start(options).await?;
    println!("Stella control plane");
    println!("  API:            {}", plane.api_url);
    println!("  agent endpoint: {}", plane.agent_url);
    println!("  CA fingerprint: {}", plane.ca_fingerprint);
    println!("  admin token:    {}", plane.admin_token_path.display());
    dev::wait_for_shutdown_signal().await?;
    println!("shutting down");
    plane.shutdown().await;
    Ok(())
}

async fn migrate(data_dir: PathBuf, args: DatabaseArgs) -> anyhow::Result<()> {
    if args.database.is_none() {
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    }
    let url = server::database_url(&data_dir, args.database.as_deref())?;
    let db = store::open(&url, false).await?;
    let applied = store::migrate(&db, &url).await?;
    db.close().await;
    if applied.is_empty() {
        println!("{url}: the schema is current, nothing to apply");
    } else {
        println!("{url}: applied {} migration(s)", applied.len());
        for (version, description) in applied {
            println!("  {version:04} {description}");
        }
    }
    Ok(())
}

async fn deploy(client: &ApiClient, out: Output, args: DeployArgs) -> anyhow::Result<()> {
    let selector: BTreeMap<String, String> = args.selector.into_iter().collect();
    let created: Deployment = client
        .post(
            "/api/v1/deployments",
            &json!({"release": args.release, "env": args.env, "targets": args.targets,
                "selector": selector}),
        )
        .await?;
    if args.no_wait {
        return render(out, &created, |d| {
            println!("deployment {} created ({})", d.id, d.status)
        });
    }
    if out == Output::Text {
        println!(
            "deployment {}: {} to {} ({} target{})",
            created.id,
            created.release,
            created.environment,
            created.jobs.len(),
            if created.jobs.len() == 1 { "" } else { "s" }
        );
    }
    follow_deployment(client, out, &created, args.timeout).await
}

/// Follows a deployment until it ends, printing each target's progress; errs unless it
/// succeeded.
async fn follow_deployment(
    client: &ApiClient,
    out: Output,
    created: &Deployment,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut printed: BTreeMap<String, usize> = BTreeMap::new();
    let mut statuses: BTreeMap<String, String> = BTreeMap::new();
    let path = format!("/api/v1/deployments/{}", path_seg(&created.id));
    loop {
        let dep: Deployment = client.get(&path).await?;
        if out == Output::Text {
            for job in &dep.jobs {
                let seen = printed.entry(job.id.clone()).or_default();
                for event in job.events.iter().skip(*seen) {
                    println!("  [{}] {}", job.target, event.message);
                }
                *seen = job.events.len();
                if statuses.get(&job.id) != Some(&job.status) {
                    statuses.insert(job.id.clone(), job.status.clone());
                    if matches!(job.status.as_str(), "succeeded" | "failed" | "refused") {
                        let reason = if job.reason_code.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", job.reason_code)
                        };
                        println!(
                            "  [{}] job {}{}{}",
                            job.target,
                            job.status,
                            reason,
                            if job.message.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", job.message)
                            }
                        );
                    }
                }
            }
        }
        if dep.status != "running" {
            if out == Output::Json {
                print_json(&dep)?;
            } else {
                println!("deployment {} {}", dep.id, dep.status);
            }
            if dep.status == "succeeded" {
                return Ok(());
            }
            bail!("deployment {} {}: {}", dep.id, dep.status, dep.message);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "gave up following deployment {} after {:?}; it is still running (see `stella deployments show {}`)",
                dep.id,
                timeout,
                dep.id
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn path_seg(s: &str) -> String {
    stella_control_plane::api::url_escape(s)
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn render<T: Serialize + DeserializeOwned>(
    out: Output,
    value: &T,
    text: impl FnOnce(&T),
) -> anyhow::Result<()> {
    match out {
        Output::Json => print_json(value),
        Output::Text => {
            text(value);
            Ok(())
        }
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0)))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

fn print_agents(agents: &[AgentView]) {
    table(
        &[
            "ID",
            "NAME",
            "STATUS",
            "CAPABILITIES",
            "LABELS",
            "LAST HEARTBEAT",
            "CERT EXPIRES",
        ],
        agents
            .iter()
            .map(|a| {
                vec![
                    a.id.clone(),
                    a.name.clone(),
                    a.status.clone(),
                    a.capabilities.join(","),
                    a.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                    a.last_heartbeat.clone().unwrap_or_else(|| "-".to_string()),
                    a.cert_not_after.clone(),
                ]
            })
            .collect(),
    );
}

fn print_environment(e: &Environment) {
    println!("{} ({}) created {}", e.name, e.id, e.created_at);
    println!(
        "after: {}; approvals required: {}; separation of duties: {}",
        e.after.as_deref().unwrap_or("-"),
        e.required_approvals,
        if e.separation_of_duties { "on" } else { "off" }
    );
    for w in &e.settings.freeze_windows {
        println!(
            "freeze {} .. {}: {} (override: {})",
            w.start,
            w.end,
            w.reason,
            if w.override_users.is_empty() {
                "nobody".to_string()
            } else {
                w.override_users.join(",")
            }
        );
    }
    for w in &e.settings.schedule_windows {
        println!("schedule {} {}–{} UTC", w.days.join(","), w.start, w.end);
    }
    for (k, v) in &e.settings.variables {
        println!("var {k}={v}");
    }
    for (k, v) in &e.settings.secret_refs {
        println!("secret {k} → {v}");
    }
    for name in e.settings.policies.keys() {
        println!("policy {name}");
    }
    println!(
        "workflow: {}",
        if e.settings.workflow.is_some() {
            "custom"
        } else {
            "default"
        }
    );
}

fn print_components(components: &[ReleaseComponent]) {
    for c in components {
        println!("  {} = {}@{}", c.name, c.image, c.digest);
    }
}

fn print_target_detail(d: &TargetDetail) {
    println!(
        "target {} ({}) in {}, agent {}",
        d.target.name, d.target.kind, d.target.environment, d.target.agent_id
    );
    match &d.desired {
        Some(desired) => {
            println!(
                "desired: release {} (deployment {})",
                desired.release_name, desired.deployment_id
            );
            print_components(&desired.components);
        }
        None => println!("desired: nothing deployed yet"),
    }
    match &d.observed_at {
        Some(at) => println!("observed at {at}:"),
        None => println!("observed: no inventory reported yet"),
    }
    for o in &d.observed {
        let health = if o.health.is_empty() {
            String::new()
        } else {
            format!(" ({})", o.health)
        };
        println!(
            "  {} {} {}{} [{}]",
            o.component,
            o.digest,
            o.state,
            health,
            o.workload_id.chars().take(12).collect::<String>()
        );
    }
    if let Some(err) = &d.observation_error {
        println!("observation error: {err}");
    }
    if d.desired.is_some() {
        if d.in_sync {
            println!("in sync");
        } else {
            println!("DIFFERS:");
            for diff in &d.differences {
                println!(
                    "  {}: desired {} observed {} ({})",
                    diff.component,
                    diff.desired_digest.as_deref().unwrap_or("(nothing)"),
                    diff.observed_digest.as_deref().unwrap_or("(nothing)"),
                    diff.observed_state.as_deref().unwrap_or("missing")
                );
            }
        }
    }
}

fn print_deployment(d: &Deployment) {
    println!(
        "deployment {}: release {} to {} — {}",
        d.id, d.release, d.environment, d.status
    );
    println!(
        "created {}{}",
        d.created_at,
        d.finished_at
            .as_ref()
            .map(|f| format!(", finished {f}"))
            .unwrap_or_default()
    );
    if !d.message.is_empty() {
        println!("{}", d.message);
    }
    for j in &d.jobs {
        let reason = if j.reason_code.is_empty() {
            String::new()
        } else {
            format!(" ({})", j.reason_code)
        };
        println!(
            "  job {} target {} agent {} seq {}: {}{}",
            j.id, j.target, j.agent_id, j.sequence, j.status, reason
        );
        if !j.message.is_empty() {
            for line in j.message.lines() {
                println!("      {line}");
            }
        }
        for e in &j.events {
            println!("    {} {}", e.at, e.message);
        }
    }
}

/// `stella keys …` and `stella ca …`: the same phases against their own endpoint.
async fn rotation(
    conn: &ConnectionArgs,
    out: Output,
    path: &str,
    cmd: TrustCommand,
) -> anyhow::Result<()> {
    let client = ApiClient::connect(conn)?;
    let status: TrustStatus = match cmd {
        TrustCommand::Status => client.get("/api/v1/trust").await?,
        TrustCommand::Rotate(RotatePhase::Start) => {
            client.post(path, &json!({"phase": "start"})).await?
        }
        TrustCommand::Rotate(RotatePhase::Finish { force }) => {
            client
                .post(path, &json!({"phase": "finish", "force": force}))
                .await?
        }
    };
    render(out, &status, print_trust)
}

fn print_trust(t: &TrustStatus) {
    println!("trust bundle version {} ({})", t.bundle_version, t.phase);
    println!("CA:          {}", t.ca_fingerprint);
    if let Some(next) = &t.next_ca_fingerprint {
        println!("staged CA:   {next}");
    }
    println!("signing key: {}", t.active_key_id);
    if let Some(next) = &t.next_key_id {
        println!("staged key:  {next}");
    }
    table(
        &["AGENT", "NAME", "BUNDLE", "UP TO DATE", "NEWEST CA"],
        t.agents
            .iter()
            .map(|a| {
                vec![
                    a.id.clone(),
                    a.name.clone(),
                    a.trust_bundle_version.to_string(),
                    if a.up_to_date { "yes" } else { "no" }.to_string(),
                    if a.on_newest_ca { "yes" } else { "no" }.to_string(),
                ]
            })
            .collect(),
    );
}
