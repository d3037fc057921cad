//! Runs driven through `next_actions` and `apply`, the way the control plane drives them.

use serde_json::json;
use stella_workflow::{
    Action, Event, RunError, RunOutcome, RunState, RunStatus, SkipReason, StepStatus,
    WorkflowTemplate, idempotency_key, next_actions,
};
use time::OffsetDateTime;

const T0: i64 = 1_900_000_000;

fn at(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(T0 + seconds).expect("test instant in range")
}

fn template(source: &str) -> WorkflowTemplate {
    WorkflowTemplate::parse("test.yaml", source).unwrap_or_else(|errors| panic!("{errors}"))
}

/// The plane's side of a run, minus storage: a template, a state and a clock.
struct Plane {
    template: WorkflowTemplate,
    state: RunState,
    now: OffsetDateTime,
}

impl Plane {
    fn new(template: WorkflowTemplate) -> Self {
        let state = RunState::new("run-1", &template, at(0));
        Plane {
            template,
            state,
            now: at(0),
        }
    }

    fn at(&mut self, seconds: i64) -> &mut Self {
        self.now = at(seconds);
        self
    }

    fn actions(&self) -> Vec<Action> {
        next_actions(&self.template, &self.state, self.now).expect("actions")
    }

    fn apply(&mut self, event: Event) -> Result<(), RunError> {
        self.state.apply(&self.template, event, self.now)
    }

    #[track_caller]
    fn ok(&mut self, event: Event) -> &mut Self {
        let shown = format!("{event:?}");
        if let Err(error) = self.apply(event) {
            panic!("{shown} refused: {error}");
        }
        self
    }

    fn start(&mut self, step: &str, attempt: u32) -> &mut Self {
        self.ok(started(step, attempt))
    }

    fn succeed(&mut self, step: &str, attempt: u32) -> &mut Self {
        self.ok(Event::StepSucceeded {
            step_id: step.into(),
            attempt,
            output: None,
        })
    }

    fn fail(&mut self, step: &str, attempt: u32, reason: &str) -> &mut Self {
        self.ok(Event::StepFailed {
            step_id: step.into(),
            attempt,
            reason: reason.into(),
        })
    }

    fn status(&self, step: &str) -> &StepStatus {
        self.state.step(step).expect("step exists")
    }

    /// Asserts a refused event changes nothing.
    #[track_caller]
    fn refused(&mut self, event: Event) -> RunError {
        let before = self.state.clone();
        let error = match self.apply(event) {
            Ok(()) => panic!("event accepted"),
            Err(error) => error,
        };
        assert_eq!(self.state, before, "a refused event changed the state");
        error
    }
}

fn started(step: &str, attempt: u32) -> Event {
    Event::StepStarted {
        step_id: step.into(),
        attempt,
    }
}

fn start_action(step: &str, attempt: u32) -> Action {
    Action::StartStep {
        step_id: step.into(),
        attempt,
        idempotency_key: idempotency_key("run-1", step, attempt),
    }
}

fn skipped(reason: SkipReason) -> StepStatus {
    StepStatus::Skipped { reason }
}

