//! CLI commands of release management: components, promotions, approvals, rollbacks, API
//! users and the audit log. Following a promotion or rollback uses the plane's event stream
//! and prints each target's progress; the exit status says how it ended.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use stella_control_plane::audit::AuditEntry;
use stella_control_plane::client::ApiClient;
use stella_control_plane::components::{Component, SyncResult};
use stella_control_plane::deployments::Deployment;
use stella_control_plane::duration;
use stella_control_plane::promotions::{Explanation, Promotion};
use stella_control_plane::users::{ApiTokenCreated, ApiTokenView};

use super::{Output, parse_label, path_seg, print_json, render, table};

#[derive(Subcommand)]
pub enum ComponentCommand {
    /// Register a component: an image repository in an OCI registry.
    Create {
        name: String,
        /// Registry base URL, e.g. https://registry.example.com or http://127.0.0.1:5000.
        #[arg(long)]
        registry: String,
        /// Repository in the registry, e.g. team/api.
        #[arg(long)]
        repository: String,
        /// Regex over the whole tag; its group `version` (or first group) is a semver.
        #[arg(long)]
        tag_pattern: Option<String>,
        /// Channel rule, in order (repeatable): `beta=prerelease` or `rc=~-rc\.\d+$`.
        #[arg(long = "channel")]
        channels: Vec<String>,
        #[arg(long)]
        username: Option<String>,
        /// Where the plane reads the password when it syncs: env:NAME or file:/path.
        #[arg(long)]
        password_ref: Option<String>,
    },
    /// List the repository's tags, resolve each to its manifest digest, store the versions.
    Sync { name: String },
    /// List components.
    List,
    /// Show a component and its versions.
    Show { name: String },
}

#[derive(Args)]
pub struct PromoteArgs {
    /// Release name or id.
    pub release: String,
    /// Environment to promote into.
    #[arg(long)]
    pub to: String,
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Ask to override an active freeze window (only its override users may).
    #[arg(long)]
    pub override_freeze: bool,
    /// Return once the gates decided instead of following the deployment.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up following after this long (the promotion goes on).
    #[arg(long, default_value = "30m", value_parser = duration::parse)]
    pub timeout: Duration,
}

#[derive(Args)]
pub struct ApproveArgs {
    /// Promotion id.
    pub id: String,
    #[arg(long, default_value = "")]
    pub comment: String,
}

#[derive(Args)]
pub struct RejectArgs {
    /// Promotion id.
    pub id: String,
    #[arg(long)]
    pub reason: String,
}

#[derive(Args)]
pub struct RollbackArgs {
    /// Environment to roll back to the release deployed before the current one.
    #[arg(long)]
    pub env: String,
    /// Return once the rollback deployment is created.
    #[arg(long)]
    pub no_wait: bool,
    #[arg(long, default_value = "10m", value_parser = duration::parse)]
    pub timeout: Duration,
}

#[derive(Subcommand)]
pub enum PromotionCommand {
    /// List promotions.
    List,
    /// Show a promotion: status, approvals, latest decision, workflow steps.
    Show { id: String },
    /// Why a promotion was allowed or blocked: every gate's result and the input hash.
    Explain { id: String },
    /// Cancel a promotion that has not started deploying.
    Cancel { id: String },
    /// Follow a promotion until it ends (exit status non-zero unless deployed).
    Watch {
        id: String,
        #[arg(long, default_value = "30m", value_parser = duration::parse)]
        timeout: Duration,
    },
}

#[derive(Subcommand)]
pub enum ApiTokenCommand {
    /// Create an API token for a user with a role (admin, releaser, approver, viewer).
    Create {
        /// The user the token acts as.
        #[arg(long)]
        user: String,
        #[arg(long)]
        role: String,
        /// Token name (default: USER-random).
        #[arg(long)]
        name: Option<String>,
    },
    /// List API tokens (never their secrets).
    List,
    /// Revoke an API token by id or name.
    Revoke { id: String },
}

