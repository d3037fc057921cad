//! The plane's side of the promotion gates: gather every input the gates need from the
//! database into one document, let `stella-policy` decide, and store the decision record
//! (each gate's result, the hash of the inputs, the input itself) — never updated afterwards.

use crate::error::{ApiError, ApiResult};
use crate::promotions::{DecisionView, GateView, PromotionRecord};
use crate::state::AppState;
use crate::store::{new_id, now_ms, rfc3339};

/// The input document of the gates for `promotion`, as of now.
async fn input(state: &AppState, promotion: &PromotionRecord) -> ApiResult<serde_json::Value> {
    let release = crate::releases::find(state, &promotion.release_id).await?;
    let env = crate::environments::find(state, &promotion.environment_id).await?;
    let approvals = crate::promotions::approvals(state, &promotion.id).await?;
    let previous = match &env.after {
        None => serde_json::Value::Null,
        Some(previous_env) => {
            // The latest deployment of this release there, whatever its status: the gate
            // says "pending" while it runs and "failed" when it failed.
            let row: Option<(String, i64)> = sqlx::query_as(
                "SELECT d.status, COALESCE(d.finished_at, d.updated_at) FROM deployments d
                 JOIN environments e ON e.id = d.environment_id
                 WHERE e.name = $1 AND d.release_id = $2 AND d.kind = 'deploy'
                 ORDER BY d.created_at DESC LIMIT 1",
            )
            .bind(previous_env)
            .bind(&release.id)
            .fetch_optional(&state.db)
            .await?;
            match row {
                Some((status, finished_at)) => serde_json::json!({
                    "release": release.name, "status": status, "finished_at": rfc3339(finished_at),
                }),
                None => serde_json::Value::Null,
            }
        }
    };
    Ok(serde_json::json!({
        "promotion": {
            "id": promotion.id,
            "requested_by": promotion.requested_by,
            "requested_at": rfc3339(promotion.created_at),
            "reason": promotion.reason,
        },
        "release": {
            "name": release.name,
            "created_by": release.created_by,
            "labels": release.labels,
            "components": release.components,
        },
        "environment": {
            "name": env.name,
            "previous": env.after,
            "required_approvals": env.required_approvals,
            "separation_of_duties": env.separation_of_duties,
            "freeze_windows": env.settings.freeze_windows,
            "schedule_windows": env.settings.schedule_windows,
        },
        "approvals": approvals.iter().map(|a| serde_json::json!({
            "user": a.user, "at": a.at, "comment": a.comment, "decision": a.decision,
        })).collect::<Vec<_>>(),
        "previous_environment_deployment": previous,
        "overrides": {
            "freeze_override_by": if promotion.override_freeze { Some(&promotion.requested_by) } else { None },
        },
        "now": rfc3339(now_ms()),
    }))
}

/// Whether `user`'s approval of `promotion` would break separation of duties: the same rule
/// the gate applies, asked before an approval is recorded, so that a self-approval is never on
/// record as one.
pub async fn separation_of_duties_violation(
    state: &AppState,
    promotion: &PromotionRecord,
    user: &str,
) -> ApiResult<Option<stella_policy::SeparationOfDutiesViolation>> {
    let input: stella_policy::PromotionInput =
        serde_json::from_value(input(state, promotion).await?)
            .map_err(|e| ApiError::Internal(format!("gate input document invalid: {e}")))?;
    Ok(input.separation_of_duties_violation(user))
}

/// Evaluates the gates for `promotion` and stores the decision record.
pub async fn decide(state: &AppState, promotion: &PromotionRecord) -> ApiResult<DecisionView> {
    let env = crate::environments::find(state, &promotion.environment_id).await?;
    let input_json = input(state, promotion).await?;
    let decision = evaluate(&input_json, &env.settings.policies)?;
    let id = new_id("dec");
    let at = now_ms();
    let gates_json =
        serde_json::to_string(&decision.gates).map_err(|e| ApiError::Internal(e.to_string()))?;
    let input_text =
        serde_json::to_string(&input_json).map_err(|e| ApiError::Internal(e.to_string()))?;
    sqlx::query(
        "INSERT INTO decisions (id, promotion_id, at, outcome, gates, input_hash, policy_digest,
             input)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(&promotion.id)
    .bind(at)
    .bind(&decision.outcome)
    .bind(&gates_json)
    .bind(&decision.input_hash)
    .bind(&decision.policy_digest)
    .bind(&input_text)
    .execute(&state.db)
    .await?;
    tracing::info!(promotion = %promotion.id, decision = %id, outcome = %decision.outcome, "gates decided");
    Ok(DecisionView {
        id,
        at: rfc3339(at),
        ..decision
    })
}

