//! Random valid DAGs, driven by random outcomes: every run terminates, no step starts before
//! its needs allow it, settled steps never start again, and a JSON round trip at any point
//! (a plane restart) changes nothing.

use std::collections::HashMap;

use proptest::prelude::*;
use stella_workflow::{
    Action, Event, RunOutcome, RunState, RunStatus, StepKind, StepStatus, When, WorkflowTemplate,
    idempotency_key, next_actions,
};
use time::OffsetDateTime;

#[derive(Debug, Clone)]
struct StepPlan {
    kind: &'static str,
    when: When,
    needs_mask: u16,
    retries: u32,
    timeout_secs: Option<u32>,
}

fn step_plan() -> impl Strategy<Value = StepPlan> {
    (
        prop::sample::select(vec!["deploy", "gate", "approval", "wait", "rollback"]),
        prop::sample::select(vec![
            When::OnSuccess,
            When::OnSuccess,
            When::OnFailure,
            When::Always,
        ]),
        any::<u16>(),
        0u32..=2,
        prop::option::of(1u32..=120),
    )
        .prop_map(|(kind, when, needs_mask, retries, timeout_secs)| StepPlan {
            kind,
            when,
            needs_mask,
            retries,
            timeout_secs,
        })
}

/// YAML for a DAG where step i may need any earlier step, written out in `order` so the
/// template's list is not always topological.
fn render(plans: &[StepPlan], order: &[usize]) -> String {
    // Needs of each step, within the rules validation enforces: an on_success step needs no
    // failure handler, nor anything that waits for every on_success step (a cycle).
    let mut needs_of: Vec<Vec<usize>> = Vec::new();
    let mut after_main_flow: Vec<bool> = Vec::new();
    for (index, plan) in plans.iter().enumerate() {
        let needs: Vec<usize> = (0..index)
            .filter(|&need| plan.needs_mask & (1 << need) != 0)
            .filter(|&need| {
                plan.when != When::OnSuccess
                    || (plans[need].when != When::OnFailure && !after_main_flow[need])
            })
            .collect();
        after_main_flow.push(
            (plan.when != When::OnSuccess && needs.is_empty())
                || needs.iter().any(|&need| after_main_flow[need]),
        );
        needs_of.push(needs);
    }
    let mut yaml = String::from("name: generated\nsteps:\n");
    for &index in order {
        let plan = &plans[index];
        let needs: Vec<String> = needs_of[index]
            .iter()
            .map(|need| format!("s{need}"))
            .collect();
        yaml.push_str(&format!(
            "  - id: s{index}\n    type: {}\n    when: {}\n    needs: [{}]\n",
            plan.kind,
            plan.when.as_str(),
            needs.join(", ")
        ));
        if plan.kind == "wait" {
            yaml.push_str("    with: { duration: 7s }\n");
        } else {
            if plan.kind != "approval" && plan.retries > 0 {
                yaml.push_str(&format!(
                    "    retry: {{ count: {}, backoff: 3s }}\n",
                    plan.retries
                ));
            }
            if let Some(seconds) = plan.timeout_secs {
                yaml.push_str(&format!("    timeout: {seconds}s\n"));
            }
        }
    }
    yaml
}

fn dag() -> impl Strategy<Value = (Vec<StepPlan>, Vec<usize>)> {
    prop::collection::vec(step_plan(), 1..=9).prop_flat_map(|plans| {
        let order: Vec<usize> = (0..plans.len()).collect();
        (Just(plans), Just(order).prop_shuffle())
    })
}