#[derive(Args)]
pub struct EnvSetArgs {
    pub name: String,
    /// The environment a release must reach first ("" for none).
    #[arg(long)]
    pub after: Option<String>,
    /// Approvals required (N of the approvers).
    #[arg(long)]
    pub approvals: Option<u32>,
    /// Separation of duties: requester and release creator may not approve.
    #[arg(long)]
    pub separation_of_duties: Option<bool>,
    /// Freeze window START..END:REASON[:USER,USER] (RFC 3339 times; repeatable; replaces all).
    #[arg(long = "freeze")]
    pub freezes: Vec<String>,
    /// Remove every freeze window.
    #[arg(long)]
    pub clear_freezes: bool,
    /// Variable K=V (repeatable; K= removes it).
    #[arg(long = "var", value_parser = parse_label)]
    pub variables: Vec<(String, String)>,
    /// Secret reference K=SCHEME:LOCATOR, e.g. DB_PASSWORD=vault:db/prod#password (repeatable).
    #[arg(long = "secret", value_parser = parse_label)]
    pub secrets: Vec<(String, String)>,
    /// Rego policy module NAME=FILE (repeatable; NAME= removes it).
    #[arg(long = "policy", value_parser = parse_label)]
    pub policies: Vec<(String, String)>,
    /// Workflow template YAML file ("" returns to the default template).
    #[arg(long)]
    pub workflow: Option<String>,
}

/// `START..END:REASON[:USER,USER]`
pub fn parse_freeze(s: &str) -> anyhow::Result<serde_json::Value> {
    let (start, rest) = s
        .split_once("..")
        .with_context(|| format!("freeze {s:?}: expected START..END:REASON[:USERS]"))?;
    // RFC 3339 times contain ':' themselves; the end time ends at its zone (Z or ±hh:mm).
    let end_len = rest
        .find('Z')
        .map(|i| i + 1)
        .with_context(|| format!("freeze {s:?}: give times in UTC, ending in Z"))?;
    let (end, tail) = rest.split_at(end_len);
    let tail = tail
        .strip_prefix(':')
        .with_context(|| format!("freeze {s:?}: expected :REASON after the end time"))?;
    let (reason, users) = match tail.split_once(':') {
        Some((reason, users)) => (
            reason,
            users
                .split(',')
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>(),
        ),
        None => (tail, Vec::new()),
    };
    Ok(json!({"start": start, "end": end, "reason": reason, "override_users": users}))
}

pub async fn env_set(client: &ApiClient, out: Output, args: EnvSetArgs) -> anyhow::Result<()> {
    let mut body = serde_json::Map::new();
    if let Some(after) = args.after {
        body.insert("after".into(), json!(after));
    }
    if let Some(n) = args.approvals {
        body.insert("required_approvals".into(), json!(n));
    }
    if let Some(sod) = args.separation_of_duties {
        body.insert("separation_of_duties".into(), json!(sod));
    }
    if args.clear_freezes || !args.freezes.is_empty() {
        let windows = args
            .freezes
            .iter()
            .map(|f| parse_freeze(f))
            .collect::<anyhow::Result<Vec<_>>>()?;
        body.insert("freeze_windows".into(), json!(windows));
    }
    if !args.variables.is_empty() {
        let vars: BTreeMap<_, _> = args.variables.into_iter().collect();
        body.insert("variables".into(), json!(vars));
    }
    if !args.secrets.is_empty() {
        let refs: BTreeMap<_, _> = args.secrets.into_iter().collect();
        body.insert("secret_refs".into(), json!(refs));
    }
    if !args.policies.is_empty() {
        let mut modules = BTreeMap::new();
        for (name, file) in args.policies {
            let module = if file.is_empty() {
                String::new()
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading policy {name} from {file}"))?
            };
            modules.insert(name, module);
        }
        body.insert("policies".into(), json!(modules));
    }
    if let Some(file) = args.workflow {
        let yaml = if file.is_empty() {
            String::new()
        } else {
            std::fs::read_to_string(&file).with_context(|| format!("reading workflow {file}"))?
        };
        body.insert("workflow".into(), json!(yaml));
    }
    let env: stella_control_plane::environments::Environment = client
        .patch(
            &format!("/api/v1/environments/{}", path_seg(&args.name)),
            &serde_json::Value::Object(body),
        )
        .await?;
    render(out, &env, super::print_environment)
}

