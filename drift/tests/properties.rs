use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use stella_drift::{
    DesiredComponent, DesiredTarget, FindingKind, IgnoreRules, ObservedItem, ObservedSticker,
    ObservedTarget, StickerComponent, WorkloadState, detect,
};
use time::OffsetDateTime;

fn digest() -> impl Strategy<Value = String> {
    "[0-9a-f]{64}".prop_map(|hex| format!("sha256:{hex}"))
}

fn desired_target() -> impl Strategy<Value = DesiredTarget> {
    (
        "[a-z][a-z0-9-]{0,12}",
        prop::sample::select(vec!["docker", "compose", "ssh", "winrm", "ecs", "nomad"]),
        "rel-[0-9a-f]{8}",
        "dep-[0-9a-f]{8}",
        prop::collection::btree_set("[a-z][a-z0-9_-]{0,10}", 1..6),
        any::<bool>(),
    )
        .prop_flat_map(|(target, kind, release, deployment, names, sticker)| {
            let n = names.len();
            (
                Just((target, kind, release, deployment, names, sticker)),
                prop::collection::vec(digest(), n),
            )
        })
        .prop_map(
            |((target, kind, release, deployment_id, names, sticker_expected), digests)| {
                DesiredTarget {
                    target,
                    kind: kind.to_string(),
                    release,
                    deployment_id,
                    components: names
                        .into_iter()
                        .zip(digests)
                        .map(|(name, digest)| DesiredComponent {
                            image: format!("registry.local/{name}:1"),
                            name,
                            digest,
                        })
                        .collect(),
                    sticker_expected,
                }
            },
        )
}

/// An inventory of exactly the desired state, in any order, with any labels, any number of
/// replicas per component, any report time.
fn matching(desired: DesiredTarget) -> impl Strategy<Value = (DesiredTarget, ObservedTarget)> {
    let n = desired.components.len();
    (
        prop::collection::vec(1usize..4, n),
        prop::collection::btree_map("[a-z.]{1,8}", "[a-z0-9]{0,6}", 0..4),
        any::<bool>(),
        0i64..4_000_000_000,
        any::<u64>(),
    )
        .prop_flat_map(move |(replicas, labels, managed, unix, seed)| {
            let mut items = Vec::new();
            for (component, count) in desired.components.iter().zip(replicas) {
                for replica in 0..count {
                    items.push(ObservedItem {
                        component: Some(component.name.clone()),
                        name: format!("{}-{}-{replica}", desired.target, component.name),
                        image: component.image.clone(),
                        digest: Some(component.digest.clone()),
                        state: WorkloadState::Running,
                        managed,
                        labels: labels.clone(),
                    });
                }
            }
            let mut sticker_components: Vec<StickerComponent> = desired
                .components
                .iter()
                .map(|c| StickerComponent {
                    name: c.name.clone(),
                    digest: c.digest.clone(),
                })
                .collect();
            // Any order of the sticker's components.
            let len = sticker_components.len();
            sticker_components.rotate_left((seed as usize) % len);
            let observed_at =
                OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH);
            let sticker = ObservedSticker {
                release: desired.release.clone(),
                deployment_id: desired.deployment_id.clone(),
                components: sticker_components,
            };
            let desired = desired.clone();
            Just(items).prop_shuffle().prop_map(move |items| {
                (
                    desired.clone(),
                    ObservedTarget {
                        target: desired.target.clone(),
                        observed_at,
                        items,
                        sticker: Some(sticker.clone()),
                    },
                )
            })
        })
}

proptest! {
    #[test]
    fn desired_equal_to_observed_has_no_findings(
        (desired, observed) in desired_target().prop_flat_map(matching)
    ) {
        let findings = detect(Some(&desired), &observed, &IgnoreRules::default(), observed.observed_at)
            .unwrap();
        prop_assert!(findings.is_empty(), "{findings:#?}");
    }

    #[test]
    fn removing_one_component_reports_exactly_it_missing(
        (desired, mut observed) in desired_target().prop_flat_map(matching),
        pick in any::<prop::sample::Index>(),
    ) {
        let gone = desired.components[pick.index(desired.components.len())].name.clone();
        observed.items.retain(|i| i.component.as_deref() != Some(gone.as_str()));
        let findings = detect(Some(&desired), &observed, &IgnoreRules::default(), observed.observed_at)
            .unwrap();
        let got: Vec<_> = findings.iter().map(|f| (f.kind, f.component.clone())).collect();
        prop_assert_eq!(got, vec![(FindingKind::Missing, Some(gone))]);
    }

    #[test]
    fn fingerprints_do_not_depend_on_time_or_order(
        (desired, observed) in desired_target().prop_flat_map(matching),
        stop in any::<prop::sample::Index>(),
        later in 1i64..10_000_000,
    ) {
        let mut drifted = observed.clone();
        let idx = stop.index(drifted.items.len());
        drifted.items[idx].state = WorkloadState::Stopped;
        drifted.items[idx].digest = Some(format!("sha256:{}", "0".repeat(64)));
        drifted.sticker = None;
        let first = detect(Some(&desired), &drifted, &IgnoreRules::default(), observed.observed_at)
            .unwrap();
        drifted.items.reverse();
        let then = observed.observed_at + time::Duration::seconds(later);
        let second = detect(Some(&desired), &drifted, &IgnoreRules::default(), then).unwrap();
        let prints = |fs: &[stella_drift::Finding]| {
            fs.iter().map(|f| f.fingerprint.clone()).collect::<BTreeSet<_>>()
        };
        prop_assert!(!first.is_empty());
        prop_assert_eq!(prints(&first), prints(&second));
        let kinds: BTreeMap<_, _> = first.iter().map(|f| (f.fingerprint.clone(), f.kind)).collect();
        prop_assert_eq!(kinds.len(), first.len());
    }
}
