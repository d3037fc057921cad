//! Template parsing and validation: every error names the line and column to fix.

use std::time::Duration;

use stella_workflow::{
    DeployStrategy, HealthProbe, Retry, StepKind, TemplateError, When, WorkflowTemplate,
};

/// The brief's example shape, every step type once.
const FULL: &str = r#"name: standard
description: every step type
steps:
  - id: approve
    type: approval
  - id: gate
    type: gate
    needs: [approve]
  - id: deploy
    type: deploy
    needs: [gate]
    with: { strategy: rolling, batch_size: 2, max_unavailable: 1 }
    retry: { count: 2, backoff: 5s }
    timeout: 10m
  - id: health
    type: health-check
    needs: [deploy]
    with: { http: { url: "http://127.0.0.1:8080/health", expect_status: 200 }, interval: 2s, healthy_after: 3 }
  - id: smoke
    type: script
    needs: [health]
    with: { command: ["/bin/sh", "-c", "exit 0"] }
    timeout: 30s
  - id: announce
    type: notify
    needs: [smoke]
    with: { webhook: "https://hooks.example.com/stella" }
  - id: pause
    type: wait
    with: { duration: 30s }
  - id: undo
    type: rollback
    when: on_failure
"#;

fn errors_of(source: &str) -> Vec<TemplateError> {
    match WorkflowTemplate::parse("workflow.yaml", source) {
        Ok(template) => panic!("accepted an invalid template: {template:?}"),
        Err(errors) => errors.errors,
    }
}

/// Asserts the template has exactly one error, at `line:column`, whose message contains
/// `needle`.
#[track_caller]
fn assert_single_error(source: &str, line: usize, column: usize, needle: &str) {
    let errors = errors_of(source);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    let error = &errors[0];
    assert_eq!(
        (error.line, error.column),
        (line, column),
        "wrong position for {:?}",
        error.message
    );
    assert!(
        error.message.contains(needle),
        "{:?} does not contain {needle:?}",
        error.message
    );
}

#[test]
fn full_template_parses_into_typed_steps() {
    let template = WorkflowTemplate::parse("workflow.yaml", FULL).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(template.name(), "standard");
    assert_eq!(template.description(), Some("every step type"));
    let ids: Vec<&str> = template
        .steps()
        .iter()
        .map(|step| step.id.as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "approve", "gate", "deploy", "health", "smoke", "announce", "pause", "undo"
        ]
    );

    let deploy = template.step("deploy").unwrap();
    assert_eq!(deploy.needs, ["gate"]);
    assert_eq!(deploy.timeout, Some(Duration::from_secs(600)));
    assert_eq!(
        deploy.retry,
        Retry {
            count: 2,
            backoff: Duration::from_secs(5),
            factor: Retry::DEFAULT_FACTOR
        }
    );
    assert_eq!(deploy.max_attempts(), 3);
    let StepKind::Deploy(spec) = &deploy.kind else {
        panic!("deploy is {:?}", deploy.kind)
    };
    assert_eq!(
        spec.strategy,
        DeployStrategy::Rolling {
            batch_size: 2,
            max_unavailable: 1
        }
    );

    let StepKind::HealthCheck(health) = &template.step("health").unwrap().kind else {
        panic!("health is not a health check")
    };
    assert_eq!(health.interval, Duration::from_secs(2));
    assert_eq!(health.healthy_after, 3);
    match &health.probe {
        HealthProbe::Http { url, expect_status } => {
            assert_eq!(url.as_str(), "http://127.0.0.1:8080/health");
            assert_eq!(*expect_status, 200);
        }
        other => panic!("probe is {other:?}"),
    }

    let StepKind::Script(script) = &template.step("smoke").unwrap().kind else {
        panic!("smoke is not a script")
    };
    assert_eq!(script.command, ["/bin/sh", "-c", "exit 0"]);
    let StepKind::Notify(notify) = &template.step("announce").unwrap().kind else {
        panic!("announce is not a notify")
    };
    assert_eq!(notify.webhook.host_str(), Some("hooks.example.com"));
    let StepKind::Wait(wait) = &template.step("pause").unwrap().kind else {
        panic!("pause is not a wait")
    };
    assert_eq!(wait.duration, Duration::from_secs(30));
    let undo = template.step("undo").unwrap();
    assert_eq!(undo.kind, StepKind::Rollback);
    assert_eq!(undo.when, When::OnFailure);
    assert_eq!(template.step("approve").unwrap().when, When::OnSuccess);
}

#[test]
fn unknown_step_type_points_at_the_type_and_lists_the_choices() {
    let source = "name: w\nsteps:\n  - id: deploy-web\n    type: deplyo\n";
    assert_single_error(
        source,
        4,
        11,
        "step \"deploy-web\": unknown step type \"deplyo\"",
    );
    let errors = WorkflowTemplate::parse("workflow.yaml", source).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "workflow.yaml:4:11: step \"deploy-web\": unknown step type \"deplyo\", did you mean \
         \"deploy\"? (expected one of approval, gate, deploy, health-check, script, notify, \
         wait, rollback)"
    );
}