pub async fn component(
    client: &ApiClient,
    out: Output,
    cmd: ComponentCommand,
) -> anyhow::Result<()> {
    match cmd {
        ComponentCommand::Create {
            name,
            registry,
            repository,
            tag_pattern,
            channels,
            username,
            password_ref,
        } => {
            let c: Component = client
                .post(
                    "/api/v1/components",
                    &json!({"name": name, "registry": registry, "repository": repository,
                        "tag_pattern": tag_pattern, "channels": channels, "username": username,
                        "password_ref": password_ref}),
                )
                .await?;
            render(out, &c, |c| {
                println!("created component {} ({}) → {}", c.name, c.id, c.image)
            })
        }
        ComponentCommand::Sync { name } => {
            if out == Output::Text {
                eprintln!("syncing {name}: listing tags and resolving digests…");
            }
            let r: SyncResult = client
                .post(
                    &format!("/api/v1/components/{}/sync", path_seg(&name)),
                    &json!({}),
                )
                .await?;
            render(out, &r, |r| {
                println!(
                    "{}: {} version{}, {} tag{} skipped",
                    r.component,
                    r.versions.len(),
                    if r.versions.len() == 1 { "" } else { "s" },
                    r.skipped.len(),
                    if r.skipped.len() == 1 { "" } else { "s" }
                );
                print_versions(&r.versions);
                for s in &r.skipped {
                    println!("  skipped {}: {}", s.tag, s.reason);
                }
                for t in &r.moved {
                    println!(
                        "  WARNING: tag {t} now points to another digest than at the last sync"
                    );
                }
            })
        }
        ComponentCommand::List => {
            let cs: Vec<Component> = client.list("/api/v1/components").await?;
            render(out, &cs, |cs| {
                table(
                    &["NAME", "IMAGE", "VERSIONS", "SYNCED"],
                    cs.iter()
                        .map(|c| {
                            vec![
                                c.name.clone(),
                                c.image.clone(),
                                c.versions.len().to_string(),
                                c.synced_at.clone().unwrap_or_else(|| "never".into()),
                            ]
                        })
                        .collect(),
                )
            })
        }
        ComponentCommand::Show { name } => {
            let c: Component = client
                .get(&format!("/api/v1/components/{}", path_seg(&name)))
                .await?;
            render(out, &c, |c| {
                println!("{} ({}) → {} [{}]", c.name, c.id, c.image, c.registry);
                println!("tag pattern {}; channels {:?}", c.tag_pattern, c.channels);
                print_versions(&c.versions);
            })
        }
    }
}

fn print_versions(versions: &[stella_control_plane::components::ComponentVersionView]) {
    table(
        &["TAG", "VERSION", "CHANNEL", "DIGEST"],
        versions
            .iter()
            .map(|v| {
                vec![
                    v.tag.clone(),
                    v.semver.clone(),
                    v.channel.clone(),
                    v.digest.clone(),
                ]
            })
            .collect(),
    );
}

pub async fn promote(client: &ApiClient, out: Output, args: PromoteArgs) -> anyhow::Result<()> {
    let p: Promotion = client
        .post(
            "/api/v1/promotions",
            &json!({"release": args.release, "env": args.to, "reason": args.reason,
                "override_freeze": args.override_freeze}),
        )
        .await?;
    if out == Output::Text {
        println!(
            "promotion {}: {} → {} requested by {}",
            p.id, p.release, p.environment, p.requested_by
        );
        print_decision(&p);
    }
    follow_or_report(client, out, p, args.no_wait, args.timeout).await
}