#[test]
fn default_deploy_happy_path_runs_each_step_once_in_order() {
    let mut plane = Plane::new(WorkflowTemplate::default_deploy());
    assert_eq!(plane.actions(), [start_action("approve", 1)]);
    plane.start("approve", 1);
    // Waiting for approvals has no timeout: nothing is due.
    assert_eq!(plane.actions(), []);
    plane.at(60).succeed("approve", 1);
    assert_eq!(plane.actions(), [start_action("gate", 1)]);
    plane.start("gate", 1).succeed("gate", 1);
    assert_eq!(plane.actions(), [start_action("deploy", 1)]);
    plane.at(61).start("deploy", 1);
    assert_eq!(plane.actions(), [Action::WakeAt(at(61 + 30 * 60))]);
    plane.at(100).ok(Event::StepSucceeded {
        step_id: "deploy".into(),
        attempt: 1,
        output: Some(json!({"targets": 2})),
    });
    assert_eq!(plane.actions(), [start_action("health", 1)]);
    plane.start("health", 1).at(110).succeed("health", 1);

    assert_eq!(plane.actions(), [Action::Finish(RunOutcome::Succeeded)]);
    assert_eq!(plane.state.status(), RunStatus::Succeeded);
    assert_eq!(plane.state.finished_at(), Some(at(110)));
    assert_eq!(plane.status("rollback"), &skipped(SkipReason::NoFailure));
    assert_eq!(
        plane.status("deploy"),
        &StepStatus::Succeeded {
            attempt: 1,
            finished_at: at(100),
            output: Some(json!({"targets": 2})),
        }
    );
    let error = plane.refused(Event::Cancel {
        reason: "too late".into(),
    });
    assert_eq!(
        error,
        RunError::RunFinished {
            status: RunStatus::Succeeded
        }
    );
}

#[test]
fn independent_steps_start_together_and_waits_complete_on_time() {
    let mut plane = Plane::new(template(
        "name: w\nsteps:\n  - { id: approve, type: approval }\n  - { id: pause, type: wait, with: { duration: 30s } }\n  - { id: deploy, type: deploy, needs: [approve, pause] }\n",
    ));
    assert_eq!(
        plane.actions(),
        [start_action("approve", 1), start_action("pause", 1)]
    );
    plane.at(5).start("approve", 1).start("pause", 1);
    assert_eq!(plane.actions(), [Action::WakeAt(at(35))]);
    // The wait belongs to the engine: the plane cannot end it early or as a job result.
    assert!(matches!(
        plane.refused(Event::WaitElapsed {
            step_id: "pause".into(),
            attempt: 1
        }),
        RunError::NotDue { due, .. } if due == at(35)
    ));
    assert!(matches!(
        plane.refused(Event::StepSucceeded {
            step_id: "pause".into(),
            attempt: 1,
            output: None
        }),
        RunError::WrongEvent { .. }
    ));
    plane.at(35);
    assert_eq!(
        plane.actions(),
        [Action::CompleteWait {
            step_id: "pause".into(),
            attempt: 1
        }]
    );
    plane.ok(Event::WaitElapsed {
        step_id: "pause".into(),
        attempt: 1,
    });
    // deploy still needs approve.
    assert_eq!(plane.actions(), []);
    let error = plane.refused(started("deploy", 1));
    assert!(matches!(error, RunError::NotStartable { .. }), "{error}");
    plane.succeed("approve", 1);
    assert_eq!(plane.actions(), [start_action("deploy", 1)]);
}

const RETRYING: &str = "\
name: w
steps:
  - id: deploy
    type: deploy
    retry: { count: 2, backoff: 5s, factor: 2 }
  - id: health
    type: health-check
    needs: [deploy]
    with: { container: true }
  - id: undo
    type: rollback
    when: on_failure
";

#[test]
fn failed_attempts_retry_after_growing_backoff_then_fail() {
    let mut plane = Plane::new(template(RETRYING));
    plane
        .at(10)
        .start("deploy", 1)
        .fail("deploy", 1, "pull failed");
    assert_eq!(
        plane.status("deploy"),
        &StepStatus::WaitingRetry {
            attempt: 2,
            at: at(15),
            last_failure: "pull failed".into()
        }
    );
    plane.at(12);
    assert_eq!(plane.actions(), [Action::WakeAt(at(15))]);
    let error = plane.refused(started("deploy", 2));
    assert_eq!(
        error,
        RunError::NotDue {
            step_id: "deploy".into(),
            due: at(15)
        }
    );
    plane.at(15);
    assert_eq!(plane.actions(), [start_action("deploy", 2)]);
    // Attempt numbers are checked both ways.
    assert!(matches!(
        plane.refused(started("deploy", 3)),
        RunError::WrongAttempt {
            current: 2,
            got: 3,
            ..
        }
    ));
    plane
        .start("deploy", 2)
        .at(20)
        .fail("deploy", 2, "pull failed again");
    // The second retry waits backoff × factor.
    assert_eq!(plane.actions(), [Action::WakeAt(at(30))]);
    plane.at(30);
    assert_eq!(plane.actions(), [start_action("deploy", 3)]);
    plane
        .start("deploy", 3)
        .at(31)
        .fail("deploy", 3, "registry down");

    assert_eq!(
        plane.status("deploy"),
        &StepStatus::Failed {
            attempt: 3,
            finished_at: at(31),
            reason: "registry down".into()
        }
    );
    assert_eq!(
        plane.status("health"),
        &skipped(SkipReason::NeedNotSucceeded {
            need: "deploy".into()
        })
    );
    assert_eq!(plane.actions(), [start_action("undo", 1)]);
    plane.start("undo", 1).succeed("undo", 1);
    assert_eq!(plane.actions(), [Action::Finish(RunOutcome::Failed)]);
}