#[test]
fn unknown_keys_are_errors_at_the_key() {
    // A typo in a step key.
    assert_single_error(
        "name: w\nsteps:\n  - id: a\n    type: approval\n    neds: [b]\n",
        5,
        5,
        "unknown key \"neds\" in a step, did you mean \"needs\"?",
    );
    // A typo inside `with`.
    assert_single_error(
        "name: w\nsteps:\n  - id: d\n    type: deploy\n    with:\n      strategy: rolling\n      batch_size: 2\n      max_unavailble: 1\n",
        8,
        7,
        "unknown key \"max_unavailble\" in with",
    );
    // At the top level.
    assert_single_error(
        "name: w\nstep:\n  - id: a\n    type: approval\nsteps:\n  - id: a\n    type: approval\n",
        2,
        1,
        "unknown key \"step\" in the template",
    );
}

#[test]
fn needs_must_reference_existing_steps() {
    assert_single_error(
        "name: w\nsteps:\n  - id: approve\n    type: approval\n  - id: gate\n    type: gate\n    needs: [approve, aprove2]\n",
        7,
        22,
        "step \"gate\": needs unknown step \"aprove2\", did you mean \"approve\"?",
    );
}

#[test]
fn duplicate_ids_name_the_first_definition() {
    assert_single_error(
        "name: w\nsteps:\n  - id: a\n    type: approval\n  - id: a\n    type: gate\n",
        5,
        5,
        "step \"a\": duplicate step id (first defined at line 3)",
    );
}

#[test]
fn cycles_are_named_in_full() {
    let source = "\
name: w
steps:
  - id: a
    type: gate
    needs: [c]
  - id: b
    type: gate
    needs: [a]
  - id: c
    type: gate
    needs: [b]
";
    assert_single_error(
        source,
        8,
        13,
        "step \"b\": needs form a cycle: a needs c, c needs b, b needs a",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: a\n    type: gate\n    needs: [a]\n",
        5,
        13,
        "step \"a\": a step cannot need itself",
    );
}

#[test]
fn two_disjoint_cycles_are_both_reported() {
    let source = "\
name: w
steps:
  - { id: a, type: gate, needs: [b] }
  - { id: b, type: gate, needs: [a] }
  - { id: c, type: gate, needs: [d] }
  - { id: d, type: gate, needs: [c] }
";
    let errors = errors_of(source);
    let cycles: Vec<(usize, &str)> = errors
        .iter()
        .map(|error| (error.line, error.message.as_str()))
        .collect();
    assert_eq!(
        cycles,
        [
            (4, "step \"b\": needs form a cycle: a needs b, b needs a"),
            (6, "step \"d\": needs form a cycle: c needs d, d needs c"),
        ]
    );
}

#[test]
fn durations_must_parse() {
    assert_single_error(
        "name: w\nsteps:\n  - id: d\n    type: deploy\n    timeout: 10 minutes\n",
        5,
        14,
        "step \"d\": timeout: invalid duration \"10 minutes\"",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: d\n    type: deploy\n    timeout: 10\n",
        5,
        14,
        "timeout must be a duration such as 500ms, 5s, 10m or 1h, found a number",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: p\n    type: wait\n    with: { duration: 0s }\n",
        5,
        23,
        "step \"p\": duration must be longer than 0s",
    );
}

#[test]
fn retry_bounds_are_enforced() {
    assert_single_error(
        "name: w\nsteps:\n  - id: d\n    type: deploy\n    retry: { count: 11, backoff: 5s }\n",
        5,
        21,
        "step \"d\": retry count must be between 0 and 10",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: d\n    type: deploy\n    retry: { backoff: 5s }\n",
        5,
        12,
        "step \"d\": retry needs \"count\"",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: a\n    type: approval\n    retry: { count: 1 }\n",
        5,
        12,
        "a approval step cannot be retried",
    );
}

