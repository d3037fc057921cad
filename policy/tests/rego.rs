//! The policy gate: Rego modules evaluated against the input document, failing closed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{approve, gate, input};
use stella_policy::{
    Decision, Gate, GateResult, GateStatus, Outcome, PolicyError, PolicySet, PromotionInput,
    evaluate,
};

fn policies(modules: &[(&str, &str)]) -> PolicySet {
    PolicySet::new(
        modules
            .iter()
            .map(|(name, source)| (name.to_string(), source.to_string()))
            .collect::<BTreeMap<_, _>>(),
    )
}

fn approved() -> PromotionInput {
    let mut input = input();
    approve(&mut input, "alice");
    approve(&mut input, "bob");
    input
}

fn decide_with(input: &PromotionInput, set: &PolicySet) -> (Decision, GateResult) {
    let decision = evaluate(input, set).unwrap();
    let policy = gate(&decision, Gate::Policy);
    (decision, policy)
}

const RISKY_LABEL: &str = r#"
package stella.promotion

deny contains msg if {
    input.environment.name == "prod"
    input.release.labels.risk == "high"
    msg := sprintf("release %s is labelled risk=high and cannot go to prod", [input.release.name])
}
"#;

#[test]
fn a_policy_denies_on_a_release_label_whatever_the_approvals_say() {
    let set = policies(&[("labels.rego", RISKY_LABEL)]);
    let mut input = approved();
    input
        .release
        .labels
        .insert("risk".to_string(), "high".to_string());
    let (decision, policy) = decide_with(&input, &set);
    assert_eq!(decision.outcome, Outcome::Blocked);
    assert_eq!(policy.status, GateStatus::Failed);
    assert_eq!(
        policy.reason,
        "denied by policy: release shop-1.4.0 is labelled risk=high and cannot go to prod"
    );

    input
        .release
        .labels
        .insert("risk".to_string(), "low".to_string());
    let (decision, policy) = decide_with(&input, &set);
    assert_eq!(decision.outcome, Outcome::Allowed, "{}", decision.explain());
    assert_eq!(policy.status, GateStatus::Passed);
    assert_eq!(policy.reason, "policy: nothing denied");
}

#[test]
fn every_deny_message_is_in_the_reason() {
    let set = policies(&[(
        "many.rego",
        r#"
package stella.promotion

deny contains "no change ticket" if not input.release.labels.ticket
deny contains sprintf("component %s is not from registry.local", [c.name]) if {
    some c in input.release.components
    not startswith(c.image, "registry.local/")
}
"#,
    )]);
    let mut input = approved();
    input.release.components[0].image = "docker.io/shop/api".to_string();
    let (_, policy) = decide_with(&input, &set);
    assert_eq!(policy.status, GateStatus::Failed);
    assert!(
        policy.reason.contains("no change ticket"),
        "{}",
        policy.reason
    );
    assert!(
        policy
            .reason
            .contains("component api is not from registry.local"),
        "{}",
        policy.reason
    );
}

#[test]
fn allow_must_be_true_when_declared() {
    let source = r#"
package stella.promotion

default allow := false

allow if count(input.approvals) >= 2
"#;
    let set = policies(&[("allow.rego", source)]);
    let (decision, policy) = decide_with(&approved(), &set);
    assert_eq!(decision.outcome, Outcome::Allowed, "{}", decision.explain());
    assert_eq!(policy.reason, "policy: allow is true");

    let mut one = input();
    approve(&mut one, "alice");
    let (_, policy) = decide_with(&one, &set);
    assert_eq!(policy.status, GateStatus::Failed);
    assert_eq!(policy.reason, "data.stella.promotion.allow is false");
}

#[test]
fn deny_and_allow_must_both_agree() {
    let source = r#"
package stella.promotion

allow := true

deny contains "weekend" if input.environment.name == "prod"
"#;
    let (_, policy) = decide_with(&approved(), &policies(&[("both.rego", source)]));
    assert_eq!(policy.status, GateStatus::Failed);
    assert_eq!(policy.reason, "denied by policy: weekend");
}

