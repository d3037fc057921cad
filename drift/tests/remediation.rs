mod support;

use std::time::Duration;

use stella_drift::{
    BreakerState, Decision, Finding, IgnoreRules, PolicyError, ReconcileOutcome, RemediationError,
    RemediationMode, RemediationPolicy, Remediator, SuppressReason, detect,
};
use support::*;
use time::OffsetDateTime;

const MINUTE: Duration = Duration::from_secs(60);

fn at(minutes: u64) -> OffsetDateTime {
    t0() + MINUTE * minutes as u32
}

/// Findings of web-1 with its api container stopped.
fn stopped_api() -> Vec<Finding> {
    let mut observed = in_sync();
    observed.items[0] = managed("api", API_DIGEST, "exited");
    detect(Some(&desired()), &observed, &IgnoreRules::default(), t0()).unwrap()
}

/// Findings of web-1 with its worker running another digest.
fn changed_worker() -> Vec<Finding> {
    let mut observed = in_sync();
    observed.items[1] = managed("worker", OTHER_DIGEST, "running");
    detect(Some(&desired()), &observed, &IgnoreRules::default(), t0()).unwrap()
}

fn only_an_extra() -> Vec<Finding> {
    let mut observed = in_sync();
    observed.items.push(hand_started("debug-shell", &[]));
    detect(Some(&desired()), &observed, &IgnoreRules::default(), t0()).unwrap()
}

fn reconcile(max_per_hour: u32, threshold: u32, cooldown_minutes: u32) -> RemediationPolicy {
    RemediationPolicy::new(
        RemediationMode::Reconcile,
        max_per_hour,
        threshold,
        MINUTE * cooldown_minutes,
    )
    .unwrap()
}

fn reconcile_decision() -> Decision {
    Decision::Reconcile {
        target: "web-1".into(),
        release: "rel-7".into(),
        deployment_id: "dep-42".into(),
    }
}

fn failed(error: &str) -> ReconcileOutcome {
    ReconcileOutcome::Failed {
        error: error.into(),
    }
}

#[test]
fn notify_mode_never_reconciles() {
    let policy = RemediationPolicy::default();
    assert_eq!(policy.mode(), RemediationMode::Notify);
    let mut remediator = Remediator::new();
    for (minute, findings) in [stopped_api(), changed_worker(), stopped_api()]
        .into_iter()
        .enumerate()
    {
        let decision = remediator
            .decide(&policy, &desired(), &findings, at(minute as u64 * 90))
            .unwrap();
        assert_eq!(decision, Decision::Notify);
    }
    assert!(!remediator.reconcile_in_flight());
    assert_eq!(remediator, Remediator::new());
    assert_eq!(
        remediator
            .decide(&policy, &desired(), &[], at(500))
            .unwrap(),
        Decision::InSync
    );
}

#[test]
fn reconcile_mode_repairs_once_per_finding_set() {
    let policy = reconcile(10, 3, 15);
    let mut remediator = Remediator::new();
    let findings = stopped_api();

    assert_eq!(
        remediator
            .decide(&policy, &desired(), &findings, at(0))
            .unwrap(),
        reconcile_decision()
    );
    assert!(remediator.reconcile_in_flight());

    // Reports keep coming while the job runs: nothing is re-issued.
    for minute in [1, 2] {
        assert_eq!(
            remediator
                .decide(&policy, &desired(), &findings, at(minute))
                .unwrap(),
            Decision::Suppressed {
                reason: SuppressReason::InFlight {
                    since: at(0),
                    deployment_id: "dep-42".into()
                }
            }
        );
    }

    remediator
        .record_outcome(&policy, "web-1", ReconcileOutcome::Succeeded, at(3))
        .unwrap();
    assert!(!remediator.reconcile_in_flight());

    // The same drift still reported (the repair did not take, or a stale report): not again.
    assert_eq!(
        remediator
            .decide(&policy, &desired(), &findings, at(4))
            .unwrap(),
        Decision::Suppressed {
            reason: SuppressReason::AlreadyReconciled { at: at(3) }
        }
    );

    // Another set of findings is another repair.
    assert_eq!(
        remediator
            .decide(&policy, &desired(), &changed_worker(), at(5))
            .unwrap(),
        reconcile_decision()
    );
    remediator
        .record_outcome(&policy, "web-1", ReconcileOutcome::Succeeded, at(6))
        .unwrap();

    // Once the target was seen in sync, the first drift may be repaired again when it recurs.
    assert_eq!(
        remediator.decide(&policy, &desired(), &[], at(7)).unwrap(),
        Decision::InSync
    );
    assert_eq!(
        remediator
            .decide(&policy, &desired(), &findings, at(8))
            .unwrap(),
        reconcile_decision()
    );
}

#[test]
fn a_redeploy_cannot_remove_an_unmanaged_extra_so_it_is_only_notified() {
    let policy = reconcile(10, 3, 15);
    let mut remediator = Remediator::new();
    assert_eq!(
        remediator
            .decide(&policy, &desired(), &only_an_extra(), at(0))
            .unwrap(),
        Decision::Notify
    );
    assert!(!remediator.reconcile_in_flight());
}

