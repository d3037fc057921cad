mod support;

use std::time::Duration;

use stella_drift::{
    DetectError, Finding, FindingKind, IgnoreRule, IgnoreRules, IgnoreScope, ObservedTarget,
    Severity, WorkloadState, detect,
};
use support::*;

fn findings(observed: &ObservedTarget) -> Vec<Finding> {
    detect(Some(&desired()), observed, &IgnoreRules::default(), t0()).unwrap()
}

fn kinds(findings: &[Finding]) -> Vec<(FindingKind, Option<&str>)> {
    findings
        .iter()
        .map(|f| (f.kind, f.component.as_deref()))
        .collect()
}

fn rules(specs: &[(IgnoreScope, &str)]) -> IgnoreRules {
    specs
        .iter()
        .map(|(scope, text)| IgnoreRule::new(scope.clone(), text.parse().unwrap()))
        .collect()
}

#[test]
fn a_target_running_its_release_has_no_findings() {
    assert_eq!(findings(&in_sync()), []);
}

#[test]
fn a_stopped_container_is_stopped() {
    let mut observed = in_sync();
    observed.items[1] = managed("worker", WORKER_DIGEST, "exited");
    let found = findings(&observed);
    assert_eq!(kinds(&found), [(FindingKind::Stopped, Some("worker"))]);
    let f = &found[0];
    assert_eq!(f.severity, Severity::High);
    assert_eq!(f.target, "web-1");
    assert_eq!(f.expected.as_deref(), Some("running"));
    assert_eq!(f.observed.as_deref(), Some("stopped"));
    assert_eq!(f.detected_at, t0());
    assert_eq!(f.labels["stella.component"], "worker");
    assert!(f.detail.contains("stella-web-1-worker"), "{}", f.detail);
}

#[test]
fn a_digest_changed_behind_stellas_back_is_digest_changed() {
    let mut observed = in_sync();
    observed.items[0] = managed("api", OTHER_DIGEST, "running");
    let found = findings(&observed);
    assert_eq!(kinds(&found), [(FindingKind::DigestChanged, Some("api"))]);
    let f = &found[0];
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(f.expected.as_deref(), Some(API_DIGEST));
    assert_eq!(f.observed.as_deref(), Some(OTHER_DIGEST));
}

#[test]
fn a_changed_digest_that_also_stopped_reports_both() {
    let mut observed = in_sync();
    observed.items[0] = managed("api", OTHER_DIGEST, "exited");
    assert_eq!(
        kinds(&findings(&observed)),
        [
            (FindingKind::DigestChanged, Some("api")),
            (FindingKind::Stopped, Some("api"))
        ]
    );
}

#[test]
fn a_removed_container_is_missing() {
    let mut observed = in_sync();
    observed.items.remove(0);
    let found = findings(&observed);
    assert_eq!(kinds(&found), [(FindingKind::Missing, Some("api"))]);
    assert_eq!(found[0].severity, Severity::Critical);
    assert_eq!(found[0].expected.as_deref(), Some(API_DIGEST));
    assert_eq!(found[0].observed, None);

    // An executor that reports the workload as gone says the same thing.
    let mut observed = in_sync();
    observed.items[0].state = WorkloadState::from_reported("removing");
    assert_eq!(
        kinds(&findings(&observed)),
        [(FindingKind::Missing, Some("api"))]
    );
}

#[test]
fn a_hand_started_container_is_an_unmanaged_extra() {
    let mut observed = in_sync();
    observed.items.push(hand_started("debug-shell", &[]));
    let found = findings(&observed);
    assert_eq!(kinds(&found), [(FindingKind::UnmanagedExtra, None)]);
    let f = &found[0];
    assert_eq!(f.severity, Severity::Low);
    assert_eq!(f.workload.as_deref(), Some("debug-shell"));
    assert_eq!(f.observed.as_deref(), Some(OTHER_DIGEST));
    assert!(f.detail.contains("not managed by Stella"), "{}", f.detail);
}

#[test]
fn a_leftover_component_of_an_older_release_is_an_extra_with_its_component() {
    let mut observed = in_sync();
    observed
        .items
        .push(managed("legacy-cron", OTHER_DIGEST, "running"));
    let found = findings(&observed);
    assert_eq!(
        kinds(&found),
        [(FindingKind::UnmanagedExtra, Some("legacy-cron"))]
    );
    assert!(
        found[0]
            .detail
            .contains("which release rel-7 does not have"),
        "{}",
        found[0].detail
    );
}

#[test]
fn a_deleted_sticker_is_sticker_missing() {
    let mut observed = in_sync();
    observed.sticker = None;
    let found = findings(&observed);
    assert_eq!(kinds(&found), [(FindingKind::StickerMissing, None)]);
    assert_eq!(found[0].severity, Severity::Medium);
    assert!(
        found[0]
            .expected
            .as_deref()
            .unwrap()
            .contains("release=rel-7")
    );
}