/// After an action: report where the promotion stands, or follow it to its end.
async fn follow_or_report(
    client: &ApiClient,
    out: Output,
    p: Promotion,
    no_wait: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    match p.status.as_str() {
        "awaiting_approval" => {
            if out == Output::Json {
                print_json(&p)?;
            } else {
                println!(
                    "awaiting approval: `stella approve {}` (see `stella promotion explain {}`)",
                    p.id, p.id
                );
            }
            Ok(())
        }
        "rejected" | "cancelled" => {
            if out == Output::Json {
                print_json(&p)?;
            }
            bail!("promotion {} {}: {}", p.id, p.status, p.message)
        }
        _ if no_wait => render(out, &p, |p| println!("promotion {} {}", p.id, p.status)),
        _ => watch(client, out, &p.id, timeout).await,
    }
}

pub async fn approve(client: &ApiClient, out: Output, args: ApproveArgs) -> anyhow::Result<()> {
    let p: Promotion = client
        .post(
            &format!("/api/v1/promotions/{}/approve", path_seg(&args.id)),
            &json!({"comment": args.comment}),
        )
        .await?;
    if out == Output::Text {
        println!(
            "approved promotion {} ({} → {})",
            p.id, p.release, p.environment
        );
        print_decision(&p);
    }
    follow_or_report(client, out, p, false, Duration::from_secs(1800)).await
}

pub async fn reject(client: &ApiClient, out: Output, args: RejectArgs) -> anyhow::Result<()> {
    let p: Promotion = client
        .post(
            &format!("/api/v1/promotions/{}/reject", path_seg(&args.id)),
            &json!({"reason": args.reason}),
        )
        .await?;
    render(out, &p, |p| {
        println!("promotion {} is {}: {}", p.id, p.status, p.message)
    })
}