#[test]
fn the_rate_limit_holds_per_trailing_hour() {
    let policy = reconcile(2, 100, 15);
    let mut remediator = Remediator::new();
    let findings = stopped_api();

    for minute in [0, 10] {
        assert_eq!(
            remediator
                .decide(&policy, &desired(), &findings, at(minute))
                .unwrap(),
            reconcile_decision()
        );
        remediator
            .record_outcome(
                &policy,
                "web-1",
                failed("container exited 1"),
                at(minute + 1),
            )
            .unwrap();
    }
    for minute in [20, 59] {
        assert_eq!(
            remediator
                .decide(&policy, &desired(), &findings, at(minute))
                .unwrap(),
            Decision::Suppressed {
                reason: SuppressReason::RateLimited { until: at(60) }
            }
        );
    }
    // An hour after the first one, one more is allowed, and then the limit holds again.
    assert_eq!(
        remediator
            .decide(&policy, &desired(), &findings, at(60))
            .unwrap(),
        reconcile_decision()
    );
    remediator
        .record_outcome(&policy, "web-1", failed("container exited 1"), at(61))
        .unwrap();
    assert_eq!(
        remediator
            .decide(&policy, &desired(), &findings, at(62))
            .unwrap(),
        Decision::Suppressed {
            reason: SuppressReason::RateLimited { until: at(70) }
        }
    );
}

#[test]
fn the_breaker_trips_after_n_failures_and_recovers_after_cooldown() {
    let policy = reconcile(100, 3, 30);
    let mut remediator = Remediator::new();
    let findings = stopped_api();

    for (n, minute) in [0u32, 2, 4].into_iter().enumerate() {
        assert_eq!(
            remediator.breaker(&policy, at(minute as u64)),
            BreakerState::Closed { failures: n as u32 }
        );
        assert_eq!(
            remediator
                .decide(&policy, &desired(), &findings, at(minute as u64))
                .unwrap(),
            reconcile_decision()
        );
        remediator
            .record_outcome(
                &policy,
                "web-1",
                failed(&format!("pull of {API_DIGEST} refused")),
                at(minute as u64 + 1),
            )
            .unwrap();
    }

    // Third failure at minute 5: open, and it says so.
    let open = SuppressReason::BreakerOpen {
        since: at(5),
        failures: 3,
        retry_at: at(35),
        last_error: Some(format!("pull of {API_DIGEST} refused")),
    };
    for minute in [6, 34] {
        assert_eq!(
            remediator
                .decide(&policy, &desired(), &findings, at(minute))
                .unwrap(),
            Decision::Suppressed {
                reason: open.clone()
            }
        );
    }
    assert_eq!(
        remediator.breaker(&policy, at(34)),
        BreakerState::Open {
            since: at(5),
            failures: 3,
            retry_at: at(35)
        }
    );

    // Cooldown over: half-open, one trial goes through; its failure reopens the breaker.
    assert_eq!(
        remediator.breaker(&policy, at(35)),
        BreakerState::HalfOpen { failures: 3 }
    );
    assert_eq!(
        remediator
            .decide(&policy, &desired(), &findings, at(35))
            .unwrap(),
        reconcile_decision()
    );
    remediator
        .record_outcome(&policy, "web-1", failed("still refused"), at(36))
        .unwrap();
    assert_eq!(
        remediator
            .decide(&policy, &desired(), &findings, at(40))
            .unwrap(),
        Decision::Suppressed {
            reason: SuppressReason::BreakerOpen {
                since: at(36),
                failures: 4,
                retry_at: at(66),
                last_error: Some("still refused".into()),
            }
        }
    );

    // The next trial succeeds: closed, counting from zero.
    assert_eq!(
        remediator
            .decide(&policy, &desired(), &findings, at(66))
            .unwrap(),
        reconcile_decision()
    );
    remediator
        .record_outcome(&policy, "web-1", ReconcileOutcome::Succeeded, at(67))
        .unwrap();
    assert_eq!(
        remediator.breaker(&policy, at(67)),
        BreakerState::Closed { failures: 0 }
    );
    assert_eq!(
        remediator
            .decide(&policy, &desired(), &changed_worker(), at(68))
            .unwrap(),
        reconcile_decision()
    );
}

#[test]
fn a_success_between_failures_resets_the_count() {
    let policy = reconcile(100, 2, 30);
    let mut remediator = Remediator::new();
    let outcomes = [failed("x"), ReconcileOutcome::Succeeded, failed("y")];
    for (i, outcome) in outcomes.into_iter().enumerate() {
        // Alternate finding sets so a success does not suppress the next attempt.
        let findings = if i % 2 == 0 {
            stopped_api()
        } else {
            changed_worker()
        };
        let now = at(i as u64 * 2);
        assert_eq!(
            remediator
                .decide(&policy, &desired(), &findings, now)
                .unwrap(),
            reconcile_decision()
        );
        remediator
            .record_outcome(&policy, "web-1", outcome, now + MINUTE)
            .unwrap();
    }
    assert_eq!(
        remediator.breaker(&policy, at(10)),
        BreakerState::Closed { failures: 1 }
    );
}

