//! Each gate's passed, failed and pending cases, and how they combine into the outcome.

mod common;

use common::{approve, at, decide, gate, input, reject};
use stella_policy::{
    FreezeWindow, Gate, GateStatus, Outcome, ScheduleWindow, SeparationOfDutiesViolation,
    TimeOfDay, Weekday,
};

fn holiday(override_users: &[&str]) -> FreezeWindow {
    FreezeWindow {
        start: at("2026-05-31T00:00:00Z"),
        end: at("2026-12-27T00:00:00Z"),
        reason: "holiday".to_string(),
        override_users: override_users.iter().map(ToString::to_string).collect(),
    }
}

fn approved_by_two() -> stella_policy::PromotionInput {
    let mut input = input();
    approve(&mut input, "alice");
    approve(&mut input, "bob");
    input
}

#[test]
fn everything_in_order_is_allowed_and_every_gate_is_reported() {
    let decision = decide(&approved_by_two());
    assert_eq!(decision.outcome, Outcome::Allowed, "{}", decision.explain());
    let gates: Vec<Gate> = decision.gates.iter().map(|g| g.gate).collect();
    assert_eq!(
        gates,
        [
            Gate::FreezeWindow,
            Gate::ScheduleWindow,
            Gate::Dependency,
            Gate::SeparationOfDuties,
            Gate::Approvals,
            Gate::Manual,
            Gate::Policy
        ]
    );
    assert!(
        decision
            .summary()
            .starts_with("allowed: all 7 gates passed")
    );
}

// ---- freeze window

#[test]
fn a_freeze_window_blocks_whatever_the_approvals_say() {
    let mut input = approved_by_two();
    input.environment.freeze_windows = vec![holiday(&["olga"])];
    let decision = decide(&input);
    assert_eq!(decision.outcome, Outcome::Blocked);
    let freeze = gate(&decision, Gate::FreezeWindow);
    assert_eq!(freeze.status, GateStatus::Failed);
    assert_eq!(
        freeze.reason,
        "freeze window 'holiday' until 2026-12-27T00:00:00Z (override: not requested)"
    );
    assert_eq!(gate(&decision, Gate::Approvals).status, GateStatus::Passed);
    assert!(
        decision.explain().starts_with(
            "blocked: freeze window 'holiday' until 2026-12-27T00:00:00Z (override: not requested)\n"
        ),
        "{}",
        decision.explain()
    );
}

#[test]
fn an_allowed_user_overrides_a_freeze_window_and_the_record_names_them() {
    let mut input = approved_by_two();
    input.environment.freeze_windows = vec![holiday(&["olga", "rita"])];
    input.overrides.freeze_override_by = Some("olga".to_string());
    let decision = decide(&input);
    assert_eq!(decision.outcome, Outcome::Allowed, "{}", decision.explain());
    let freeze = gate(&decision, Gate::FreezeWindow);
    assert_eq!(freeze.status, GateStatus::Passed);
    assert_eq!(
        freeze.reason,
        "freeze window 'holiday' until 2026-12-27T00:00:00Z overridden by olga"
    );
}

#[test]
fn a_user_not_allowed_to_override_cannot() {
    let mut input = approved_by_two();
    input.environment.freeze_windows = vec![holiday(&["olga"])];
    input.overrides.freeze_override_by = Some("mallory".to_string());
    let decision = decide(&input);
    assert_eq!(decision.outcome, Outcome::Blocked);
    let freeze = gate(&decision, Gate::FreezeWindow);
    assert_eq!(freeze.status, GateStatus::Failed);
    assert!(
        freeze
            .reason
            .contains("requested by mallory, who is not allowed; allowed: olga"),
        "{}",
        freeze.reason
    );
}

#[test]
fn a_window_without_override_users_cannot_be_overridden() {
    let mut input = approved_by_two();
    input.environment.freeze_windows = vec![holiday(&[])];
    input.overrides.freeze_override_by = Some("rita".to_string());
    let freeze = gate(&decide(&input), Gate::FreezeWindow);
    assert_eq!(freeze.status, GateStatus::Failed);
    assert!(
        freeze.reason.contains("nobody may override"),
        "{}",
        freeze.reason
    );
}

#[test]
fn being_an_override_user_is_not_an_override_until_one_is_requested() {
    let mut input = approved_by_two();
    input.environment.freeze_windows = vec![holiday(&["rita"])];
    let freeze = gate(&decide(&input), Gate::FreezeWindow);
    assert_eq!(freeze.status, GateStatus::Failed);
    assert!(freeze.reason.ends_with("(override: not requested)"));
}

