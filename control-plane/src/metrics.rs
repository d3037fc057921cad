//! Prometheus text exposition, computed from the database at scrape time so that counters
//! survive restarts and every replica reports the same truth.

use std::fmt::Write;

use crate::error::ApiResult;
use crate::state::AppState;
use crate::store::now_ms;

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn render(state: &AppState) -> ApiResult<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP stella_agents_connected Agents holding a session with this plane.\n# TYPE stella_agents_connected gauge\nstella_agents_connected {}",
        state.hub.connected_count()
    );

    let admission = &state.hub.admission;
    let _ = writeln!(
        out,
        "# HELP stella_session_setup_limit Agent session setups allowed at once (admission control).\n# TYPE stella_session_setup_limit gauge\nstella_session_setup_limit {}",
        admission.limit()
    );
    let _ = writeln!(
        out,
        "# HELP stella_session_setups_peak Most agent session setups in progress at once since start.\n# TYPE stella_session_setups_peak gauge\nstella_session_setups_peak {}",
        admission.peak()
    );
    let _ = writeln!(
        out,
        "# HELP stella_session_setups_deferred_total Agent sessions told to reconnect later because the setup limit was reached (since start).\n# TYPE stella_session_setups_deferred_total counter\nstella_session_setups_deferred_total {}",
        admission.deferred()
    );
    let _ = writeln!(
        out,
        "# HELP stella_tls_handshake_limit Agent TLS handshakes (TCP and QUIC) allowed at once.\n# TYPE stella_tls_handshake_limit gauge\nstella_tls_handshake_limit {}",
        state.hub.handshakes.limit()
    );
    let _ = writeln!(
        out,
        "# HELP stella_tls_handshakes_peak Most agent TLS handshakes in progress at once since start.\n# TYPE stella_tls_handshakes_peak gauge\nstella_tls_handshakes_peak {}",
        state.hub.handshakes.peak()
    );
    let _ = writeln!(
        out,
        "# HELP stella_agent_sessions_total Agent sessions registered since start (reconnects count; a migrated QUIC path does not).\n# TYPE stella_agent_sessions_total counter\nstella_agent_sessions_total {}",
        state.hub.sessions_started()
    );

    for (name, help, counts) in [
        (
            "stella_replica_signals_sent_total",
            "Signals this replica sent the others (PostgreSQL NOTIFY), by signal.",
            &state.replica.sent,
        ),
        (
            "stella_replica_signals_received_total",
            "Signals this replica received from the others, by signal.",
            &state.replica.received,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (signal, n) in crate::state::counts(counts) {
            let _ = writeln!(out, "{name}{{signal=\"{signal}\"}} {n}");
        }
    }

    let agents: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT id, name, last_heartbeat FROM agents WHERE status != 'revoked' ORDER BY id",
    )
    .fetch_all(&state.db)
    .await?;
    let _ = writeln!(
        out,
        "# HELP stella_agents_enrolled Agents enrolled and not revoked.\n# TYPE stella_agents_enrolled gauge\nstella_agents_enrolled {}",
        agents.len()
    );
    let _ = writeln!(
        out,
        "# HELP stella_agent_heartbeat_age_seconds Seconds since each agent's last heartbeat.\n# TYPE stella_agent_heartbeat_age_seconds gauge"
    );
    let now = now_ms();
    for (id, name, last) in &agents {
        // The hub holds heartbeats not yet flushed to the database.
        if let Some(last) = state.hub.last_heartbeat(id).or(*last) {
            let age = ((now - last).max(0) as f64) / 1000.0;
            let _ = writeln!(
                out,
                "stella_agent_heartbeat_age_seconds{{agent=\"{}\",name=\"{}\"}} {age:.3}",
                escape(id),
                escape(name)
            );
        }
    }

    let _ = writeln!(
        out,
        "# HELP stella_deployments_total Deployments by status.\n# TYPE stella_deployments_total counter"
    );
    let by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM deployments GROUP BY status ORDER BY status")
            .fetch_all(&state.db)
            .await?;
    for status in ["running", "succeeded", "failed"] {
        let n = by_status
            .iter()
            .find(|(s, _)| s == status)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        let _ = writeln!(out, "stella_deployments_total{{status=\"{status}\"}} {n}");
    }

    let _ = writeln!(
        out,
        "# HELP stella_jobs_total Jobs by status.\n# TYPE stella_jobs_total counter"
    );
    let jobs: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status")
            .fetch_all(&state.db)
            .await?;
    for (status, n) in &jobs {
        let _ = writeln!(
            out,
            "stella_jobs_total{{status=\"{}\"}} {n}",
            escape(status)
        );
    }

    let _ = writeln!(
        out,
        "# HELP stella_agent_job_refusals_total Jobs refused by agents, by reason.\n# TYPE stella_agent_job_refusals_total counter"
    );
    let refusals: Vec<(String, i64)> = sqlx::query_as(
        "SELECT reason_code, COUNT(*) FROM jobs WHERE status = 'refused' GROUP BY reason_code ORDER BY reason_code",
    )
    .fetch_all(&state.db)
    .await?;
    for (reason, n) in &refusals {
        let _ = writeln!(
            out,
            "stella_agent_job_refusals_total{{reason=\"{}\"}} {n}",
            escape(reason)
        );
    }
    let _ = writeln!(
        out,
        "# HELP stella_result_receipt_refusals_total Job results refused because their agent receipt did not verify (since start).\n# TYPE stella_result_receipt_refusals_total counter\nstella_result_receipt_refusals_total {}",
        state
            .receipt_refusals
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP stella_drift_findings Open drift findings, by kind and severity.\n# TYPE stella_drift_findings gauge"
    );
    for (kind, n) in crate::drift::open_counts(state).await? {
        let _ = writeln!(
            out,
            "stella_drift_findings{{kind=\"{kind}\",severity=\"{}\"}} {n}",
            kind.severity()
        );
    }
    if let Ok(refusals) = state.session_refusals.lock() {
        labelled_counter(
            &mut out,
            "stella_session_refusals_total",
            "Agent sessions refused at their start, by reason (since start).",
            &refusals,
        );
    }
    if let Ok(refusals) = state.handshake_refusals.lock() {
        labelled_counter(
            &mut out,
            "stella_handshake_refusals_total",
            "Agent TLS handshakes refused on the agent endpoint, by reason (since start).",
            &refusals,
        );
    }
    if let Ok(refusals) = state.enrollment_refusals.lock() {
        labelled_counter(
            &mut out,
            "stella_enrollment_refusals_total",
            "Enrollments refused, by reason (since start).",
            &refusals,
        );
    }
    Ok(out)
}

/// A counter family with a `reason` label, from in-memory counts.
fn labelled_counter(
    out: &mut String,
    name: &str,
    help: &str,
    counts: &std::collections::BTreeMap<&'static str, u64>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (reason, n) in counts {
        let _ = writeln!(out, "{name}{{reason=\"{}\"}} {n}", escape(reason));
    }
}