#[test]
fn a_retry_that_succeeds_continues_the_run() {
    let mut plane = Plane::new(template(RETRYING));
    plane.start("deploy", 1).fail("deploy", 1, "flaky");
    plane.at(5).start("deploy", 2).succeed("deploy", 2);
    assert_eq!(plane.actions(), [start_action("health", 1)]);
    plane.start("health", 1).succeed("health", 1);
    assert_eq!(plane.actions(), [Action::Finish(RunOutcome::Succeeded)]);
    assert_eq!(plane.status("undo"), &skipped(SkipReason::NoFailure));
}

#[test]
fn timeouts_are_announced_when_due_and_late_results_are_refused() {
    let mut plane = Plane::new(template(
        "name: w\nsteps:\n  - { id: deploy, type: deploy, timeout: 10m, retry: { count: 1, backoff: 1m } }\n  - { id: undo, type: rollback, needs: [deploy], when: on_failure }\n",
    ));
    plane.at(100).start("deploy", 1);
    plane.at(699);
    assert_eq!(plane.actions(), [Action::WakeAt(at(700))]);
    assert!(matches!(
        plane.refused(Event::StepTimedOut {
            step_id: "deploy".into(),
            attempt: 1
        }),
        RunError::NotDue { due, .. } if due == at(700)
    ));
    plane.at(700);
    let timeout = Action::TimeoutStep {
        step_id: "deploy".into(),
        attempt: 1,
    };
    let first = plane.actions();
    assert_eq!(first, [timeout]);
    // Level-triggered: asking again says the same until the plane acts.
    assert_eq!(plane.actions(), first);
    plane.ok(Event::StepTimedOut {
        step_id: "deploy".into(),
        attempt: 1,
    });
    assert_eq!(
        plane.status("deploy"),
        &StepStatus::WaitingRetry {
            attempt: 2,
            at: at(760),
            last_failure: "timed out after 10m".into()
        }
    );
    // The timed-out attempt's job reports late: it cannot settle the step.
    assert!(matches!(
        plane.refused(Event::StepSucceeded {
            step_id: "deploy".into(),
            attempt: 1,
            output: None
        }),
        RunError::NotRunning { .. }
    ));
    plane.at(760).start("deploy", 2);
    assert!(matches!(
        plane.refused(Event::StepSucceeded {
            step_id: "deploy".into(),
            attempt: 1,
            output: None
        }),
        RunError::WrongAttempt {
            current: 2,
            got: 1,
            ..
        }
    ));
    plane.at(1360);
    assert_eq!(
        plane.actions(),
        [Action::TimeoutStep {
            step_id: "deploy".into(),
            attempt: 2
        }]
    );
    plane.ok(Event::StepTimedOut {
        step_id: "deploy".into(),
        attempt: 2,
    });
    assert_eq!(
        plane.status("deploy"),
        &StepStatus::Failed {
            attempt: 2,
            finished_at: at(1360),
            reason: "timed out after 10m".into()
        }
    );
    assert_eq!(plane.actions(), [start_action("undo", 1)]);
}

