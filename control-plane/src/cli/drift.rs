//! `stella drift`: findings per target, ignore rules, and each environment's remediation
//! policy.

use clap::Subcommand;
use serde_json::json;

use stella_control_plane::client::ApiClient;
use stella_control_plane::drift::{DriftPolicyView, IgnoreRuleView, TargetDrift};

use super::{Output, path_seg, render, table};

#[derive(clap::Args)]
pub struct DriftArgs {
    #[command(subcommand)]
    pub command: Option<DriftCommand>,
    /// Only the targets of this environment.
    #[arg(long)]
    pub env: Option<String>,
    /// Only this target.
    #[arg(long)]
    pub target: Option<String>,
    /// Resolved findings too (the history).
    #[arg(long)]
    pub history: bool,
}

#[derive(Subcommand)]
pub enum DriftCommand {
    /// Rules that silence known differences.
    #[command(subcommand)]
    Ignore(IgnoreCommand),
    /// Show or set an environment's remediation policy: notify (default) or reconcile.
    Policy {
        #[arg(long)]
        env: String,
        /// notify or reconcile; without it the current policy is shown.
        #[arg(long)]
        mode: Option<String>,
        /// Reconciles per target in any trailing hour.
        #[arg(long)]
        max_per_hour: Option<u32>,
        /// Consecutive failed reconciles that open a target's circuit breaker.
        #[arg(long)]
        breaker: Option<u32>,
        /// Seconds an open breaker waits before one trial reconcile.
        #[arg(long)]
        breaker_cooldown_secs: Option<u64>,
        /// http(s) URL notified (JSON POST) when a target's drift changes; "" removes it.
        #[arg(long)]
        webhook: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum IgnoreCommand {
    /// Add a rule: conditions that must all hold, e.g. kind=unmanaged_extra,
    /// component=sidecar,kind=stopped or label:team=ops.
    Add {
        selector: String,
        #[arg(long)]
        env: String,
        /// Only this target of the environment.
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// List rules.
    List {
        #[arg(long)]
        env: Option<String>,
    },
    /// Remove a rule by id.
    Remove { id: String },
}

pub async fn run(client: &ApiClient, out: Output, args: DriftArgs) -> anyhow::Result<()> {
    match args.command {
        None => {
            let mut query = vec![];
            if let Some(env) = &args.env {
                query.push(format!("env={}", path_seg(env)));
            }
            if let Some(target) = &args.target {
                query.push(format!("target={}", path_seg(target)));
            }
            if args.history {
                query.push("history=true".to_string());
            }
            let path = if query.is_empty() {
                "/api/v1/drift".to_string()
            } else {
                format!("/api/v1/drift?{}", query.join("&"))
            };
            let report: Vec<TargetDrift> = client.get(&path).await?;
            render(out, &report, print_report)
        }
        Some(DriftCommand::Ignore(IgnoreCommand::Add {
            selector,
            env,
            target,
            reason,
        })) => {
            let rule: IgnoreRuleView = client
                .post(
                    "/api/v1/drift/ignore",
                    &json!({"env": env, "target": target, "selector": selector, "reason": reason}),
                )
                .await?;
            render(out, &rule, |r| {
                println!(
                    "added ignore rule {} ({}) for {}; {} open finding(s) silenced",
                    r.id,
                    r.selector,
                    r.target.as_deref().map_or_else(
                        || format!("every target of {}", r.environment),
                        |t| format!("target {t}")
                    ),
                    r.silenced.len()
                )
            })
        }
        Some(DriftCommand::Ignore(IgnoreCommand::List { env })) => {
            let path = match env {
                Some(e) => format!("/api/v1/drift/ignore?env={}", path_seg(&e)),
                None => "/api/v1/drift/ignore".to_string(),
            };
            let rules: Vec<IgnoreRuleView> = client.get(&path).await?;
            render(out, &rules, |rs| {
                table(
                    &["ID", "ENV", "TARGET", "SELECTOR", "REASON", "BY"],
                    rs.iter()
                        .map(|r| {
                            vec![
                                r.id.clone(),
                                r.environment.clone(),
                                r.target.clone().unwrap_or_else(|| "*".to_string()),
                                r.selector.clone(),
                                r.reason.clone(),
                                r.created_by.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        Some(DriftCommand::Ignore(IgnoreCommand::Remove { id })) => {
            client
                .delete(&format!("/api/v1/drift/ignore/{}", path_seg(&id)))
                .await?;
            println!("removed ignore rule {id}");
            Ok(())
        }
        Some(DriftCommand::Policy {
            env,
            mode,
            max_per_hour,
            breaker,
            breaker_cooldown_secs,
            webhook,
        }) => {
            let path = format!("/api/v1/environments/{}/drift", path_seg(&env));
            let changes = max_per_hour.is_some()
                || breaker.is_some()
                || breaker_cooldown_secs.is_some()
                || webhook.is_some();
            let policy: DriftPolicyView = match mode {
                Some(mode) => {
                    client
                        .put(
                            &path,
                            &json!({"mode": mode, "max_per_hour": max_per_hour,
                                "breaker_threshold": breaker,
                                "breaker_cooldown_secs": breaker_cooldown_secs,
                                "webhook": webhook}),
                        )
                        .await?
                }
                None if changes => {
                    anyhow::bail!(
                        "give --mode notify or --mode reconcile with the settings to change"
                    )
                }
                None => client.get(&path).await?,
            };
            render(out, &policy, print_policy)
        }
    }
}

fn print_policy(p: &DriftPolicyView) {
    println!("environment: {}", p.environment);
    println!("mode:        {}", p.mode);
    println!(
        "reconciles:  at most {} per target per hour; circuit breaker after {} consecutive failures, retried after {}s",
        p.max_per_hour, p.breaker_threshold, p.breaker_cooldown_secs
    );
    println!("webhook:     {}", p.webhook.as_deref().unwrap_or("none"));
}

fn print_report(targets: &Vec<TargetDrift>) {
    if targets.is_empty() {
        println!("no targets");
        return;
    }
    for t in targets {
        let state = match (&t.evaluated_at, t.in_sync) {
            (None, _) => "not evaluated yet".to_string(),
            (Some(_), true) => "in sync".to_string(),
            (Some(_), false) => format!(
                "{} finding(s)",
                t.findings
                    .iter()
                    .filter(|f| f.resolved_at.is_none())
                    .count()
            ),
        };
        println!("{} ({}, {}): {state}", t.target, t.environment, t.kind);
        println!(
            "  remediation: {} — {}",
            t.remediation.mode, t.remediation.summary
        );
        if let Some(last) = t.remediation.reconciles.first() {
            println!(
                "  last reconcile: deployment {} {}{}",
                last.deployment_id,
                last.outcome,
                if last.error.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", last.error)
                }
            );
        }
        if t.findings.is_empty() {
            continue;
        }
        table(
            &[
                "  KIND",
                "SEVERITY",
                "COMPONENT",
                "EXPECTED",
                "OBSERVED",
                "SINCE",
                "STATUS",
            ],
            t.findings
                .iter()
                .map(|f| {
                    vec![
                        format!("  {}", f.kind),
                        f.severity.clone(),
                        f.component
                            .clone()
                            .or_else(|| f.workload.clone())
                            .unwrap_or_else(|| "-".to_string()),
                        short(f.expected.as_deref()),
                        short(f.observed.as_deref()),
                        f.first_seen.clone(),
                        f.resolution.clone().unwrap_or_else(|| "open".to_string()),
                    ]
                })
                .collect(),
        );
        for f in &t.findings {
            println!("  - {}", f.detail);
        }
    }
}

/// Digests are long; the first 19 characters (`sha256:` + 12 hex) tell them apart.
fn short(value: Option<&str>) -> String {
    match value {
        None => "-".to_string(),
        Some(v) if v.starts_with("sha256:") && v.len() > 19 => format!("{}…", &v[..19]),
        Some(v) if v.chars().count() > 40 => format!("{}…", v.chars().take(40).collect::<String>()),
        Some(v) => v.to_string(),
    }
}