/// Checks a Rego module at the time it is set, so a broken policy is refused there rather
/// than failing every promotion closed.
pub fn validate_policy(name: &str, module: &str) -> ApiResult<()> {
    if module.is_empty() {
        return Ok(());
    }
    policy_set(
        &[(name.to_string(), module.to_string())]
            .into_iter()
            .collect(),
    )
    .map(|_| ())
}

/// Every decision of a promotion, oldest first.
pub async fn decisions(state: &AppState, promotion_id: &str) -> ApiResult<Vec<DecisionView>> {
    let rows: Vec<(String, i64, String, String, String, String)> = sqlx::query_as(
        "SELECT id, at, outcome, gates, input_hash, policy_digest FROM decisions
         WHERE promotion_id = $1 ORDER BY at, id",
    )
    .bind(promotion_id)
    .fetch_all(&state.db)
    .await?;
    rows.into_iter()
        .map(|(id, at, outcome, gates, input_hash, policy_digest)| {
            Ok(DecisionView {
                id,
                at: rfc3339(at),
                outcome,
                gates: serde_json::from_str(&gates)
                    .map_err(|e| ApiError::Internal(format!("decision gates unreadable: {e}")))?,
                input_hash,
                policy_digest,
            })
        })
        .collect()
}

pub async fn latest_input(
    state: &AppState,
    promotion_id: &str,
) -> ApiResult<Option<serde_json::Value>> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT input FROM decisions WHERE promotion_id = $1 ORDER BY at DESC, id DESC LIMIT 1",
    )
    .bind(promotion_id)
    .fetch_optional(&state.db)
    .await?;
    row.map(|(text,)| {
        serde_json::from_str(&text)
            .map_err(|e| ApiError::Internal(format!("decision input unreadable: {e}")))
    })
    .transpose()
}

/// A person's account of a decision: the outcome, then every gate that did not pass, then the
/// ones that did.
pub fn explain(d: &DecisionView, status: &str, message: &str) -> String {
    let mut lines = vec![match d.outcome.as_str() {
        "allowed" => format!("allowed at {}: every gate passed", d.at),
        "blocked" => format!(
            "blocked at {}: a gate failed (approvals cannot override it)",
            d.at
        ),
        _ => format!("pending at {}: waiting on a gate", d.at),
    }];
    let mut gates: Vec<&GateView> = d.gates.iter().collect();
    gates.sort_by_key(|g| match g.status.as_str() {
        "failed" => 0,
        "pending" => 1,
        _ => 2,
    });
    for g in gates {
        lines.push(format!("  {:<7} {}: {}", g.status, g.gate, g.reason));
    }
    if !message.is_empty() {
        lines.push(format!("promotion {status}: {message}"));
    }
    lines.join("\n")
}

/// Runs `stella-policy` over the input document. The document is handed over as JSON, the
/// same form Rego sees and the decision record stores, so the three cannot drift apart.
fn evaluate(
    input: &serde_json::Value,
    modules: &std::collections::BTreeMap<String, String>,
) -> ApiResult<DecisionView> {
    let input: stella_policy::PromotionInput = serde_json::from_value(input.clone())
        .map_err(|e| ApiError::Internal(format!("gate input document invalid: {e}")))?;
    // A broken module is not an error here: the policy gate fails closed and says why.
    let policies = stella_policy::PolicySet::new(modules.clone());
    let decision = stella_policy::evaluate(&input, &policies)
        .map_err(|e| ApiError::Internal(format!("gates could not be evaluated: {e}")))?;
    let gates = decision
        .gates
        .iter()
        .map(|g| {
            let v = serde_json::to_value(g).map_err(|e| ApiError::Internal(e.to_string()))?;
            let field = |name: &str| {
                v.get(name)
                    .and_then(|x| x.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            Ok(GateView {
                gate: field("gate"),
                status: field("status"),
                reason: field("reason"),
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(DecisionView {
        id: String::new(),
        at: String::new(),
        outcome: decision.outcome.as_str().to_string(),
        gates,
        input_hash: decision.input_hash,
        policy_digest: decision.policy_digest,
    })
}

fn policy_set(modules: &std::collections::BTreeMap<String, String>) -> ApiResult<()> {
    stella_policy::PolicySet::new(modules.clone())
        .check()
        .map_err(|e| ApiError::Unprocessable(format!("policy refused: {e}")))
}