#[test]
fn a_sticker_of_another_release_is_sticker_mismatch() {
    let mut observed = in_sync();
    observed.sticker = Some(sticker("rel-6", "dep-41"));
    let found = findings(&observed);
    assert_eq!(kinds(&found), [(FindingKind::StickerMismatch, None)]);
    let f = &found[0];
    assert_eq!(f.severity, Severity::Medium);
    assert!(
        f.detail.contains("release rel-6 instead of rel-7"),
        "{}",
        f.detail
    );
    assert!(
        f.detail.contains("deployment dep-41 instead of dep-42"),
        "{}",
        f.detail
    );
    assert!(
        f.observed
            .as_deref()
            .unwrap()
            .starts_with("release=rel-6 deployment=dep-41")
    );
}

#[test]
fn a_sticker_with_another_digest_is_sticker_mismatch_naming_the_component() {
    let mut observed = in_sync();
    let mut tampered = sticker("rel-7", "dep-42");
    tampered.components[1].digest = OTHER_DIGEST.into();
    observed.sticker = Some(tampered);
    let found = findings(&observed);
    assert_eq!(kinds(&found), [(FindingKind::StickerMismatch, None)]);
    assert!(
        found[0].detail.contains(&format!(
            "component worker at {OTHER_DIGEST} instead of {WORKER_DIGEST}"
        )),
        "{}",
        found[0].detail
    );
}

#[test]
fn sticker_checks_are_off_when_no_sticker_is_expected() {
    let mut desired = desired();
    desired.sticker_expected = false;
    let mut observed = in_sync();
    observed.sticker = None;
    let none = detect(Some(&desired), &observed, &IgnoreRules::default(), t0()).unwrap();
    assert_eq!(none, []);
}

#[test]
fn transitional_or_unreadable_states_are_not_drift() {
    for reported in ["restarting", "starting", "pending", "deploying", ""] {
        let mut observed = in_sync();
        observed.items[0] = managed("api", API_DIGEST, reported);
        assert_eq!(observed.items[0].state, WorkloadState::Unknown);
        assert_eq!(findings(&observed), [], "state {reported:?}");
    }
}

#[test]
fn an_executor_that_cannot_see_digests_raises_no_digest_finding() {
    let mut observed = in_sync();
    observed.items[0].digest = None;
    assert_eq!(findings(&observed), []);
}

#[test]
fn every_kind_at_once_comes_in_a_stable_order() {
    let mut observed = in_sync();
    observed.items[0] = managed("api", OTHER_DIGEST, "running");
    observed.items[1] = managed("worker", WORKER_DIGEST, "exited");
    observed.items.push(hand_started("debug-shell", &[]));
    observed.sticker = Some(sticker("rel-6", "dep-41"));
    assert_eq!(
        kinds(&findings(&observed)),
        [
            (FindingKind::DigestChanged, Some("api")),
            (FindingKind::Stopped, Some("worker")),
            (FindingKind::UnmanagedExtra, None),
            (FindingKind::StickerMismatch, None),
        ]
    );
}

#[test]
fn no_desired_state_means_no_findings_even_for_extras() {
    let mut observed = in_sync();
    observed.items.push(hand_started("debug-shell", &[]));
    observed.sticker = None;
    assert_eq!(
        detect(None, &observed, &IgnoreRules::default(), t0()).unwrap(),
        []
    );
}

#[test]
fn inputs_for_different_targets_or_with_duplicate_components_are_refused() {
    let mut observed = in_sync();
    observed.target = "web-2".into();
    assert_eq!(
        detect(Some(&desired()), &observed, &IgnoreRules::default(), t0()),
        Err(DetectError::TargetMismatch {
            desired: "web-1".into(),
            observed: "web-2".into()
        })
    );

    let mut desired = desired();
    desired.components.push(desired.components[0].clone());
    let err = detect(Some(&desired), &in_sync(), &IgnoreRules::default(), t0()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "desired state of target \"web-1\" names component \"api\" twice"
    );
}

/// A target with one finding of every kind that label, component and kind rules can name.
fn drifted() -> ObservedTarget {
    let mut observed = in_sync();
    observed.items[1] = managed("worker", WORKER_DIGEST, "exited");
    observed
        .items
        .push(hand_started("ops-agent", &[("team", "ops")]));
    observed
        .items
        .push(hand_started("debug-shell", &[("team", "dev")]));
    observed.sticker = None;
    observed
}

fn detect_with(ignore: &IgnoreRules) -> Vec<(FindingKind, Option<String>)> {
    detect(Some(&desired()), &drifted(), ignore, t0())
        .unwrap()
        .into_iter()
        .map(|f| (f.kind, f.workload.or(f.component)))
        .collect()
}