pub async fn promotion(
    client: &ApiClient,
    out: Output,
    cmd: PromotionCommand,
) -> anyhow::Result<()> {
    match cmd {
        PromotionCommand::List => {
            let ps: Vec<Promotion> = client.list("/api/v1/promotions").await?;
            render(out, &ps, |ps| {
                table(
                    &["ID", "RELEASE", "ENV", "STATUS", "REQUESTED BY", "CREATED"],
                    ps.iter()
                        .map(|p| {
                            vec![
                                p.id.clone(),
                                p.release.clone(),
                                p.environment.clone(),
                                p.status.clone(),
                                p.requested_by.clone(),
                                p.created_at.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        PromotionCommand::Show { id } => {
            let p: Promotion = client
                .get(&format!("/api/v1/promotions/{}", path_seg(&id)))
                .await?;
            render(out, &p, print_promotion)
        }
        PromotionCommand::Explain { id } => {
            let e: Explanation = client
                .get(&format!("/api/v1/promotions/{}/explain", path_seg(&id)))
                .await?;
            render(out, &e, |e| {
                println!("promotion {} is {}", e.promotion, e.status);
                println!("{}", e.summary);
                if let Some(d) = e.decisions.last() {
                    println!(
                        "input hash {}; policy digest {}",
                        d.input_hash, d.policy_digest
                    );
                }
                println!("{} decision(s) on record", e.decisions.len());
            })
        }
        PromotionCommand::Cancel { id } => {
            let p: Promotion = client
                .post(
                    &format!("/api/v1/promotions/{}/cancel", path_seg(&id)),
                    &json!({}),
                )
                .await?;
            render(out, &p, |p| println!("promotion {} is {}", p.id, p.status))
        }
        PromotionCommand::Watch { id, timeout } => watch(client, out, &id, timeout).await,
    }
}

fn print_decision(p: &Promotion) {
    if let Some(d) = &p.decision {
        println!("gates: {}", d.outcome);
        for g in &d.gates {
            println!("  {:<7} {} — {}", g.status, g.gate, g.reason);
        }
    }
}

fn print_promotion(p: &Promotion) {
    println!(
        "promotion {}: {} → {} — {}",
        p.id, p.release, p.environment, p.status
    );
    println!(
        "requested by {} at {}: {}",
        p.requested_by, p.created_at, p.reason
    );
    if !p.message.is_empty() {
        println!("{}", p.message);
    }
    for a in &p.approvals {
        println!("  {} by {} at {}: {}", a.decision, a.user, a.at, a.comment);
    }
    print_decision(p);
    if let Some(run) = &p.workflow {
        println!("workflow {} ({}): {}", run.template, run.id, run.status);
        for s in &run.steps {
            println!("  {:<20} {:<13} {}", s.id, s.status, s.message);
        }
    }
}

/// Follows a promotion until it ends: status changes, and each target's progress in every
/// deployment the workflow starts. Woken by the event stream; re-reads the objects it follows.
pub async fn watch(
    client: &ApiClient,
    out: Output,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut events = client
        .events(&format!("promotion={}", path_seg(id)), timeout)
        .await
        .ok();
    let mut progress = Progress::default();
    let mut last_status = String::new();
    loop {
        let p: Promotion = client
            .get(&format!("/api/v1/promotions/{}", path_seg(id)))
            .await?;
        if out == Output::Text {
            if p.status != last_status {
                println!("promotion {}: {}", p.id, p.status);
                last_status = p.status.clone();
            }
            if let Some(run) = &p.workflow {
                for dep in run.steps.iter().flat_map(|s| s.deployments.iter()) {
                    let d: Deployment = client
                        .get(&format!("/api/v1/deployments/{}", path_seg(dep)))
                        .await?;
                    progress.print(&d);
                }
            }
        }
        if stella_control_plane::promotions::FINAL_STATUSES.contains(&p.status.as_str()) {
            if out == Output::Json {
                print_json(&p)?;
            } else if !p.message.is_empty() {
                println!("{}", p.message);
            }
            if p.status == "deployed" {
                return Ok(());
            }
            bail!("promotion {} {}", p.id, p.status);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "gave up following promotion {id} after {timeout:?}; it goes on (`stella promotion watch {id}`)"
            );
        }
        // The event stream wakes us as soon as something changes; the timer covers job
        // progress (not an event of its own) and a lost stream.
        let wait = tokio::time::sleep(Duration::from_millis(1000));
        match &mut events {
            Some(stream) => {
                tokio::select! {
                    next = stream.next() => if !matches!(next, Ok(Some(_))) { events = None },
                    _ = wait => {}
                }
            }
            None => wait.await,
        }
    }
}

/// What has been printed of each deployment's jobs.
#[derive(Default)]
pub struct Progress {
    events: BTreeMap<String, usize>,
    statuses: BTreeMap<String, String>,
}

impl Progress {
    pub fn print(&mut self, d: &Deployment) {
        for job in &d.jobs {
            let seen = self.events.entry(job.id.clone()).or_default();
            for event in job.events.iter().skip(*seen) {
                println!("  [{}] {}", job.target, event.message);
            }
            *seen = job.events.len();
            if self.statuses.get(&job.id) != Some(&job.status) {
                self.statuses.insert(job.id.clone(), job.status.clone());
                if matches!(
                    job.status.as_str(),
                    "succeeded" | "failed" | "refused" | "cancelled"
                ) {
                    let reason = if job.reason_code.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", job.reason_code)
                    };
                    let message = job.message.lines().next().unwrap_or_default();
                    println!(
                        "  [{}] {} {}{}{}",
                        job.target,
                        d.release,
                        job.status,
                        reason,
                        if message.is_empty() {
                            String::new()
                        } else {
                            format!(": {message}")
                        }
                    );
                }
            }
        }
    }
}

pub async fn rollback(client: &ApiClient, out: Output, args: RollbackArgs) -> anyhow::Result<()> {
    let d: Deployment = client
        .post(
            &format!("/api/v1/environments/{}/rollback", path_seg(&args.env)),
            &json!({}),
        )
        .await?;
    if out == Output::Text {
        println!(
            "rollback of {}: deployment {} puts release {} back ({} target{})",
            args.env,
            d.id,
            d.release,
            d.jobs.len(),
            if d.jobs.len() == 1 { "" } else { "s" }
        );
    }
    if args.no_wait {
        return render(out, &d, |_| {});
    }
    super::follow_deployment(client, out, &d, args.timeout).await
}

pub async fn api_token(
    client: &ApiClient,
    out: Output,
    cmd: ApiTokenCommand,
) -> anyhow::Result<()> {
    match cmd {
        ApiTokenCommand::Create { user, role, name } => {
            let t: ApiTokenCreated = client
                .post(
                    "/api/v1/api-tokens",
                    &json!({"user": user, "role": role, "name": name}),
                )
                .await?;
            render(out, &t, |t| {
                println!("token: {}", t.token);
                println!(
                    "user {} with role {} (token {} / {}); shown once",
                    t.user,
                    t.role.as_str(),
                    t.name,
                    t.id
                );
            })
        }
        ApiTokenCommand::List => {
            let ts: Vec<ApiTokenView> = client.list("/api/v1/api-tokens").await?;
            render(out, &ts, |ts| {
                table(
                    &["ID", "NAME", "USER", "ROLE", "CREATED", "REVOKED"],
                    ts.iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                t.name.clone(),
                                t.user.clone(),
                                t.role.as_str().to_string(),
                                t.created_at.clone(),
                                t.revoked_at.clone().unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect(),
                )
            })
        }
        ApiTokenCommand::Revoke { id } => {
            let t: ApiTokenView = client
                .post(
                    &format!("/api/v1/api-tokens/{}/revoke", path_seg(&id)),
                    &json!({}),
                )
                .await?;
            render(out, &t, |t| {
                println!("API token {} of {} revoked", t.name, t.user)
            })
        }
    }
}

pub async fn audit(client: &ApiClient, out: Output, limit: u32) -> anyhow::Result<()> {
    let entries: Vec<AuditEntry> = client.get(&format!("/api/v1/audit?limit={limit}")).await?;
    render(out, &entries, |es| {
        table(
            &["AT", "ACTOR", "ROLE", "METHOD", "PATH", "STATUS", "FROM"],
            es.iter()
                .map(|e| {
                    vec![
                        e.at.clone(),
                        e.actor.clone(),
                        e.role.clone(),
                        e.method.clone(),
                        e.path.clone(),
                        e.status.to_string(),
                        e.client_ip.clone(),
                    ]
                })
                .collect(),
        )
    })
}

#[derive(Subcommand)]
pub enum EvidenceCommand {
    /// Packets recorded in a window, in chain order.
    List {
        /// RFC 3339 start (inclusive).
        #[arg(long)]
        from: Option<String>,
        /// RFC 3339 end (inclusive).
        #[arg(long)]
        to: Option<String>,
    },
    /// One packet for a person (by evidence id, or the latest of a promotion or deployment).
    Show { id: String },
    /// Write a self-contained bundle (packets, keys, certificates) for offline verification.
    Export {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Verify a bundle fully offline: signatures, receipts, the chain; names the first broken
    /// link. Exit status non-zero when anything is wrong.
    Verify {
        file: std::path::PathBuf,
        /// Evidence public keys to trust (JSON from `stella evidence keys`); without it the
        /// bundle vouches for its own keys.
        #[arg(long)]
        trusted_keys: Option<std::path::PathBuf>,
    },
    /// The plane's evidence public keys (JSON), to pin when verifying elsewhere.
    Keys,
    /// Deployments, rollbacks and decisions with their evidence ids, as CSV or JSON.
    Audit {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value = "csv")]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn window_query(from: &Option<String>, to: &Option<String>) -> String {
    let mut q = Vec::new();
    if let Some(f) = from {
        q.push(format!("from={}", path_seg(f)));
    }
    if let Some(t) = to {
        q.push(format!("to={}", path_seg(t)));
    }
    q.join("&")
}

/// Offline: needs no plane, no network.
pub fn verify_evidence(
    out: Output,
    file: &std::path::Path,
    trusted_keys: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the evidence bundle {}", file.display()))?;
    let bundle = stella_evidence::Bundle::from_json(&text)
        .with_context(|| format!("{} is not an evidence bundle", file.display()))?;
    let report = match trusted_keys {
        Some(path) => {
            let keys: Vec<stella_pki::PublicKeyRecord> = serde_json::from_str(
                &std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| {
                format!(
                    "{}: expected the JSON of `stella evidence keys`",
                    path.display()
                )
            })?;
            stella_evidence::verify_bundle_pinned(&bundle, &keys)
        }
        None => stella_evidence::verify_bundle(&bundle),
    };
    if out == Output::Json {
        print_json(&report)?;
    } else {
        println!("{report}");
    }
    if report.is_valid() {
        Ok(())
    } else {
        match report.first_broken_link() {
            Some(problem) => bail!("evidence does not verify; first broken link: {problem}"),
            None => bail!("evidence does not verify"),
        }
    }
}

pub async fn evidence(client: &ApiClient, out: Output, cmd: EvidenceCommand) -> anyhow::Result<()> {
    use stella_control_plane::evidence::{EvidenceDetail, EvidenceSummary};
    match cmd {
        EvidenceCommand::List { from, to } => {
            let items: Vec<EvidenceSummary> = client
                .get(&format!("/api/v1/evidence?{}", window_query(&from, &to)))
                .await?;
            render(out, &items, |items| {
                table(
                    &["SEQ", "ID", "KIND", "PROMOTION", "DEPLOYMENT", "RECORDED"],
                    items
                        .iter()
                        .map(|e| {
                            vec![
                                e.sequence.to_string(),
                                e.id.clone(),
                                e.kind.clone(),
                                e.promotion_id.clone().unwrap_or_else(|| "-".into()),
                                e.deployment_id.clone().unwrap_or_else(|| "-".into()),
                                e.recorded_at.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        EvidenceCommand::Show { id } => {
            let d: EvidenceDetail = client
                .get(&format!("/api/v1/evidence/{}", path_seg(&id)))
                .await?;
            render(out, &d, |d| println!("{}", d.rendered))
        }
        EvidenceCommand::Export {
            from,
            to,
            out: path,
        } => {
            let bundle: serde_json::Value = client
                .get(&format!(
                    "/api/v1/evidence/export?{}",
                    window_query(&from, &to)
                ))
                .await?;
            let text = serde_json::to_string_pretty(&bundle)?;
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            let packets = bundle["packets"].as_array().map(Vec::len).unwrap_or(0);
            eprintln!("wrote {packets} packet(s) to {}", path.display());
            Ok(())
        }
        EvidenceCommand::Verify { file, trusted_keys } => {
            verify_evidence(out, &file, trusted_keys.as_deref())
        }
        EvidenceCommand::Keys => {
            let keys: serde_json::Value = client.get("/api/v1/evidence/keys").await?;
            print_json(&keys)
        }
        EvidenceCommand::Audit {
            from,
            to,
            format,
            out: path,
        } => {
            let mut query = window_query(&from, &to);
            query.push_str(&format!("&format={}", path_seg(&format)));
            let text = client
                .get_text(&format!("/api/v1/evidence/audit?{query}"))
                .await?;
            match path {
                Some(p) => {
                    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?
                }
                None => print!("{text}"),
            }
            Ok(())
        }
    }
}