#[test]
fn every_active_window_must_be_overridden() {
    let mut input = approved_by_two();
    let mut release_freeze = holiday(&["mike"]);
    release_freeze.reason = "release freeze".to_string();
    input.environment.freeze_windows = vec![holiday(&["olga"]), release_freeze];
    input.overrides.freeze_override_by = Some("olga".to_string());
    let freeze = gate(&decide(&input), Gate::FreezeWindow);
    assert_eq!(freeze.status, GateStatus::Failed);
    assert!(
        freeze.reason.contains("'release freeze'"),
        "{}",
        freeze.reason
    );
    assert!(!freeze.reason.contains("'holiday'"), "{}", freeze.reason);
}

#[test]
fn a_freeze_window_covers_its_start_and_not_its_end() {
    let mut input = approved_by_two();
    input.environment.freeze_windows = vec![holiday(&[])];
    input.now = at("2026-05-31T00:00:00Z");
    assert_eq!(
        gate(&decide(&input), Gate::FreezeWindow).status,
        GateStatus::Failed
    );
    input.now = at("2026-12-27T00:00:00Z");
    assert_eq!(
        gate(&decide(&input), Gate::FreezeWindow).status,
        GateStatus::Passed
    );
    input.now = at("2026-05-30T23:59:59Z");
    assert_eq!(
        gate(&decide(&input), Gate::FreezeWindow).status,
        GateStatus::Passed
    );
}

// ---- schedule window

fn office_hours() -> ScheduleWindow {
    ScheduleWindow {
        days: vec![
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri,
        ],
        start: "09:00".parse().unwrap(),
        end: "17:00".parse().unwrap(),
    }
}

#[test]
fn no_schedule_windows_means_any_time() {
    let mut input = approved_by_two();
    input.now = at("2026-06-06T03:00:00Z");
    assert_eq!(
        gate(&decide(&input), Gate::ScheduleWindow).status,
        GateStatus::Passed
    );
}

#[test]
fn inside_a_schedule_window_passes_and_outside_fails() {
    let mut input = approved_by_two();
    input.environment.schedule_windows = vec![office_hours()];
    let inside = gate(&decide(&input), Gate::ScheduleWindow);
    assert_eq!(inside.status, GateStatus::Passed);
    assert!(
        inside
            .reason
            .contains("mon,tue,wed,thu,fri 09:00-17:00 UTC")
    );

    input.now = at("2026-06-06T10:05:00Z");
    let decision = decide(&input);
    assert_eq!(decision.outcome, Outcome::Blocked);
    let saturday = gate(&decision, Gate::ScheduleWindow);
    assert_eq!(saturday.status, GateStatus::Failed);
    assert_eq!(
        saturday.reason,
        "2026-06-06T10:05:00Z (sat) is outside every schedule window: \
         mon,tue,wed,thu,fri 09:00-17:00 UTC"
    );

    input.now = at("2026-06-01T17:00:00Z");
    assert_eq!(
        gate(&decide(&input), Gate::ScheduleWindow).status,
        GateStatus::Failed
    );
    input.now = at("2026-06-01T08:59:59Z");
    assert_eq!(
        gate(&decide(&input), Gate::ScheduleWindow).status,
        GateStatus::Failed
    );
}

#[test]
fn a_window_ending_at_24_00_covers_the_last_second_of_the_day() {
    let mut input = approved_by_two();
    input.environment.schedule_windows = vec![ScheduleWindow {
        days: vec![Weekday::Mon],
        start: "22:00".parse().unwrap(),
        end: TimeOfDay::END_OF_DAY,
    }];
    input.now = at("2026-06-01T23:59:59Z");
    assert_eq!(
        gate(&decide(&input), Gate::ScheduleWindow).status,
        GateStatus::Passed
    );
    input.now = at("2026-06-02T00:00:00Z");
    assert_eq!(
        gate(&decide(&input), Gate::ScheduleWindow).status,
        GateStatus::Failed
    );
}

#[test]
fn a_schedule_window_that_can_never_match_fails_the_gate_by_name() {
    let mut input = approved_by_two();
    let mut backwards = office_hours();
    backwards.start = "18:00".parse().unwrap();
    input.environment.schedule_windows = vec![office_hours(), backwards];
    let schedule = gate(&decide(&input), Gate::ScheduleWindow);
    assert_eq!(schedule.status, GateStatus::Failed);
    assert!(
        schedule
            .reason
            .contains("invalid schedule window 'mon,tue,wed,thu,fri 18:00-17:00 UTC'"),
        "{}",
        schedule.reason
    );
}

// ---- dependency

#[test]
fn the_first_environment_has_no_dependency() {
    let mut input = approved_by_two();
    input.environment.previous = None;
    input.previous_environment_deployment = None;
    let dependency = gate(&decide(&input), Gate::Dependency);
    assert_eq!(dependency.status, GateStatus::Passed);
    assert_eq!(dependency.reason, "prod is the first environment");
}