#[test]
fn urls_must_be_http_and_carry_no_credentials() {
    assert_single_error(
        "name: w\nsteps:\n  - id: n\n    type: notify\n    with: { webhook: \"ftp://example.com/x\" }\n",
        5,
        22,
        "webhook \"ftp://example.com/x\" must be an http or https URL",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: n\n    type: notify\n    with: { webhook: \"not a url\" }\n",
        5,
        22,
        "is not a valid URL",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: h\n    type: health-check\n    with:\n      http: { url: \"https://user:pw@example.com/health\" }\n",
        6,
        20,
        "url must not carry credentials",
    );
}

#[test]
fn when_values_are_checked() {
    assert_single_error(
        "name: w\nsteps:\n  - id: r\n    type: rollback\n    when: on_falure\n",
        5,
        11,
        "unknown when \"on_falure\", did you mean \"on_failure\"? (expected one of on_success, on_failure, always)",
    );
}

#[test]
fn per_type_settings_are_required_or_refused() {
    assert_single_error(
        "name: w\nsteps:\n  - id: s\n    type: script\n",
        3,
        5,
        "step \"s\": a script step needs \"with\" (\"command\")",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: h\n    type: health-check\n    with: { interval: 2s }\n",
        5,
        11,
        "a health check needs \"http\" or \"container\"",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: a\n    type: approval\n    with: { who: ops }\n",
        5,
        11,
        "step \"a\": a approval step takes no \"with\"",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: d\n    type: deploy\n    with: { strategy: rolling }\n",
        5,
        11,
        "strategy rolling needs \"batch_size\"",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: d\n    type: deploy\n    with: { strategy: rolling, batch_size: 2, max_unavailable: 3 }\n",
        5,
        64,
        "max_unavailable must be between 0 and 2",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: s\n    type: script\n    with: { command: \"/bin/true\" }\n",
        5,
        22,
        "command must be a list (argv)",
    );
}

#[test]
fn an_on_success_step_cannot_depend_on_a_failure_path() {
    assert_single_error(
        "name: w\nsteps:\n  - id: undo\n    type: rollback\n    when: on_failure\n  - id: tell\n    type: notify\n    needs: [undo]\n    with: { webhook: \"http://127.0.0.1:9/\" }\n",
        8,
        13,
        "needs \"undo\", which runs only on failure",
    );
}

#[test]
fn several_errors_are_reported_at_once_in_line_order() {
    let source = "\
name: w
steps:
  - id: Bad Id
    type: approval
  - id: b
    type: deplyo
    needs: [nowhere]
  - id: c
    type: wait
    with: { duration: forever }
";
    let errors = errors_of(source);
    let positions: Vec<(usize, usize)> = errors.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(
        positions,
        [(3, 9), (6, 11), (7, 13), (10, 23)],
        "{errors:#?}"
    );
    assert!(
        errors[0]
            .message
            .starts_with("step 1: invalid step id \"Bad Id\"")
    );
    assert!(errors[1].message.contains("unknown step type \"deplyo\""));
    assert!(errors[2].message.contains("needs unknown step \"nowhere\""));
    assert!(errors[3].message.contains("invalid duration \"forever\""));
    let shown = WorkflowTemplate::parse("workflow.yaml", source)
        .unwrap_err()
        .to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 4, "{shown}");
    assert!(
        lines[0].starts_with("workflow.yaml:3:9: step 1: invalid step id"),
        "{shown}"
    );
    assert!(
        lines[3].starts_with("workflow.yaml:10:23: step \"c\": "),
        "{shown}"
    );
}

#[test]
fn broken_yaml_and_wrong_shapes_are_positioned() {
    // Unclosed flow sequence: the scanner's own position.
    let errors = errors_of("name: w\nsteps:\n  - id: a\n    type: gate\n    needs: [a, b\n");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].message.starts_with("invalid YAML: "),
        "{errors:#?}"
    );
    assert!(errors[0].line >= 5, "{errors:#?}");
    // Duplicate keys would silently drop one value: refused by the loader.
    let errors = errors_of("name: w\nsteps:\n  - id: a\n    type: gate\n    type: deploy\n");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].line, 5);
    assert!(errors[0].message.contains("duplicated key"), "{errors:#?}");
    assert_single_error("", 1, 1, "the template is empty");
    assert_single_error(
        "- a\n- b\n",
        1,
        1,
        "the template must be a mapping, found a list",
    );
    assert_single_error("name: w\nsteps: []\n", 2, 8, "steps is empty");
    assert_single_error(
        "steps:\n  - id: a\n    type: gate\n",
        1,
        1,
        "missing \"name\"",
    );
    assert_single_error(
        "name: w\nsteps:\n  - id: a\n    type: gate\n---\nname: x\n",
        6,
        1,
        "a template is one YAML document",
    );
}

#[test]
fn oversized_templates_are_refused_before_parsing() {
    let source = format!(
        "name: w\ndescription: \"{}\"\nsteps: []\n",
        "x".repeat(300 * 1024)
    );
    assert_single_error(&source, 1, 1, "bytes, more than the maximum");
}

#[test]
fn a_step_without_needs_that_runs_after_the_main_flow_cannot_be_needed_by_it() {
    // `notify` (always, no needs) runs after every on_success step, `deploy` among them, so
    // `deploy` needing it would wait forever.
    let source = "\
name: w
steps:
  - id: notify
    type: notify
    when: always
    with: { webhook: \"http://127.0.0.1:9/\" }
  - id: deploy
    type: deploy
    needs: [notify]
";
    assert_single_error(
        source,
        9,
        13,
        "step \"deploy\": needs form a cycle: notify (no needs, when: always) runs after deploy, deploy needs notify",
    );
}
