//! Approvals, separation of duties and the manual go. All three read the same recorded
//! approvals; an approval that breaks separation of duties counts for none of them.

use std::collections::BTreeSet;

use crate::gates::{Gate, GateResult};
use crate::input::{Approval, ApprovalDecision, PromotionInput};

/// Distinct users who approved without breaking separation of duties, in first-approval order.
fn counted_approvers(input: &PromotionInput) -> Vec<&str> {
    let mut seen = BTreeSet::new();
    input
        .approvals
        .iter()
        .filter(|a| a.decision == ApprovalDecision::Approve)
        .filter(|a| input.separation_of_duties_violation(&a.user).is_none())
        .filter(|a| seen.insert(a.user.as_str()))
        .map(|a| a.user.as_str())
        .collect()
}

fn rejections(approvals: &[Approval]) -> Vec<String> {
    approvals
        .iter()
        .filter(|a| a.decision == ApprovalDecision::Reject)
        .map(|a| {
            if a.comment.is_empty() {
                format!("rejected by {}", a.user)
            } else {
                format!("rejected by {}: {}", a.user, a.comment)
            }
        })
        .collect()
}

/// N of M: pending until `required_approvals` distinct users approved; any rejection fails.
pub(crate) fn approvals(input: &PromotionInput) -> GateResult {
    let rejected = rejections(&input.approvals);
    if !rejected.is_empty() {
        return GateResult::failed(Gate::Approvals, rejected.join("; "));
    }
    let required = usize::try_from(input.environment.required_approvals).unwrap_or(usize::MAX);
    if required == 0 {
        return GateResult::passed(Gate::Approvals, "no approvals required");
    }
    let approvers = counted_approvers(input);
    let got = approvers.len();
    let by = if approvers.is_empty() {
        String::new()
    } else {
        format!(" ({})", approvers.join(", "))
    };
    if got >= required {
        GateResult::passed(
            Gate::Approvals,
            format!("{got} of {required} required approvals{by}"),
        )
    } else {
        GateResult::pending(
            Gate::Approvals,
            format!(
                "{got} of {required} required approvals{by}; waiting for {} more",
                required - got
            ),
        )
    }
}

/// Fails as soon as an approval by the requester or by the release's creator is recorded:
/// such an approval is not counted, and the attempt itself is refused on the record.
pub(crate) fn separation_of_duties(input: &PromotionInput) -> GateResult {
    if !input.environment.separation_of_duties {
        return GateResult::passed(
            Gate::SeparationOfDuties,
            format!(
                "separation of duties is not required in {}",
                input.environment.name
            ),
        );
    }
    let mut seen = BTreeSet::new();
    let violations: Vec<String> = input
        .approvals
        .iter()
        .filter(|a| a.decision == ApprovalDecision::Approve)
        .filter_map(|a| input.separation_of_duties_violation(&a.user))
        .map(|v| v.to_string())
        .filter(|v| seen.insert(v.clone()))
        .collect();
    if violations.is_empty() {
        GateResult::passed(
            Gate::SeparationOfDuties,
            format!(
                "no approval is by the requester ({}) or the release creator ({})",
                input.promotion.requested_by, input.release.created_by
            ),
        )
    } else {
        GateResult::failed(
            Gate::SeparationOfDuties,
            format!("separation of duties: {}", violations.join("; ")),
        )
    }
}

/// One of the environment's manual approvers must give a go (approve); a rejection by one of
/// them fails.
pub(crate) fn manual(input: &PromotionInput) -> GateResult {
    let named = &input.environment.manual_approvers;
    if named.is_empty() {
        return GateResult::passed(Gate::Manual, "no manual go required");
    }
    let is_named = |user: &str| named.iter().any(|n| n == user);
    let vetoes: Vec<&Approval> = input
        .approvals
        .iter()
        .filter(|a| a.decision == ApprovalDecision::Reject && is_named(&a.user))
        .collect();
    if !vetoes.is_empty() {
        let who: Vec<&str> = vetoes.iter().map(|a| a.user.as_str()).collect();
        return GateResult::failed(
            Gate::Manual,
            format!("manual go refused by {}", who.join(", ")),
        );
    }
    match counted_approvers(input).into_iter().find(|u| is_named(u)) {
        Some(user) => GateResult::passed(Gate::Manual, format!("manual go given by {user}")),
        None => GateResult::pending(
            Gate::Manual,
            format!("waiting for a manual go from one of: {}", named.join(", ")),
        ),
    }
}