#[test]
fn a_release_never_deployed_to_the_previous_environment_is_blocked() {
    let mut input = approved_by_two();
    input.previous_environment_deployment = None;
    let decision = decide(&input);
    assert_eq!(decision.outcome, Outcome::Blocked);
    let dependency = gate(&decision, Gate::Dependency);
    assert_eq!(
        dependency.reason,
        "release shop-1.4.0 has not been deployed to stage"
    );
}

#[test]
fn a_deployment_still_running_in_the_previous_environment_keeps_the_gate_pending() {
    let mut input = approved_by_two();
    if let Some(deployment) = input.previous_environment_deployment.as_mut() {
        deployment.status = "running".to_string();
        deployment.finished_at = None;
    }
    let decision = decide(&input);
    assert_eq!(decision.outcome, Outcome::Pending);
    assert_eq!(
        gate(&decision, Gate::Dependency).status,
        GateStatus::Pending
    );
    assert!(
        decision
            .summary()
            .starts_with("pending: release shop-1.4.0 is still deploying")
    );
}

#[test]
fn a_failed_or_foreign_deployment_fails_the_dependency() {
    let mut input = approved_by_two();
    if let Some(deployment) = input.previous_environment_deployment.as_mut() {
        deployment.status = "failed".to_string();
    }
    let failed = gate(&decide(&input), Gate::Dependency);
    assert_eq!(failed.status, GateStatus::Failed);
    assert!(failed.reason.contains("ended failed"), "{}", failed.reason);

    let mut input = approved_by_two();
    if let Some(deployment) = input.previous_environment_deployment.as_mut() {
        deployment.release = "shop-1.3.9".to_string();
    }
    let foreign = gate(&decide(&input), Gate::Dependency);
    assert_eq!(foreign.status, GateStatus::Failed);
    assert!(
        foreign
            .reason
            .contains("is of release shop-1.3.9, not shop-1.4.0")
    );
}

// ---- approvals

#[test]
fn no_required_approvals_passes_without_any() {
    let mut input = input();
    input.environment.required_approvals = 0;
    let approvals = gate(&decide(&input), Gate::Approvals);
    assert_eq!(approvals.status, GateStatus::Passed);
    assert_eq!(decide(&input).outcome, Outcome::Allowed);
}

#[test]
fn approvals_stay_pending_until_n_distinct_users_approved() {
    let mut input = input();
    let none = decide(&input);
    assert_eq!(none.outcome, Outcome::Pending);
    assert_eq!(
        gate(&none, Gate::Approvals).reason,
        "0 of 2 required approvals; waiting for 2 more"
    );

    approve(&mut input, "alice");
    approve(&mut input, "alice");
    let one = decide(&input);
    assert_eq!(one.outcome, Outcome::Pending);
    assert_eq!(
        gate(&one, Gate::Approvals).reason,
        "1 of 2 required approvals (alice); waiting for 1 more"
    );

    approve(&mut input, "bob");
    let two = decide(&input);
    assert_eq!(two.outcome, Outcome::Allowed);
    assert_eq!(
        gate(&two, Gate::Approvals).reason,
        "2 of 2 required approvals (alice, bob)"
    );
}

#[test]
fn one_rejection_fails_the_approvals_whatever_the_count() {
    let mut input = approved_by_two();
    approve(&mut input, "dave");
    reject(&mut input, "erin", "load test not done");
    let decision = decide(&input);
    assert_eq!(decision.outcome, Outcome::Blocked);
    let approvals = gate(&decision, Gate::Approvals);
    assert_eq!(approvals.status, GateStatus::Failed);
    assert_eq!(approvals.reason, "rejected by erin: load test not done");
}

// ---- separation of duties

#[test]
fn the_requester_approving_their_own_promotion_is_refused() {
    let mut input = input();
    approve(&mut input, "alice");
    assert_eq!(
        input.separation_of_duties_violation("rita"),
        Some(SeparationOfDutiesViolation::Requester {
            user: "rita".to_string()
        })
    );
    approve(&mut input, "rita");
    let decision = decide(&input);
    assert_eq!(decision.outcome, Outcome::Blocked);
    let sod = gate(&decision, Gate::SeparationOfDuties);
    assert_eq!(sod.status, GateStatus::Failed);
    assert_eq!(
        sod.reason,
        "separation of duties: rita requested this promotion and cannot approve it"
    );
    // The violating approval is not counted either.
    assert_eq!(
        gate(&decision, Gate::Approvals).reason,
        "1 of 2 required approvals (alice); waiting for 1 more"
    );
}