#[test]
fn a_syntax_error_fails_closed_and_names_the_module() {
    let broken =
        "package stella.promotion\n\ndeny contains msg if {\n    input.release.name ==\n}\n";
    let set = policies(&[("labels.rego", RISKY_LABEL), ("broken.rego", broken)]);
    let (decision, policy) = decide_with(&approved(), &set);
    assert_eq!(decision.outcome, Outcome::Blocked);
    assert_eq!(policy.status, GateStatus::Failed);
    assert!(
        policy
            .reason
            .starts_with("Rego module \"broken.rego\": does not parse:"),
        "{}",
        policy.reason
    );
    assert!(policy.reason.contains("broken.rego:5"), "{}", policy.reason);

    let err = set.check().unwrap_err();
    assert!(
        matches!(&err, PolicyError::InvalidModule { name, .. } if name == "broken.rego"),
        "{err}"
    );
}

#[test]
fn an_evaluation_error_fails_closed() {
    let source = r#"
package stella.promotion

deny contains msg if {
    ratio := count(input.approvals) / 0
    msg := sprintf("%v", [ratio])
}
"#;
    let (_, policy) = decide_with(&approved(), &policies(&[("div.rego", source)]));
    assert_eq!(policy.status, GateStatus::Failed);
    assert!(
        policy
            .reason
            .starts_with("evaluating data.stella.promotion.deny:"),
        "{}",
        policy.reason
    );
    assert!(
        policy.reason.contains("divide by zero"),
        "{}",
        policy.reason
    );
}

#[test]
fn running_past_the_time_limit_fails_closed() {
    // Ten billion iterations that can never produce a message: only the limit ends it.
    let source = r#"
package stella.promotion

deny contains "never" if {
    some i in numbers.range(1, 10000)
    some j in numbers.range(1, 10000)
    some k in numbers.range(1, 100)
    i + j + k < 0
}
"#;
    let set = policies(&[("slow.rego", source)]).with_timeout(Duration::from_millis(50));
    let (decision, policy) = decide_with(&approved(), &set);
    assert_eq!(decision.outcome, Outcome::Blocked);
    assert!(
        policy.reason.contains("exceeded time limit"),
        "{}",
        policy.reason
    );
}

#[test]
fn undefined_results_fail_closed() {
    // `allow` without a default is undefined when its body does not hold.
    let source = "package stella.promotion\n\nallow if input.release.labels.approved_by_cab\n";
    let (_, policy) = decide_with(&approved(), &policies(&[("cab.rego", source)]));
    assert_eq!(policy.status, GateStatus::Failed);
    assert_eq!(
        policy.reason,
        "data.stella.promotion.allow is undefined (fail closed)"
    );

    let source = "package stella.promotion\n\ndeny := [\"x\"] if input.release.labels.nope\n";
    let (_, policy) = decide_with(&approved(), &policies(&[("deny.rego", source)]));
    assert_eq!(
        policy.reason,
        "data.stella.promotion.deny is undefined (fail closed)"
    );
}

#[test]
fn results_of_the_wrong_type_fail_closed() {
    let source = "package stella.promotion\n\ndeny := true\n";
    let (_, policy) = decide_with(&approved(), &policies(&[("bool.rego", source)]));
    assert_eq!(policy.status, GateStatus::Failed);
    assert!(
        policy
            .reason
            .contains("must be a set of messages, not true"),
        "{}",
        policy.reason
    );

    let source = "package stella.promotion\n\nallow := \"yes\"\n";
    let (_, policy) = decide_with(&approved(), &policies(&[("str.rego", source)]));
    assert!(
        policy.reason.contains("must be a boolean"),
        "{}",
        policy.reason
    );
}

#[test]
fn modules_that_declare_neither_deny_nor_allow_fail_closed() {
    let source = "package stella.other\n\ndeny contains \"x\" if true\n";
    let set = policies(&[("elsewhere.rego", source)]);
    let (_, policy) = decide_with(&approved(), &set);
    assert_eq!(policy.status, GateStatus::Failed);
    assert_eq!(
        policy.reason,
        "no module declares data.stella.promotion.deny or data.stella.promotion.allow (fail closed)"
    );
    assert!(set.check().is_err());
}