#[test]
fn health_failure_rolls_back_and_rejection_does_not() {
    let mut plane = Plane::new(WorkflowTemplate::default_deploy());
    plane
        .start("approve", 1)
        .succeed("approve", 1)
        .start("gate", 1)
        .succeed("gate", 1)
        .start("deploy", 1)
        .succeed("deploy", 1)
        .start("health", 1)
        .fail("health", 1, "unhealthy after 5m");
    assert_eq!(plane.actions(), [start_action("rollback", 1)]);
    plane.start("rollback", 1).succeed("rollback", 1);
    assert_eq!(plane.actions(), [Action::Finish(RunOutcome::Failed)]);
    assert_eq!(plane.state.status(), RunStatus::Failed);

    let mut rejected = Plane::new(WorkflowTemplate::default_deploy());
    rejected
        .start("approve", 1)
        .fail("approve", 1, "rejected by alice");
    let need = |need: &str| skipped(SkipReason::NeedNotSucceeded { need: need.into() });
    assert_eq!(rejected.status("gate"), &need("approve"));
    assert_eq!(rejected.status("deploy"), &need("gate"));
    assert_eq!(rejected.status("health"), &need("deploy"));
    // Nothing was deployed, so there is nothing to roll back.
    assert_eq!(rejected.status("rollback"), &skipped(SkipReason::NoFailure));
    assert_eq!(rejected.actions(), [Action::Finish(RunOutcome::Failed)]);
}