#[test]
fn the_release_creator_approving_is_refused() {
    let mut input = approved_by_two();
    approve(&mut input, "carl");
    let decision = decide(&input);
    assert_eq!(decision.outcome, Outcome::Blocked);
    assert_eq!(
        gate(&decision, Gate::SeparationOfDuties).reason,
        "separation of duties: carl created release shop-1.4.0 and cannot approve its promotion"
    );
    assert_eq!(
        input
            .separation_of_duties_violation("carl")
            .map(|v| v.to_string()),
        Some("carl created release shop-1.4.0 and cannot approve its promotion".to_string())
    );
    assert_eq!(input.separation_of_duties_violation("alice"), None);
}

#[test]
fn without_separation_of_duties_a_self_approval_counts() {
    let mut input = input();
    input.environment.separation_of_duties = false;
    approve(&mut input, "rita");
    approve(&mut input, "carl");
    assert_eq!(input.separation_of_duties_violation("rita"), None);
    let decision = decide(&input);
    assert_eq!(decision.outcome, Outcome::Allowed, "{}", decision.explain());
    assert_eq!(
        gate(&decision, Gate::SeparationOfDuties).status,
        GateStatus::Passed
    );
}

// ---- manual go

#[test]
fn the_manual_gate_waits_for_a_named_users_go() {
    let mut input = approved_by_two();
    input.environment.manual_approvers = vec!["olga".to_string(), "rita".to_string()];
    let waiting = decide(&input);
    assert_eq!(waiting.outcome, Outcome::Pending);
    assert_eq!(
        gate(&waiting, Gate::Manual).reason,
        "waiting for a manual go from one of: olga, rita"
    );

    // rita is named, but she requested the promotion: her go does not count.
    approve(&mut input, "rita");
    assert_eq!(
        gate(&decide(&input), Gate::Manual).status,
        GateStatus::Pending
    );

    input.approvals.pop();
    approve(&mut input, "olga");
    let go = decide(&input);
    assert_eq!(go.outcome, Outcome::Allowed, "{}", go.explain());
    assert_eq!(gate(&go, Gate::Manual).reason, "manual go given by olga");
}

#[test]
fn a_named_user_refusing_the_go_fails_the_manual_gate() {
    let mut input = approved_by_two();
    input.environment.manual_approvers = vec!["olga".to_string()];
    reject(&mut input, "olga", "");
    let manual = gate(&decide(&input), Gate::Manual);
    assert_eq!(manual.status, GateStatus::Failed);
    assert_eq!(manual.reason, "manual go refused by olga");
}

#[test]
fn no_manual_approvers_means_no_manual_gate() {
    let manual = gate(&decide(&approved_by_two()), Gate::Manual);
    assert_eq!(manual.status, GateStatus::Passed);
}

// ---- outcome

#[test]
fn a_failure_outranks_a_pending_gate() {
    let mut input = input();
    input.environment.freeze_windows = vec![holiday(&[])];
    let decision = decide(&input);
    assert_eq!(gate(&decision, Gate::Approvals).status, GateStatus::Pending);
    assert_eq!(decision.outcome, Outcome::Blocked);
    assert!(
        !decision.summary().contains("waiting"),
        "{}",
        decision.summary()
    );
}

#[test]
fn explain_lists_every_gate_and_the_hashes() {
    let decision = decide(&input());
    let text = decision.explain();
    assert!(text.starts_with("pending: 0 of 2 required approvals; waiting for 2 more\n"));
    for g in &decision.gates {
        assert!(
            text.contains(&format!("{}: {}", g.gate, g.reason)),
            "{text}"
        );
    }
    assert!(text.contains(&decision.input_hash));
    assert!(text.contains(&decision.policy_digest));
}

#[test]
fn explain_reads_as_documented_in_docs_policy_md() {
    let mut input = approved_by_two();
    input.environment.freeze_windows = vec![holiday(&["olga"])];
    let decision = decide(&input);
    let expected = format!(
        "blocked: freeze window 'holiday' until 2026-12-27T00:00:00Z (override: not requested)
  failed  freeze_window: freeze window 'holiday' until 2026-12-27T00:00:00Z (override: not requested)
  passed  schedule_window: no schedule windows: promotions may happen at any time
  passed  dependency: release shop-1.4.0 was deployed to stage at 2026-05-30T16:00:00Z
  passed  separation_of_duties: no approval is by the requester (rita) or the release creator (carl)
  passed  approvals: 2 of 2 required approvals (alice, bob)
  passed  manual: no manual go required
  passed  policy: no Rego policies
input {}, policy {}
",
        decision.input_hash, decision.policy_digest
    );
    assert_eq!(decision.explain(), expected);
}

#[test]
fn a_repeated_violation_is_reported_once() {
    let mut input = input();
    approve(&mut input, "rita");
    approve(&mut input, "alice");
    approve(&mut input, "rita");
    assert_eq!(
        gate(&decide(&input), Gate::SeparationOfDuties).reason,
        "separation of duties: rita requested this promotion and cannot approve it"
    );
}