/// Whether the needs of `step_id` allow it to start now, by the rules of `When`.
fn needs_allow_start(template: &WorkflowTemplate, state: &RunState, step_id: &str) -> bool {
    let Some(step) = template.step(step_id) else {
        return false;
    };
    let status = |id: &str| state.step(id).cloned().unwrap_or(StepStatus::Pending);
    match step.when {
        When::OnSuccess => {
            !state.has_failure()
                && step
                    .needs
                    .iter()
                    .all(|need| matches!(status(need), StepStatus::Succeeded { .. }))
        }
        When::OnFailure | When::Always => {
            let needs: Vec<String> = if step.needs.is_empty() {
                template
                    .steps()
                    .iter()
                    .filter(|other| other.when == When::OnSuccess)
                    .map(|other| other.id.clone())
                    .collect()
            } else {
                step.needs.clone()
            };
            needs.iter().all(|need| status(need).is_settled())
                && (step.when == When::Always
                    || needs
                        .iter()
                        .any(|need| matches!(status(need), StepStatus::Failed { .. })))
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_dags_terminate_and_respect_needs(
        (plans, order) in dag(),
        choices in prop::collection::vec(0u8..6, 0..300),
        cancel_at in prop::option::of(0usize..40),
    ) {
        drive(&plans, &order, choices, cancel_at)?;
    }
}

/// Runs the generated template to its end the way the plane would, with `choices` deciding
/// how running jobs end and whether time passes first, checking every action on the way.
fn drive(
    plans: &[StepPlan],
    order: &[usize],
    choices: Vec<u8>,
    cancel_at: Option<usize>,
) -> Result<(), TestCaseError> {
    let yaml = render(plans, order);
    let template = WorkflowTemplate::parse("generated.yaml", &yaml)
        .unwrap_or_else(|errors| panic!("generated template refused:\n{errors}\n{yaml}"));
    let mut now = OffsetDateTime::from_unix_timestamp(1_900_000_000).expect("instant");
    let mut state = RunState::new("run-p", &template, now);
    let mut next_choice = choices.into_iter();
    let mut starts: HashMap<String, u32> = HashMap::new();
    let mut cancelled = false;
    let mut outcome = None;

    for iteration in 0..2_000 {
        // A plane restart: the state must survive its JSON form unchanged.
        if iteration % 3 == 0 {
            let stored = serde_json::to_string(&state).expect("serialize");
            let reloaded: RunState = serde_json::from_str(&stored).expect("deserialize");
            prop_assert_eq!(&reloaded, &state);
            state = reloaded;
        }
        if cancel_at == Some(iteration) && !state.status().is_finished() {
            state
                .apply(
                    &template,
                    Event::Cancel {
                        reason: "test".into(),
                    },
                    now,
                )
                .expect("cancel");
            cancelled = true;
        }
        let actions = next_actions(&template, &state, now).expect("actions");
        if let [Action::Finish(finished)] = actions.as_slice() {
            outcome = Some(*finished);
            break;
        }
        let mut wake = None;
        let mut acted = false;
        for action in actions {
            match action {
                Action::StartStep {
                    step_id,
                    attempt,
                    idempotency_key: key,
                } => {
                    prop_assert!(!cancelled, "start after cancel");
                    let status = state.step(&step_id).cloned().expect("known step");
                    prop_assert!(
                        !status.is_settled(),
                        "{step_id} started again while {status:?}"
                    );
                    if status == StepStatus::Pending {
                        prop_assert!(
                            needs_allow_start(&template, &state, &step_id),
                            "{step_id} started before its needs allowed it\n{yaml}\n{state:?}"
                        );
                    }
                    let max = template.step(&step_id).expect("step").max_attempts();
                    prop_assert!(attempt <= max);
                    prop_assert_eq!(key, idempotency_key("run-p", &step_id, attempt));
                    *starts.entry(step_id.clone()).or_default() += 1;
                    prop_assert!(
                        starts[&step_id] <= max,
                        "{step_id} started {} times",
                        starts[&step_id]
                    );
                    state
                        .apply(&template, Event::StepStarted { step_id, attempt }, now)
                        .expect("start");
                    acted = true;
                }
                Action::TimeoutStep { step_id, attempt } => {
                    state
                        .apply(&template, Event::StepTimedOut { step_id, attempt }, now)
                        .expect("timeout");
                    acted = true;
                }
                Action::CompleteWait { step_id, attempt } => {
                    state
                        .apply(&template, Event::WaitElapsed { step_id, attempt }, now)
                        .expect("wait");
                    acted = true;
                }
                Action::CancelStep { step_id, attempt } => {
                    state
                        .apply(
                            &template,
                            Event::StepFailed {
                                step_id,
                                attempt,
                                reason: "cancelled".into(),
                            },
                            now,
                        )
                        .expect("cancel step");
                    acted = true;
                }
                Action::WakeAt(at) => {
                    prop_assert!(at > now, "wake-up in the past");
                    wake = Some(at);
                }
                Action::Finish(_) => prop_assert!(false, "finish among other actions"),
            }
        }
        if acted {
            continue;
        }
        // Nothing was due: let one running job report, as chosen, or let time pass.
        let running: Vec<(String, u32)> = state
            .steps()
            .iter()
            .filter_map(|record| match record.status {
                StepStatus::Running { attempt, .. }
                    if !matches!(
                        template.step(&record.id).map(|s| &s.kind),
                        Some(StepKind::Wait(_))
                    ) =>
                {
                    Some((record.id.clone(), attempt))
                }
                _ => None,
            })
            .collect();
        let choice = next_choice.next().unwrap_or(0);
        // Low choices (or nothing else to wait for) end a running job; high ones let time pass.
        let reporting = running
            .get(usize::from(choice) % running.len().max(1))
            .filter(|_| choice < 3 || wake.is_none());
        if let Some((step_id, attempt)) = reporting.cloned() {
            let event = if choice.is_multiple_of(2) {
                Event::StepSucceeded {
                    step_id,
                    attempt,
                    output: None,
                }
            } else {
                Event::StepFailed {
                    step_id,
                    attempt,
                    reason: "chosen".into(),
                }
            };
            state.apply(&template, event, now).expect("result");
            continue;
        }
        match wake {
            Some(at) => now = at,
            None => prop_assert!(
                false,
                "run stuck: nothing due, nothing running\n{yaml}\n{state:?}"
            ),
        }
    }

    let outcome = outcome.expect("run did not finish within the iteration bound");
    prop_assert!(
        state
            .steps()
            .iter()
            .all(|record| record.status.is_settled())
    );
    let expected = match (cancelled, state.has_failure()) {
        (true, _) => RunOutcome::Cancelled,
        (false, true) => RunOutcome::Failed,
        (false, false) => RunOutcome::Succeeded,
    };
    prop_assert_eq!(outcome, expected);
    prop_assert_eq!(
        state.status() == RunStatus::Succeeded,
        outcome == RunOutcome::Succeeded
    );
    Ok(())
}

const SAMPLE: &str = "\
name: sample
steps:
  - { id: approve, type: approval }
  - id: deploy
    type: deploy
    needs: [approve]
    with: { strategy: rolling, batch_size: 2 }
    retry: { count: 1, backoff: 5s }
  - { id: health, type: health-check, needs: [deploy], with: { container: true } }
  - { id: undo, type: rollback, needs: [deploy, health], when: on_failure }
";

proptest! {
    /// Damaged templates (a byte range cut out, or arbitrary text) never panic the parser,
    /// and every error points inside the source or just past its end.
    #[test]
    fn damaged_templates_get_positioned_errors(cut_at in 0..SAMPLE.len(), cut_len in 1usize..12, noise in ".{0,80}") {
        let end = (cut_at + cut_len).min(SAMPLE.len());
        let damaged = format!("{}{}", &SAMPLE[..cut_at], &SAMPLE[end..]);
        for source in [damaged.as_str(), noise.as_str()] {
            if let Err(errors) = WorkflowTemplate::parse("t.yaml", source) {
                prop_assert!(!errors.errors.is_empty());
                // YAML breaks lines at \n, \r\n and a lone \r; the scanner may report the
                // position just past the end.
                let breaks = source.replace("\r\n", "\n").matches(['\n', '\r']).count();
                let last_line = breaks + 2;
                for error in &errors.errors {
                    prop_assert!(error.line >= 1 && error.line <= last_line, "{error} outside {source:?}");
                    prop_assert!(error.column >= 1);
                }
            }
        }
    }
}
