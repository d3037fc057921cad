//! The input hash: equal documents hash equally whatever order or offsets they were written
//! in; any change to the document changes the hash.

mod common;

use proptest::prelude::*;
use stella_policy::{
    Approval, ApprovalDecision, EnvironmentRules, FreezeWindow, Overrides, PreviousDeployment,
    PromotionInput, PromotionRequest, ReleaseComponent, ReleaseFacts, ScheduleWindow, TimeOfDay,
    Timestamp, Weekday,
};

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,7}"
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    (0i64..4_000_000_000_000).prop_map(|ms| Timestamp::from_unix_millis(ms).unwrap())
}

fn time_of_day() -> impl Strategy<Value = TimeOfDay> {
    (0u8..24, 0u8..60).prop_map(|(h, m)| TimeOfDay::new(h, m).unwrap())
}

fn freeze_window() -> impl Strategy<Value = FreezeWindow> {
    (
        timestamp(),
        timestamp(),
        name(),
        prop::collection::vec(name(), 0..3),
    )
        .prop_map(|(start, end, reason, override_users)| FreezeWindow {
            start,
            end,
            reason,
            override_users,
        })
}

fn schedule_window() -> impl Strategy<Value = ScheduleWindow> {
    (
        prop::sample::subsequence(Weekday::ALL.to_vec(), 0..=7),
        time_of_day(),
        time_of_day(),
    )
        .prop_map(|(days, start, end)| ScheduleWindow { days, start, end })
}

fn approval() -> impl Strategy<Value = Approval> {
    (name(), timestamp(), ".{0,12}", any::<bool>()).prop_map(|(user, at, comment, yes)| Approval {
        user,
        at,
        comment,
        decision: if yes {
            ApprovalDecision::Approve
        } else {
            ApprovalDecision::Reject
        },
    })
}

fn promotion_input() -> impl Strategy<Value = PromotionInput> {
    let promotion = (name(), name(), timestamp(), ".{0,16}").prop_map(
        |(id, requested_by, requested_at, reason)| PromotionRequest {
            id,
            requested_by,
            requested_at,
            reason,
        },
    );
    let release = (
        name(),
        name(),
        prop::collection::btree_map(name(), ".{0,8}", 0..4),
        prop::collection::vec((name(), name(), "[0-9a-f]{64}"), 0..3),
    )
        .prop_map(|(name, created_by, labels, components)| ReleaseFacts {
            name,
            created_by,
            labels,
            components: components
                .into_iter()
                .map(|(name, image, hex)| ReleaseComponent {
                    name,
                    image,
                    digest: format!("sha256:{hex}"),
                })
                .collect(),
        });
    let environment = (
        name(),
        prop::option::of(name()),
        0u32..5,
        any::<bool>(),
        prop::collection::vec(freeze_window(), 0..3),
        prop::collection::vec(schedule_window(), 0..3),
        prop::collection::vec(name(), 0..3),
    )
        .prop_map(
            |(name, previous, required_approvals, sod, freeze, schedule, manual)| {
                EnvironmentRules {
                    name,
                    previous,
                    required_approvals,
                    separation_of_duties: sod,
                    freeze_windows: freeze,
                    schedule_windows: schedule,
                    manual_approvers: manual,
                }
            },
        );
    let deployment = prop::option::of((name(), name(), prop::option::of(timestamp())).prop_map(
        |(release, status, finished_at)| PreviousDeployment {
            release,
            status,
            finished_at,
        },
    ));
    (
        promotion,
        release,
        environment,
        prop::collection::vec(approval(), 0..4),
        deployment,
        prop::option::of(name()),
        timestamp(),
    )
        .prop_map(
            |(promotion, release, environment, approvals, deployment, overrider, now)| {
                PromotionInput {
                    promotion,
                    release,
                    environment,
                    approvals,
                    previous_environment_deployment: deployment,
                    overrides: Overrides {
                        freeze_override_by: overrider,
                    },
                    now,
                }
            },
        )
}

