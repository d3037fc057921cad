//! dev → stage → prod at the library level: what the control plane sees at each step when a
//! release moves through three environments with two approvers in prod.

mod common;

use common::{approve, at, decide, gate, input};
use stella_policy::{
    EnvironmentRules, Gate, GateStatus, Outcome, PreviousDeployment, PromotionInput,
};

fn environment(name: &str, previous: Option<&str>, approvals: u32) -> EnvironmentRules {
    EnvironmentRules {
        name: name.to_string(),
        previous: previous.map(ToString::to_string),
        required_approvals: approvals,
        separation_of_duties: approvals > 0,
        freeze_windows: vec![],
        schedule_windows: vec![],
        manual_approvers: vec![],
    }
}

fn promotion(id: &str, env: EnvironmentRules, deployed_before: Option<&str>) -> PromotionInput {
    let mut input = input();
    input.promotion.id = id.to_string();
    input.environment = env;
    input.previous_environment_deployment = deployed_before.map(|status| PreviousDeployment {
        release: input.release.name.clone(),
        status: status.to_string(),
        finished_at: Some(at("2026-06-01T09:00:00Z")),
    });
    input
}

#[test]
fn a_release_moves_dev_stage_prod_with_two_approvers_in_prod() {
    let dev = environment("dev", None, 0);
    let stage = environment("stage", Some("dev"), 1);
    let prod = environment("prod", Some("stage"), 2);

    // dev: nothing to wait for.
    let to_dev = promotion("prm-dev", dev, None);
    assert_eq!(decide(&to_dev).outcome, Outcome::Allowed);

    // prod before stage: blocked by the dependency, even fully approved.
    let mut too_early = promotion("prm-prod-0", prod.clone(), None);
    approve(&mut too_early, "alice");
    approve(&mut too_early, "bob");
    let blocked = decide(&too_early);
    assert_eq!(blocked.outcome, Outcome::Blocked);
    assert_eq!(
        blocked.summary(),
        "blocked: release shop-1.4.0 has not been deployed to stage"
    );

    // stage: pending until one approval, then allowed.
    let mut to_stage = promotion("prm-stage", stage, Some("succeeded"));
    assert_eq!(decide(&to_stage).outcome, Outcome::Pending);
    approve(&mut to_stage, "alice");
    assert_eq!(decide(&to_stage).outcome, Outcome::Allowed);

    // prod while stage still deploys: pending on the dependency.
    let mut to_prod = promotion("prm-prod", prod.clone(), Some("running"));
    let waiting = decide(&to_prod);
    assert_eq!(waiting.outcome, Outcome::Pending);
    assert_eq!(gate(&waiting, Gate::Dependency).status, GateStatus::Pending);

    // stage succeeded; prod needs alice and bob.
    to_prod = promotion("prm-prod", prod, Some("succeeded"));
    approve(&mut to_prod, "alice");
    let one = decide(&to_prod);
    assert_eq!(one.outcome, Outcome::Pending);
    assert_eq!(
        one.summary(),
        "pending: 1 of 2 required approvals (alice); waiting for 1 more"
    );

    // The requester cannot be the second approver: the plane asks first…
    assert!(to_prod.separation_of_duties_violation("rita").is_some());
    // …and if the approval is recorded anyway, the gates refuse it.
    let mut self_approved = to_prod.clone();
    approve(&mut self_approved, "rita");
    assert_eq!(decide(&self_approved).outcome, Outcome::Blocked);

    approve(&mut to_prod, "bob");
    let allowed = decide(&to_prod);
    assert_eq!(allowed.outcome, Outcome::Allowed, "{}", allowed.explain());
    assert_eq!(
        gate(&allowed, Gate::Approvals).reason,
        "2 of 2 required approvals (alice, bob)"
    );

    // Each decision is tied to exactly what it saw.
    assert_ne!(one.input_hash, allowed.input_hash);
    assert_eq!(allowed.input_hash, to_prod.hash().unwrap());
}