#[test]
fn ignore_rules_silence_exactly_what_they_name() {
    let all = detect_with(&IgnoreRules::default());
    assert_eq!(
        all,
        [
            (FindingKind::Stopped, Some("worker".into())),
            (FindingKind::UnmanagedExtra, Some("ops-agent".into())),
            (FindingKind::UnmanagedExtra, Some("debug-shell".into())),
            (FindingKind::StickerMissing, None),
        ]
    );
    let without = |gone: &[usize]| -> Vec<_> {
        all.iter()
            .enumerate()
            .filter(|(i, _)| !gone.contains(i))
            .map(|(_, f)| f.clone())
            .collect()
    };
    let env = IgnoreScope::Environment;

    assert_eq!(
        detect_with(&rules(&[(env.clone(), "kind=unmanaged_extra")])),
        without(&[1, 2])
    );
    assert_eq!(
        detect_with(&rules(&[(env.clone(), "component=worker")])),
        without(&[0])
    );
    assert_eq!(
        detect_with(&rules(&[(env.clone(), "label:team=ops")])),
        without(&[1])
    );
    assert_eq!(
        detect_with(&rules(&[(env.clone(), "workload=debug-shell")])),
        without(&[2])
    );
    assert_eq!(
        detect_with(&rules(&[(env.clone(), "kind=sticker_missing")])),
        without(&[3])
    );
    // Conditions are all required: the worker is stopped, not missing.
    assert_eq!(
        detect_with(&rules(&[(env.clone(), "kind=missing,component=worker")])),
        all
    );
    // A label the worker's container carries silences its stopped finding.
    assert_eq!(
        detect_with(&rules(&[(env.clone(), "label:stella.component=worker")])),
        without(&[0])
    );
    // Several rules: any one silences.
    assert_eq!(
        detect_with(&rules(&[
            (env.clone(), "label:team=ops"),
            (env, "kind=sticker_missing")
        ])),
        without(&[1, 3])
    );
}

#[test]
fn target_rules_apply_to_their_target_only() {
    let ours = rules(&[(IgnoreScope::Target("web-1".into()), "kind=unmanaged_extra")]);
    assert_eq!(detect_with(&ours).len(), 2);
    let theirs = rules(&[(IgnoreScope::Target("web-2".into()), "kind=unmanaged_extra")]);
    assert_eq!(detect_with(&theirs).len(), 4);
}

#[test]
fn fingerprints_are_stable_across_reports_and_differ_between_findings() {
    let first = detect(Some(&desired()), &drifted(), &IgnoreRules::default(), t0()).unwrap();

    // Later, with the workloads listed in another order and other label values that are not
    // part of the identity of a finding.
    let mut later = drifted();
    later.observed_at = t0() + Duration::from_secs(600);
    later.items.reverse();
    for item in &mut later.items {
        item.labels.insert("seen".into(), "again".into());
    }
    let second = detect(
        Some(&desired()),
        &later,
        &IgnoreRules::default(),
        t0() + Duration::from_secs(600),
    )
    .unwrap();

    let prints = |fs: &[Finding]| {
        let mut p: Vec<String> = fs.iter().map(|f| f.fingerprint.clone()).collect();
        p.sort();
        p
    };
    assert_eq!(prints(&first), prints(&second));
    let mut unique = prints(&first);
    unique.dedup();
    assert_eq!(unique.len(), first.len());

    // The same component drifting to another digest is another finding.
    let mut a = in_sync();
    a.items[0] = managed("api", OTHER_DIGEST, "running");
    let mut b = in_sync();
    b.items[0] = managed("api", WORKER_DIGEST, "running");
    assert_ne!(findings(&a)[0].fingerprint, findings(&b)[0].fingerprint);
    // And the same difference on another target too.
    let mut desired2 = desired();
    desired2.target = "web-2".into();
    let mut on_web2 = a.clone();
    on_web2.target = "web-2".into();
    let other = detect(Some(&desired2), &on_web2, &IgnoreRules::default(), t0()).unwrap();
    assert_eq!(other[0].kind, FindingKind::DigestChanged);
    assert_ne!(other[0].fingerprint, findings(&a)[0].fingerprint);
}

#[test]
fn findings_serialize_with_snake_case_kinds_and_rfc3339_times() {
    let mut observed = in_sync();
    observed.sticker = None;
    let found = findings(&observed);
    let json = serde_json::to_value(&found[0]).unwrap();
    assert_eq!(json["kind"], "sticker_missing");
    assert_eq!(json["severity"], "medium");
    assert_eq!(json["detected_at"], "2025-03-01T12:00:00Z");
    let back: Finding = serde_json::from_value(json).unwrap();
    assert_eq!(back, found[0]);
}