/// JSON text with every object's keys in reverse order and generous whitespace: the same
/// document as `serde_json::to_string` writes, spelled differently.
fn reversed_json(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| b.0.cmp(a.0));
            let fields: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| {
                    format!(
                        "\n  {} :  {}",
                        serde_json::Value::from(k.as_str()),
                        reversed_json(v)
                    )
                })
                .collect();
            format!("{{ {} }}", fields.join(" ,"))
        }
        serde_json::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(reversed_json).collect();
            format!("[ {} ]", items.join(" , "))
        }
        scalar => scalar.to_string(),
    }
}

proptest! {
    #[test]
    fn the_hash_does_not_depend_on_field_order_or_whitespace(input in promotion_input()) {
        let value = serde_json::to_value(&input).unwrap();
        let respelled = reversed_json(&value);
        let reparsed: PromotionInput = serde_json::from_str(&respelled).unwrap();
        prop_assert_eq!(&reparsed, &input);
        prop_assert_eq!(reparsed.hash().unwrap(), input.hash().unwrap());
        // The stored document (as JSON) hashes to the same value as the typed one, so a
        // record can be checked against its stored input without this crate's types.
        let as_value: serde_json::Value = serde_json::from_str(&respelled).unwrap();
        prop_assert_eq!(stella_pki::canonical_digest(&as_value).unwrap(), input.hash().unwrap());
    }

    #[test]
    fn any_change_to_the_input_changes_the_hash(input in promotion_input(), change in 0usize..8) {
        let mut changed = input.clone();
        match change {
            0 => changed.now = Timestamp::from_unix_millis(
                changed.now.as_offset_date_time().unix_timestamp() * 1000 + 1001).unwrap(),
            1 => changed.approvals.push(Approval {
                user: "zed".to_string(),
                at: input.now,
                comment: String::new(),
                decision: ApprovalDecision::Approve,
            }),
            2 => { changed.release.labels.insert("zz-added".to_string(), String::new()); }
            3 => changed.environment.separation_of_duties = !input.environment.separation_of_duties,
            4 => changed.release.name.push('x'),
            5 => changed.environment.required_approvals += 1,
            6 => changed.overrides.freeze_override_by =
                Some(format!("{}x", input.overrides.freeze_override_by.clone().unwrap_or_default())),
            _ => changed.promotion.reason.push(' '),
        }
        prop_assert_ne!(&changed, &input);
        prop_assert_ne!(changed.hash().unwrap(), input.hash().unwrap());
    }
}

#[test]
fn equal_instants_in_different_offsets_hash_equally() {
    let input = common::input();
    let text = serde_json::to_string(&input)
        .unwrap()
        .replace("2026-06-01T10:05:00Z", "2026-06-01T12:05:00+02:00");
    assert!(text.contains("+02:00"));
    let shifted: PromotionInput = serde_json::from_str(&text).unwrap();
    assert_eq!(shifted.hash().unwrap(), input.hash().unwrap());
}

#[test]
fn the_hash_of_a_known_document_is_pinned() {
    // A stored decision record is checked against this hash years later: the canonical form
    // of the input must not drift between versions. The value was computed independently
    // with Python: sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"))).
    assert_eq!(
        common::input().hash().unwrap(),
        "sha256:514f15620db0c6dd7ad2b88c52f46b322db28ba4a2dd59c57917b21b29b64e08"
    );
}

#[test]
fn bad_documents_are_refused_with_the_field_named() {
    let mut value = serde_json::to_value(common::input()).unwrap();
    value["environment"]["schedule_windows"] =
        serde_json::json!([{"days": ["monday"], "start": "09:00", "end": "17:00"}]);
    let err = serde_json::from_value::<PromotionInput>(value).unwrap_err();
    assert!(err.to_string().contains("monday"), "{err}");

    let mut value = serde_json::to_value(common::input()).unwrap();
    value["environment"]["required_aprovals"] = serde_json::json!(2);
    let err = serde_json::from_value::<PromotionInput>(value).unwrap_err();
    assert!(err.to_string().contains("required_aprovals"), "{err}");

    let mut value = serde_json::to_value(common::input()).unwrap();
    value["now"] = serde_json::json!("yesterday");
    let err = serde_json::from_value::<PromotionInput>(value).unwrap_err();
    assert!(err.to_string().contains("\"yesterday\""), "{err}");
}