#[test]
fn an_outcome_without_a_reconcile_in_flight_is_refused_and_changes_nothing() {
    let policy = reconcile(10, 3, 15);
    let mut remediator = Remediator::new();
    let before = remediator.clone();
    assert_eq!(
        remediator.record_outcome(&policy, "web-1", failed("x"), at(0)),
        Err(RemediationError::NoReconcileInFlight {
            target: "web-1".into()
        })
    );
    assert_eq!(remediator, before);

    remediator
        .decide(&policy, &desired(), &stopped_api(), at(1))
        .unwrap();
    remediator
        .record_outcome(&policy, "web-1", ReconcileOutcome::Succeeded, at(2))
        .unwrap();
    let before = remediator.clone();
    assert!(
        remediator
            .record_outcome(&policy, "web-1", ReconcileOutcome::Succeeded, at(3))
            .is_err()
    );
    assert_eq!(remediator, before);
}

#[test]
fn findings_of_another_target_are_refused_and_change_nothing() {
    let policy = reconcile(10, 3, 15);
    let mut remediator = Remediator::new();
    let mut other = desired();
    other.target = "web-2".into();
    let err = remediator
        .decide(&policy, &other, &stopped_api(), at(0))
        .unwrap_err();
    assert_eq!(
        err,
        RemediationError::ForeignFinding {
            target: "web-2".into(),
            finding: "web-1".into()
        }
    );
    assert_eq!(remediator, Remediator::new());
}

#[test]
fn remediator_state_survives_a_serde_roundtrip_mid_flight() {
    let policy = reconcile(2, 2, 30);
    let mut remediator = Remediator::new();
    let findings = stopped_api();
    remediator
        .decide(&policy, &desired(), &findings, at(0))
        .unwrap();
    remediator
        .record_outcome(&policy, "web-1", failed("exit 1"), at(1))
        .unwrap();
    remediator
        .decide(&policy, &desired(), &findings, at(2))
        .unwrap();
    assert!(remediator.reconcile_in_flight());

    let json = serde_json::to_string(&remediator).unwrap();
    let mut restored: Remediator = serde_json::from_str(&json).unwrap();
    assert_eq!(restored, remediator);

    // The restored machine goes on exactly as the original: the in-flight job fails, which
    // is the second failure and opens the breaker.
    for r in [&mut remediator, &mut restored] {
        r.record_outcome(&policy, "web-1", failed("exit 2"), at(3))
            .unwrap();
        assert_eq!(
            r.breaker(&policy, at(4)),
            BreakerState::Open {
                since: at(3),
                failures: 2,
                retry_at: at(33)
            }
        );
    }
    assert_eq!(restored, remediator);

    let decision = remediator
        .decide(&policy, &desired(), &findings, at(4))
        .unwrap();
    let json = serde_json::to_value(&decision).unwrap();
    assert_eq!(json["decision"], "suppressed");
    assert_eq!(json["reason"]["reason"], "breaker_open");
    assert_eq!(json["reason"]["failures"], 2);
    assert_eq!(serde_json::from_value::<Decision>(json).unwrap(), decision);
}

#[test]
fn policies_refuse_values_that_cannot_work() {
    let cooldown = MINUTE;
    let mode = RemediationMode::Reconcile;
    assert_eq!(
        RemediationPolicy::new(mode, 0, 3, cooldown),
        Err(PolicyError::ZeroRate)
    );
    assert_eq!(
        RemediationPolicy::new(mode, 3, 0, cooldown),
        Err(PolicyError::ZeroThreshold)
    );
    assert_eq!(
        RemediationPolicy::new(mode, 3, 3, Duration::ZERO),
        Err(PolicyError::ZeroCooldown)
    );
    assert_eq!("reconcile".parse(), Ok(RemediationMode::Reconcile));
    assert_eq!(
        "repair".parse::<RemediationMode>().unwrap_err().to_string(),
        "unknown remediation mode \"repair\": expected notify or reconcile"
    );

    let policy = reconcile(4, 5, 10);
    let json = serde_json::to_value(policy).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"mode": "reconcile", "max_per_hour": 4, "breaker_threshold": 5,
                           "breaker_cooldown_secs": 600})
    );
    assert_eq!(
        serde_json::from_value::<RemediationPolicy>(json).unwrap(),
        policy
    );
    let bad = serde_json::json!({"mode": "reconcile", "max_per_hour": 0, "breaker_threshold": 5,
                                 "breaker_cooldown_secs": 600});
    let err = serde_json::from_value::<RemediationPolicy>(bad).unwrap_err();
    assert!(err.to_string().contains("max_per_hour"), "{err}");
}