#[test]
fn a_failure_stops_new_work_in_parallel_branches_and_rollback_waits_for_them() {
    let mut plane = Plane::new(template(
        "\
name: w
steps:
  - { id: web, type: deploy }
  - { id: db, type: deploy, retry: { count: 3, backoff: 1s } }
  - { id: api, type: deploy }
  - { id: api-health, type: health-check, needs: [api], with: { container: true } }
  - { id: undo, type: rollback, when: on_failure }
  - { id: tell, type: notify, needs: [undo], when: always, with: { webhook: \"http://127.0.0.1:9/hook\" } }
",
    ));
    assert_eq!(
        plane.actions(),
        [
            start_action("web", 1),
            start_action("db", 1),
            start_action("api", 1)
        ]
    );
    plane.start("web", 1).start("db", 1).start("api", 1);
    plane.fail("db", 1, "flaky");
    assert!(matches!(
        plane.status("db"),
        StepStatus::WaitingRetry { .. }
    ));
    plane.fail("web", 1, "port in use");
    // db is not retried once the run has failed; api keeps running, its dependent will not start.
    assert_eq!(
        plane.status("db"),
        &StepStatus::Failed {
            attempt: 1,
            finished_at: at(0),
            reason: "flaky; not retried: run failed".into()
        }
    );
    assert_eq!(plane.status("api-health"), &skipped(SkipReason::RunFailed));
    // The rollback waits until api, still in flight, has settled.
    assert_eq!(plane.actions(), []);
    plane.succeed("api", 1);
    assert_eq!(plane.actions(), [start_action("undo", 1)]);
    plane.start("undo", 1).fail("undo", 1, "old image gone");
    // `always` runs after its need whatever the outcome.
    assert_eq!(plane.actions(), [start_action("tell", 1)]);
    plane.start("tell", 1).succeed("tell", 1);
    assert_eq!(plane.actions(), [Action::Finish(RunOutcome::Failed)]);
}

#[test]
fn cancel_stops_running_steps_skips_the_rest_and_runs_no_rollback() {
    let mut plane = Plane::new(template(
        "\
name: w
steps:
  - { id: deploy, type: deploy }
  - { id: pause, type: wait, with: { duration: 1h } }
  - { id: retrying, type: script, with: { command: [/bin/false] }, retry: { count: 1, backoff: 1m } }
  - { id: health, type: health-check, needs: [deploy], with: { container: true } }
  - { id: undo, type: rollback, when: on_failure }
",
    ));
    plane
        .start("deploy", 1)
        .start("pause", 1)
        .start("retrying", 1)
        .fail("retrying", 1, "exit 1");
    plane.at(10).ok(Event::Cancel {
        reason: "operator".into(),
    });
    assert_eq!(
        plane
            .state
            .cancel_request()
            .map(|cancel| cancel.reason.as_str()),
        Some("operator")
    );
    // The wait ends at once; nothing outside the engine runs it.
    assert_eq!(
        plane.status("pause"),
        &StepStatus::Failed {
            attempt: 1,
            finished_at: at(10),
            reason: "cancelled".into()
        }
    );
    assert!(
        matches!(plane.status("retrying"), StepStatus::Failed { reason, .. } if reason == "exit 1; not retried: run cancelled")
    );
    assert_eq!(plane.status("health"), &skipped(SkipReason::Cancelled));
    assert_eq!(plane.status("undo"), &skipped(SkipReason::Cancelled));
    assert_eq!(plane.state.status(), RunStatus::Running);
    assert_eq!(
        plane.actions(),
        [Action::CancelStep {
            step_id: "deploy".into(),
            attempt: 1
        }]
    );
    // Cancelling twice is harmless; starting anything is refused.
    plane.ok(Event::Cancel {
        reason: "again".into(),
    });
    assert_eq!(
        plane
            .state
            .cancel_request()
            .map(|cancel| cancel.reason.as_str()),
        Some("operator")
    );
    // The job reports how it ended.
    plane.fail("deploy", 1, "cancelled by the plane");
    assert_eq!(plane.state.status(), RunStatus::Cancelled);
    assert_eq!(plane.actions(), [Action::Finish(RunOutcome::Cancelled)]);
}

#[test]
fn resume_after_restart_never_restarts_settled_steps() {
    let mut plane = Plane::new(WorkflowTemplate::default_deploy());
    plane
        .start("approve", 1)
        .succeed("approve", 1)
        .at(5)
        .start("gate", 1)
        .succeed("gate", 1);
    // The plane created deploy's job, then died before recording the start: the same key
    // comes back, so the job is found instead of duplicated.
    let before_crash = plane.actions();
    assert_eq!(before_crash, [start_action("deploy", 1)]);
    let stored = serde_json::to_string(&plane.state).expect("serialize");
    let reloaded: RunState = serde_json::from_str(&stored).expect("deserialize");
    assert_eq!(reloaded, plane.state);
    assert_eq!(
        next_actions(&plane.template, &reloaded, plane.now).expect("actions"),
        before_crash
    );

    // Deploy runs; the plane restarts mid-deploy.
    plane.at(10).start("deploy", 1);
    let stored = serde_json::to_value(&plane.state).expect("serialize");
    assert_eq!(stored["status"], "running");
    assert_eq!(
        stored["steps"][2],
        json!({"id": "deploy", "status": {"state": "running", "attempt": 1, "started_at": "2030-03-17T17:46:50Z"}})
    );
    assert_eq!(stored["steps"][0]["status"]["state"], "succeeded");
    let mut resumed = Plane {
        template: WorkflowTemplate::default_deploy(),
        state: serde_json::from_value(stored).expect("deserialize"),
        now: at(20),
    };
    assert_eq!(resumed.state, plane.state);
    // Only deploy's timeout is pending: approve, gate and deploy are not started again.
    assert_eq!(resumed.actions(), [Action::WakeAt(at(10 + 30 * 60))]);
    // A start re-issued from an action list computed before the restart changes nothing.
    let before = resumed.state.clone();
    resumed.start("deploy", 1);
    assert_eq!(resumed.state, before);
    assert!(matches!(
        resumed.refused(started("approve", 1)),
        RunError::NotStartable { .. }
    ));
    resumed.succeed("deploy", 1);
    assert_eq!(resumed.actions(), [start_action("health", 1)]);
}

#[test]
fn refused_events_change_nothing() {
    let mut plane = Plane::new(WorkflowTemplate::default_deploy());
    assert_eq!(
        plane.refused(started("nope", 1)),
        RunError::UnknownStep {
            step_id: "nope".into()
        }
    );
    assert!(matches!(
        plane.refused(started("approve", 2)),
        RunError::WrongAttempt { .. }
    ));
    assert!(matches!(
        plane.refused(started("gate", 1)),
        RunError::NotStartable { .. }
    ));
    assert!(matches!(
        plane.refused(Event::StepSucceeded {
            step_id: "approve".into(),
            attempt: 1,
            output: None
        }),
        RunError::NotRunning {
            status: "pending",
            ..
        }
    ));
    assert!(matches!(
        plane.refused(Event::StepTimedOut {
            step_id: "approve".into(),
            attempt: 1
        }),
        RunError::NotRunning { .. }
    ));
    plane.start("approve", 1);
    assert!(matches!(
        plane.refused(Event::StepTimedOut {
            step_id: "approve".into(),
            attempt: 1
        }),
        RunError::WrongEvent { .. }
    ));

    // A state handed back with another template is refused by both entry points.
    let other = template("name: other\nsteps:\n  - { id: approve, type: approval }\n");
    assert!(matches!(
        next_actions(&other, &plane.state, plane.now),
        Err(RunError::TemplateMismatch { .. })
    ));
    let before = plane.state.clone();
    assert!(matches!(
        plane.state.apply(&other, started("approve", 1), plane.now),
        Err(RunError::TemplateMismatch { .. })
    ));
    assert_eq!(plane.state, before);

    // Unknown fields in stored state are refused, not dropped.
    let mut stored = serde_json::to_value(&plane.state).expect("serialize");
    stored["steps"][0]["status"]["atempt"] = json!(1);
    assert!(serde_json::from_value::<RunState>(stored).is_err());
}

#[test]
fn idempotency_keys_are_stable_and_distinct_per_attempt() {
    assert_eq!(idempotency_key("run-1", "deploy", 2), "wf/deploy/2/run-1");
    assert_ne!(
        idempotency_key("run-1", "deploy", 1),
        idempotency_key("run-1", "deploy", 2)
    );
    assert_ne!(
        idempotency_key("a/b", "c", 1),
        idempotency_key("a", "b/c", 1),
        "run ids containing '/' stay unambiguous"
    );
}

#[test]
fn a_template_of_failure_handlers_only_succeeds_at_once() {
    let plane = Plane::new(template(
        "name: w\nsteps:\n  - { id: undo, type: rollback, when: on_failure }\n",
    ));
    assert_eq!(plane.state.status(), RunStatus::Succeeded);
    assert_eq!(plane.actions(), [Action::Finish(RunOutcome::Succeeded)]);
}

#[test]
fn endings_come_before_starts_so_no_start_goes_stale() {
    let mut plane = Plane::new(template(
        "name: w\nsteps:\n  - { id: x, type: deploy, timeout: 10s }\n  - { id: y, type: deploy, retry: { count: 1, backoff: 10s } }\n",
    ));
    plane.start("x", 1).start("y", 1).fail("y", 1, "flaky");
    // At 10s x times out and y's retry is due: the timeout alone is offered first ...
    plane.at(10);
    assert_eq!(
        plane.actions(),
        [Action::TimeoutStep {
            step_id: "x".into(),
            attempt: 1
        }]
    );
    plane.ok(Event::StepTimedOut {
        step_id: "x".into(),
        attempt: 1,
    });
    // ... and once it failed the run, y's retry is abandoned instead of started.
    assert_eq!(
        plane.status("y"),
        &StepStatus::Failed {
            attempt: 1,
            finished_at: at(10),
            reason: "flaky; not retried: run failed".into()
        }
    );
    assert_eq!(plane.actions(), [Action::Finish(RunOutcome::Failed)]);
}