#[test]
fn helper_modules_in_other_packages_may_be_imported() {
    let helpers = r#"
package stella.lib

high_risk(release) if release.labels.risk == "high"
"#;
    let main = r#"
package stella.promotion

import data.stella.lib

deny contains "high risk" if lib.high_risk(input.release)
"#;
    let set = policies(&[("lib.rego", helpers), ("main.rego", main)]);
    set.check().unwrap();
    let mut input = approved();
    input
        .release
        .labels
        .insert("risk".to_string(), "high".to_string());
    let (_, policy) = decide_with(&input, &set);
    assert_eq!(policy.reason, "denied by policy: high risk");
}

#[test]
fn no_policies_pass_and_check_accepts_a_good_set() {
    let (_, policy) = decide_with(&approved(), &PolicySet::default());
    assert_eq!(policy.status, GateStatus::Passed);
    assert_eq!(policy.reason, "no Rego policies");
    policies(&[("labels.rego", RISKY_LABEL)]).check().unwrap();
}

#[test]
fn the_policy_digest_names_the_modules_exactly() {
    let a = policies(&[("labels.rego", RISKY_LABEL)]);
    let same = policies(&[("labels.rego", RISKY_LABEL)]).with_timeout(Duration::from_secs(9));
    let edited = policies(&[("labels.rego", &RISKY_LABEL.replace("high", "severe"))]);
    let renamed = policies(&[("risk.rego", RISKY_LABEL)]);
    let digest = a.digest().unwrap();
    assert!(digest.starts_with("sha256:") && digest.len() == 7 + 64);
    assert_eq!(digest, same.digest().unwrap());
    assert_ne!(digest, edited.digest().unwrap());
    assert_ne!(digest, renamed.digest().unwrap());
    assert_ne!(digest, PolicySet::default().digest().unwrap());
    assert_eq!(evaluate(&approved(), &a).unwrap().policy_digest, digest);
}

#[test]
fn policies_see_the_documented_input_shape() {
    // Written against docs/policy.md: if a field moves or changes shape, this denies.
    let source = r#"
package stella.promotion

deny contains sprintf("unexpected %s", [name]) if {
    some name, ok in {
        "promotion.requested_by": input.promotion.requested_by == "rita",
        "promotion.requested_at": input.promotion.requested_at == "2026-06-01T10:00:00Z",
        "release.created_by": input.release.created_by == "carl",
        "release.components": input.release.components[0] == {"name": "api", "image": "registry.local/shop/api", "digest": concat("", ["sha256:", substring(input.release.components[0].digest, 7, 64)])},
        "release.labels": input.release.labels == {"team": "shop"},
        "environment.previous": input.environment.previous == "stage",
        "environment.required_approvals": input.environment.required_approvals == 2,
        "environment.separation_of_duties": input.environment.separation_of_duties == true,
        "environment.freeze_windows": input.environment.freeze_windows == [],
        "environment.schedule_windows": input.environment.schedule_windows == [],
        "environment.manual_approvers": input.environment.manual_approvers == [],
        "approvals": [a.decision | some a in input.approvals] == ["approve", "approve"],
        "previous_environment_deployment": input.previous_environment_deployment.status == "succeeded",
        "overrides.freeze_override_by": input.overrides.freeze_override_by == null,
        "now": input.now == "2026-06-01T10:05:00Z",
    }
    not ok
}
"#;
    let set = policies(&[("shape.rego", source)]);
    let (_, policy) = decide_with(&approved(), &set);
    assert_eq!(policy.status, GateStatus::Passed, "{}", policy.reason);
    let mut moved = approved();
    moved.now = common::at("2026-06-01T10:06:00Z");
    let (_, policy) = decide_with(&moved, &set);
    assert_eq!(policy.reason, "denied by policy: unexpected now");
}
