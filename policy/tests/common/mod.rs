//! A promotion of release `shop-1.4.0` (created by carl) into prod (after stage), requested
//! by rita on Monday 2026-06-01 at 10:00 UTC; tests change what they exercise.
#![allow(dead_code)]

use std::collections::BTreeMap;

use stella_policy::{
    Approval, ApprovalDecision, Decision, EnvironmentRules, Gate, GateResult, PolicySet,
    PreviousDeployment, PromotionInput, PromotionRequest, ReleaseComponent, ReleaseFacts,
    Timestamp, evaluate,
};

pub fn at(text: &str) -> Timestamp {
    text.parse().unwrap()
}

pub fn input() -> PromotionInput {
    PromotionInput {
        promotion: PromotionRequest {
            id: "prm-1".to_string(),
            requested_by: "rita".to_string(),
            requested_at: at("2026-06-01T10:00:00Z"),
            reason: "quarterly release".to_string(),
        },
        release: ReleaseFacts {
            name: "shop-1.4.0".to_string(),
            created_by: "carl".to_string(),
            labels: BTreeMap::from([("team".to_string(), "shop".to_string())]),
            components: vec![ReleaseComponent {
                name: "api".to_string(),
                image: "registry.local/shop/api".to_string(),
                digest: format!("sha256:{}", "ab".repeat(32)),
            }],
        },
        environment: EnvironmentRules {
            name: "prod".to_string(),
            previous: Some("stage".to_string()),
            required_approvals: 2,
            separation_of_duties: true,
            freeze_windows: vec![],
            schedule_windows: vec![],
            manual_approvers: vec![],
        },
        approvals: vec![],
        previous_environment_deployment: Some(PreviousDeployment {
            release: "shop-1.4.0".to_string(),
            status: "succeeded".to_string(),
            finished_at: Some(at("2026-05-30T16:00:00Z")),
        }),
        overrides: Default::default(),
        now: at("2026-06-01T10:05:00Z"),
    }
}

pub fn approve(input: &mut PromotionInput, user: &str) {
    input.approvals.push(Approval {
        user: user.to_string(),
        at: input.now,
        comment: String::new(),
        decision: ApprovalDecision::Approve,
    });
}

pub fn reject(input: &mut PromotionInput, user: &str, comment: &str) {
    input.approvals.push(Approval {
        user: user.to_string(),
        at: input.now,
        comment: comment.to_string(),
        decision: ApprovalDecision::Reject,
    });
}

pub fn decide(input: &PromotionInput) -> Decision {
    evaluate(input, &PolicySet::default()).unwrap()
}

pub fn gate(decision: &Decision, gate: Gate) -> GateResult {
    decision
        .gates
        .iter()
        .find(|g| g.gate == gate)
        .cloned()
        .unwrap_or_else(|| panic!("no {gate} gate in {decision:?}"))
}
