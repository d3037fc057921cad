//! YAML → [`WorkflowTemplate`], collecting every error with its line and column.
//!
//! The document is loaded as a tree of positioned nodes (saphyr's `MarkedYaml`) and walked by
//! hand instead of through serde: serde stops at the first error and loses positions for the
//! semantic checks (unknown `needs`, cycles), while operators want all problems at once, each
//! pointing at the line to fix.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use url::Url;

use crate::duration::parse_duration;
use crate::template::{
    DeploySpec, DeployStrategy, HealthCheckSpec, HealthProbe, NotifySpec, Retry, STEP_TYPES,
    ScriptSpec, Step, StepKind, WaitSpec, When, WorkflowTemplate,
};

/// Larger templates are refused before parsing (a template is a handful of steps).
pub const MAX_TEMPLATE_BYTES: usize = 256 * 1024;
pub const MAX_STEPS: usize = 200;
const MAX_ID_LEN: usize = 63;
const MAX_NAME_LEN: usize = 100;

/// One problem in a template, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Every problem found in one template, sorted by position. Displays one line per error:
/// `workflow.yaml:12:5: step "deploy-web": unknown step type "deplyo" (…)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct TemplateErrors {
    pub file: String,
    pub errors: Vec<TemplateError>,
}

impl fmt::Display for TemplateErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{error}", self.file)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    line: usize,
    column: usize,
}

impl Pos {
    const START: Pos = Pos { line: 1, column: 1 };

    fn of(node: &MarkedYaml<'_>) -> Pos {
        Pos {
            line: node.span.start.line().max(1),
            column: node.span.start.col() + 1,
        }
    }
}

#[derive(Default)]
struct Errors(Vec<TemplateError>);

impl Errors {
    fn at(&mut self, pos: Pos, message: impl Into<String>) {
        self.0.push(TemplateError {
            line: pos.line,
            column: pos.column,
            message: message.into(),
        });
    }
}

pub(crate) fn parse_template(
    file_name: &str,
    source: &str,
) -> Result<WorkflowTemplate, TemplateErrors> {
    let mut errors = Errors::default();
    let template = if source.len() > MAX_TEMPLATE_BYTES {
        errors.at(
            Pos::START,
            format!(
                "template is {} bytes, more than the maximum of {MAX_TEMPLATE_BYTES}",
                source.len()
            ),
        );
        None
    } else {
        load_document(source, &mut errors)
            .and_then(|document| read_template(&document, &mut errors))
    };
    match template {
        Some(template) if errors.0.is_empty() => Ok(template),
        _ => {
            let mut errors = errors.0;
            errors.sort_by_key(|error| (error.line, error.column));
            Err(TemplateErrors {
                file: file_name.to_owned(),
                errors,
            })
        }
    }
}

fn load_document<'a>(source: &'a str, errors: &mut Errors) -> Option<MarkedYaml<'a>> {
    let documents = match MarkedYaml::load_from_str(source) {
        Ok(documents) => documents,
        Err(scan) => {
            let marker = scan.marker();
            errors.at(
                Pos {
                    line: marker.line().max(1),
                    column: marker.col() + 1,
                },
                format!("invalid YAML: {}", scan.info()),
            );
            return None;
        }
    };
    let mut documents = documents.into_iter();
    let Some(first) = documents.next() else {
        errors.at(Pos::START, "the template is empty");
        return None;
    };
    if let Some(second) = documents.next() {
        errors.at(
            Pos::of(&second),
            "a template is one YAML document; found another one here",
        );
        return None;
    }
    if matches!(
        first.data,
        YamlData::BadValue | YamlData::Value(Scalar::Null)
    ) {
        errors.at(Pos::of(&first), "the template is empty");
        return None;
    }
    Some(first)
}

/// A step as far as it could be read: what the graph checks need, and the step itself when
/// every field was valid.
struct StepDraft {
    pos: Pos,
    id: Option<String>,
    when: Option<When>,
    needs: Vec<(String, Pos)>,
    step: Option<Step>,
}

fn read_template(root: &MarkedYaml<'_>, errors: &mut Errors) -> Option<WorkflowTemplate> {
    let fields = Fields::read(
        root,
        &["name", "description", "steps"],
        "",
        "the template",
        errors,
    )?;
    let name = match fields.get("name") {
        Some(node) => text(node, "", "name", errors).and_then(|name| {
            if name.trim().is_empty() || name.len() > MAX_NAME_LEN {
                errors.at(
                    Pos::of(node),
                    format!("name must be 1 to {MAX_NAME_LEN} characters"),
                );
                None
            } else {
                Some(name)
            }
        }),
        None => {
            errors.at(Pos::of(root), "missing \"name\"");
            None
        }
    };
    let description = fields
        .get("description")
        .and_then(|node| text(node, "", "description", errors));
    let drafts = match fields.get("steps") {
        Some(node) => read_steps(node, errors),
        None => {
            errors.at(Pos::of(root), "missing \"steps\"");
            Vec::new()
        }
    };
    check_graph(&drafts, errors);
    let steps: Option<Vec<Step>> = drafts.into_iter().map(|draft| draft.step).collect();
    Some(WorkflowTemplate {
        name: name?,
        description,
        steps: steps?,
    })
}

fn read_steps(node: &MarkedYaml<'_>, errors: &mut Errors) -> Vec<StepDraft> {
    let YamlData::Sequence(items) = &node.data else {
        errors.at(
            Pos::of(node),
            format!("steps must be a list, found {}", describe(node)),
        );
        return Vec::new();
    };
    if items.is_empty() {
        errors.at(
            Pos::of(node),
            "steps is empty; a workflow needs at least one step",
        );
    }
    if items.len() > MAX_STEPS {
        errors.at(
            Pos::of(node),
            format!(
                "{} steps, more than the maximum of {MAX_STEPS}",
                items.len()
            ),
        );
        return Vec::new();
    }
    items
        .iter()
        .enumerate()
        .map(|(index, item)| read_step(item, index + 1, errors))
        .collect()
}

const STEP_KEYS: [&str; 7] = ["id", "type", "needs", "with", "retry", "timeout", "when"];

fn read_step(node: &MarkedYaml<'_>, number: usize, errors: &mut Errors) -> StepDraft {
    let pos = Pos::of(node);
    let mut draft = StepDraft {
        pos,
        id: None,
        when: None,
        needs: Vec::new(),
        step: None,
    };
    // Errors found before the id is known are labelled by the step's position in the list.
    let mut scope = format!("step {number}: ");
    let error_count = errors.0.len();
    let Some(fields) = Fields::read(node, &STEP_KEYS, &scope, "a step", errors) else {
        return draft;
    };
    match fields.get("id") {
        Some(id_node) => {
            if let Some(id) = text(id_node, &scope, "id", errors) {
                if valid_id(&id) {
                    scope = format!("step {id:?}: ");
                    draft.id = Some(id);
                } else {
                    errors.at(
                        Pos::of(id_node),
                        format!(
                            "{scope}invalid step id {id:?} (use lowercase letters, digits, '-' \
                             and '_', starting with a letter or digit, at most {MAX_ID_LEN} \
                             characters)"
                        ),
                    );
                }
            }
        }
        None => errors.at(pos, format!("{scope}missing \"id\"")),
    }

    let step_type = match fields.get("type") {
        Some(type_node) => text(type_node, &scope, "type", errors).and_then(|name| {
            if STEP_TYPES.contains(&name.as_str()) {
                Some(name)
            } else {
                errors.at(
                    Pos::of(type_node),
                    format!(
                        "{scope}unknown step type {name:?}{} (expected one of {})",
                        did_you_mean(&name, &STEP_TYPES),
                        STEP_TYPES.join(", ")
                    ),
                );
                None
            }
        }),
        None => {
            errors.at(pos, format!("{scope}missing \"type\""));
            None
        }
    };

    draft.when = match fields.get("when") {
        Some(when_node) => read_when(when_node, &scope, errors),
        None => Some(When::OnSuccess),
    };
    if let Some(needs_node) = fields.get("needs") {
        draft.needs = read_needs(needs_node, &scope, errors);
    }

    let timeout = fields.get("timeout").and_then(|timeout_node| {
        if step_type.as_deref() == Some("wait") {
            errors.at(
                Pos::of(timeout_node),
                format!("{scope}a wait step takes no timeout (its duration is the wait)"),
            );
            return None;
        }
        positive_duration(timeout_node, &scope, "timeout", errors)
    });
    let retry = match fields.get("retry") {
        Some(retry_node) => match step_type.as_deref() {
            Some(kind @ ("approval" | "wait")) => {
                errors.at(
                    Pos::of(retry_node),
                    format!("{scope}a {kind} step cannot be retried"),
                );
                None
            }
            _ => read_retry(retry_node, &scope, errors),
        },
        None => Some(Retry::NONE),
    };
    let kind = step_type.and_then(|name| read_kind(&name, fields.get("with"), pos, &scope, errors));

    if let (true, Some(id), Some(kind), Some(retry), Some(when)) = (
        errors.0.len() == error_count,
        draft.id.clone(),
        kind,
        retry,
        draft.when,
    ) {
        draft.step = Some(Step {
            id,
            kind,
            needs: draft.needs.iter().map(|(need, _)| need.clone()).collect(),
            retry,
            timeout,
            when,
        });
    }
    draft
}

fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= MAX_ID_LEN
        && chars
            .next()
            .is_some_and(|first| first.is_ascii_lowercase() || first.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn read_when(node: &MarkedYaml<'_>, scope: &str, errors: &mut Errors) -> Option<When> {
    let value = text(node, scope, "when", errors)?;
    let known = [When::OnSuccess, When::OnFailure, When::Always];
    match known.into_iter().find(|when| when.as_str() == value) {
        Some(when) => Some(when),
        None => {
            let names = known.map(When::as_str);
            errors.at(
                Pos::of(node),
                format!(
                    "{scope}unknown when {value:?}{} (expected one of {})",
                    did_you_mean(&value, &names),
                    names.join(", ")
                ),
            );
            None
        }
    }
}

fn read_needs(node: &MarkedYaml<'_>, scope: &str, errors: &mut Errors) -> Vec<(String, Pos)> {
    let YamlData::Sequence(items) = &node.data else {
        errors.at(
            Pos::of(node),
            format!(
                "{scope}needs must be a list of step ids, found {}",
                describe(node)
            ),
        );
        return Vec::new();
    };
    let mut needs: Vec<(String, Pos)> = Vec::new();
    for item in items {
        let Some(need) = text(item, scope, "each entry of needs", errors) else {
            continue;
        };
        if needs.iter().any(|(seen, _)| *seen == need) {
            errors.at(Pos::of(item), format!("{scope}needs lists {need:?} twice"));
            continue;
        }
        needs.push((need, Pos::of(item)));
    }
    needs
}

fn read_retry(node: &MarkedYaml<'_>, scope: &str, errors: &mut Errors) -> Option<Retry> {
    let fields = Fields::read(
        node,
        &["count", "backoff", "factor"],
        scope,
        "retry",
        errors,
    )?;
    let count = match fields.get("count") {
        Some(count_node) => integer_in(
            count_node,
            scope,
            "retry count",
            0,
            Retry::MAX_COUNT,
            errors,
        ),
        None => {
            errors.at(Pos::of(node), format!("{scope}retry needs \"count\""));
            None
        }
    };
    let backoff = match fields.get("backoff") {
        Some(backoff_node) => duration(backoff_node, scope, "backoff", errors),
        None => Some(Retry::DEFAULT_BACKOFF),
    };
    let factor = match fields.get("factor") {
        Some(factor_node) => integer_in(
            factor_node,
            scope,
            "retry factor",
            1,
            Retry::MAX_FACTOR,
            errors,
        ),
        None => Some(Retry::DEFAULT_FACTOR),
    };
    Some(Retry {
        count: count?,
        backoff: backoff?,
        factor: factor?,
    })
}

fn read_kind(
    name: &str,
    with: Option<&MarkedYaml<'_>>,
    step_pos: Pos,
    scope: &str,
    errors: &mut Errors,
) -> Option<StepKind> {
    let without_with = |kind: StepKind, errors: &mut Errors| match with {
        Some(node) => {
            errors.at(
                Pos::of(node),
                format!("{scope}a {name} step takes no \"with\""),
            );
            None
        }
        None => Some(kind),
    };
    let required = |errors: &mut Errors, needed: &str| {
        if with.is_none() {
            errors.at(
                step_pos,
                format!("{scope}a {name} step needs \"with\" ({needed})"),
            );
        }
        with
    };
    match name {
        "approval" => without_with(StepKind::Approval, errors),
        "gate" => without_with(StepKind::Gate, errors),
        "rollback" => without_with(StepKind::Rollback, errors),
        "deploy" => match with {
            Some(node) => read_deploy(node, scope, errors).map(StepKind::Deploy),
            None => Some(StepKind::Deploy(DeploySpec {
                strategy: DeployStrategy::AllAtOnce,
            })),
        },
        "health-check" => read_health_check(
            required(errors, "\"http\" or \"container\"")?,
            scope,
            errors,
        )
        .map(StepKind::HealthCheck),
        "script" => {
            read_script(required(errors, "\"command\"")?, scope, errors).map(StepKind::Script)
        }
        "notify" => {
            read_notify(required(errors, "\"webhook\"")?, scope, errors).map(StepKind::Notify)
        }
        "wait" => read_wait(required(errors, "\"duration\"")?, scope, errors).map(StepKind::Wait),
        _ => None,
    }
}

fn read_deploy(node: &MarkedYaml<'_>, scope: &str, errors: &mut Errors) -> Option<DeploySpec> {
    let fields = Fields::read(
        node,
        &["strategy", "batch_size", "max_unavailable"],
        scope,
        "with",
        errors,
    )?;
    let strategies = ["all-at-once", "rolling", "blue-green"];
    let strategy = match fields.get("strategy") {
        Some(strategy_node) => {
            let name = text(strategy_node, scope, "strategy", errors)?;
            if !strategies.contains(&name.as_str()) {
                errors.at(
                    Pos::of(strategy_node),
                    format!(
                        "{scope}unknown strategy {name:?}{} (expected one of {})",
                        did_you_mean(&name, &strategies),
                        strategies.join(", ")
                    ),
                );
                return None;
            }
            name
        }
        None => "all-at-once".to_owned(),
    };
    if strategy != "rolling" {
        for key in ["batch_size", "max_unavailable"] {
            if let Some(extra) = fields.get(key) {
                errors.at(
                    Pos::of(extra),
                    format!("{scope}{key} only applies to strategy rolling"),
                );
            }
        }
    }
    let strategy = match strategy.as_str() {
        "rolling" => {
            let Some(batch_node) = fields.get("batch_size") else {
                errors.at(
                    Pos::of(node),
                    format!("{scope}strategy rolling needs \"batch_size\""),
                );
                return None;
            };
            let batch_size = integer_in(batch_node, scope, "batch_size", 1, 10_000, errors)?;
            let max_unavailable = match fields.get("max_unavailable") {
                Some(unavailable_node) => integer_in(
                    unavailable_node,
                    scope,
                    "max_unavailable",
                    0,
                    batch_size,
                    errors,
                )?,
                None => batch_size,
            };
            DeployStrategy::Rolling {
                batch_size,
                max_unavailable,
            }
        }
        "blue-green" => DeployStrategy::BlueGreen,
        _ => DeployStrategy::AllAtOnce,
    };
    Some(DeploySpec { strategy })
}

fn read_health_check(
    node: &MarkedYaml<'_>,
    scope: &str,
    errors: &mut Errors,
) -> Option<HealthCheckSpec> {
    let fields = Fields::read(
        node,
        &["http", "container", "interval", "healthy_after"],
        scope,
        "with",
        errors,
    )?;
    let probe = match (fields.get("http"), fields.get("container")) {
        (Some(_), Some(container)) => {
            errors.at(
                Pos::of(container),
                format!("{scope}choose one probe: \"http\" or \"container\", not both"),
            );
            None
        }
        (Some(http), None) => read_http_probe(http, scope, errors),
        (None, Some(container)) => match boolean(container, scope, "container", errors)? {
            true => Some(HealthProbe::Container),
            false => {
                errors.at(
                    Pos::of(container),
                    format!("{scope}container: false is no probe; use container: true or http"),
                );
                None
            }
        },
        (None, None) => {
            errors.at(
                Pos::of(node),
                format!("{scope}a health check needs \"http\" or \"container\""),
            );
            None
        }
    };
    let interval = match fields.get("interval") {
        Some(interval_node) => positive_duration(interval_node, scope, "interval", errors),
        None => Some(Duration::from_secs(2)),
    };
    let healthy_after = match fields.get("healthy_after") {
        Some(after_node) => integer_in(after_node, scope, "healthy_after", 1, 100, errors),
        None => Some(1),
    };
    Some(HealthCheckSpec {
        probe: probe?,
        interval: interval?,
        healthy_after: healthy_after?,
    })
}

fn read_http_probe(node: &MarkedYaml<'_>, scope: &str, errors: &mut Errors) -> Option<HealthProbe> {
    let fields = Fields::read(node, &["url", "expect_status"], scope, "http", errors)?;
    let url = match fields.get("url") {
        Some(url_node) => http_url(url_node, scope, "url", errors),
        None => {
            errors.at(Pos::of(node), format!("{scope}http needs \"url\""));
            None
        }
    };
    let expect_status = match fields.get("expect_status") {
        Some(status_node) => integer_in(status_node, scope, "expect_status", 100, 599, errors)
            .and_then(|status| u16::try_from(status).ok()),
        None => Some(200),
    };
    Some(HealthProbe::Http {
        url: url?,
        expect_status: expect_status?,
    })
}

fn read_script(node: &MarkedYaml<'_>, scope: &str, errors: &mut Errors) -> Option<ScriptSpec> {
    let fields = Fields::read(node, &["command"], scope, "with", errors)?;
    let Some(command_node) = fields.get("command") else {
        errors.at(
            Pos::of(node),
            format!("{scope}a script step needs \"command\""),
        );
        return None;
    };
    let YamlData::Sequence(items) = &command_node.data else {
        errors.at(
            Pos::of(command_node),
            format!(
                "{scope}command must be a list (argv), e.g. [\"/bin/sh\", \"-c\", \"…\"], found {}",
                describe(command_node)
            ),
        );
        return None;
    };
    let command: Option<Vec<String>> = items
        .iter()
        .map(|item| text(item, scope, "each command argument", errors))
        .collect();
    let command = command?;
    match command.first() {
        Some(program) if !program.is_empty() => Some(ScriptSpec { command }),
        _ => {
            errors.at(
                Pos::of(command_node),
                format!("{scope}command needs a program to run"),
            );
            None
        }
    }
}

fn read_notify(node: &MarkedYaml<'_>, scope: &str, errors: &mut Errors) -> Option<NotifySpec> {
    let fields = Fields::read(node, &["webhook", "message"], scope, "with", errors)?;
    let webhook = match fields.get("webhook") {
        Some(webhook_node) => http_url(webhook_node, scope, "webhook", errors),
        None => {
            errors.at(
                Pos::of(node),
                format!("{scope}a notify step needs \"webhook\""),
            );
            None
        }
    };
    let message = match fields.get("message") {
        Some(message_node) => Some(text(message_node, scope, "message", errors)?),
        None => None,
    };
    Some(NotifySpec {
        webhook: webhook?,
        message,
    })
}

fn read_wait(node: &MarkedYaml<'_>, scope: &str, errors: &mut Errors) -> Option<WaitSpec> {
    let fields = Fields::read(node, &["duration"], scope, "with", errors)?;
    let Some(duration_node) = fields.get("duration") else {
        errors.at(
            Pos::of(node),
            format!("{scope}a wait step needs \"duration\""),
        );
        return None;
    };
    let duration = positive_duration(duration_node, scope, "duration", errors)?;
    Some(WaitSpec { duration })
}

/// Checks that need every step: unique ids, `needs` that exist, no cycle, and no `on_success`
/// step that depends on an `on_failure` one (it could never run: a failure stops new
/// `on_success` work).
///
/// An `on_failure` or `always` step without `needs` runs after every `on_success` step; those
/// implicit edges take part in the cycle check, or an `on_success` step that depends on such
/// a step would wait for itself.
fn check_graph(drafts: &[StepDraft], errors: &mut Errors) {
    let mut index_of: HashMap<&str, usize> = HashMap::new();
    for (index, draft) in drafts.iter().enumerate() {
        let Some(id) = draft.id.as_deref() else {
            continue;
        };
        if let Some(&first) = index_of.get(id) {
            errors.at(
                draft.pos,
                format!(
                    "step {id:?}: duplicate step id (first defined at line {})",
                    drafts[first].pos.line
                ),
            );
        } else {
            index_of.insert(id, index);
        }
    }
    let known_ids: Vec<&str> = index_of.keys().copied().collect();
    let mut edges: Vec<Vec<Edge>> = vec![Vec::new(); drafts.len()];
    for (index, draft) in drafts.iter().enumerate() {
        let scope = match &draft.id {
            Some(id) => format!("step {id:?}: "),
            None => format!("step {}: ", index + 1),
        };
        for (need, pos) in &draft.needs {
            match index_of.get(need.as_str()) {
                None => errors.at(
                    *pos,
                    format!(
                        "{scope}needs unknown step {need:?}{}",
                        did_you_mean(need, &known_ids)
                    ),
                ),
                Some(&target) if target == index => {
                    errors.at(*pos, format!("{scope}a step cannot need itself"));
                }
                Some(&target) => {
                    if draft.when == Some(When::OnSuccess)
                        && drafts[target].when == Some(When::OnFailure)
                    {
                        errors.at(
                            *pos,
                            format!(
                                "{scope}needs {need:?}, which runs only on failure, so this \
                                 on_success step could never run (use when: always or \
                                 on_failure)"
                            ),
                        );
                        // Already reported; the cycle it also closes would say it twice.
                        continue;
                    }
                    edges[index].push(Edge {
                        target,
                        pos: *pos,
                        implicit: false,
                    });
                }
            }
        }
        if draft.needs.is_empty() && matches!(draft.when, Some(When::OnFailure | When::Always)) {
            for (target, other) in drafts.iter().enumerate() {
                if target != index && other.when == Some(When::OnSuccess) {
                    edges[index].push(Edge {
                        target,
                        pos: draft.pos,
                        implicit: true,
                    });
                }
            }
        }
    }
    report_cycles(drafts, &edges, errors);
}

/// "The step this edge starts from waits for `target`."
#[derive(Clone, Copy)]
struct Edge {
    target: usize,
    /// Where to report a cycle this edge closes.
    pos: Pos,
    /// Not written in `needs`: a step without needs waiting for every `on_success` step.
    implicit: bool,
}

fn report_cycles(drafts: &[StepDraft], edges: &[Vec<Edge>], errors: &mut Errors) {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        node: usize,
        edges: &[Vec<Edge>],
        marks: &mut [Mark],
        path: &mut Vec<usize>,
        cycles: &mut Vec<(Vec<usize>, Pos)>,
    ) {
        marks[node] = Mark::OnPath;
        path.push(node);
        for edge in &edges[node] {
            match marks[edge.target] {
                Mark::New => visit(edge.target, edges, marks, path, cycles),
                Mark::OnPath => {
                    let start = path
                        .iter()
                        .position(|&step| step == edge.target)
                        .unwrap_or(0);
                    cycles.push((path[start..].to_vec(), edge.pos));
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[node] = Mark::Done;
    }
    let mut marks = vec![Mark::New; drafts.len()];
    let mut cycles = Vec::new();
    for start in 0..drafts.len() {
        if marks[start] == Mark::New {
            visit(start, edges, &mut marks, &mut Vec::new(), &mut cycles);
        }
    }
    for (cycle, pos) in cycles {
        let id = |index: usize| drafts[index].id.as_deref().unwrap_or("?");
        let Some(&last) = cycle.last() else {
            continue;
        };
        let links: Vec<String> = cycle
            .iter()
            .zip(cycle.iter().skip(1).chain(cycle.first()))
            .map(|(&from, &to)| {
                let implicit = edges[from]
                    .iter()
                    .find(|edge| edge.target == to)
                    .is_some_and(|edge| edge.implicit);
                match (implicit, drafts[from].when) {
                    (true, Some(when)) => format!(
                        "{} (no needs, when: {}) runs after {}",
                        id(from),
                        when.as_str(),
                        id(to)
                    ),
                    _ => format!("{} needs {}", id(from), id(to)),
                }
            })
            .collect();
        errors.at(
            pos,
            format!(
                "step {:?}: needs form a cycle: {}",
                id(last),
                links.join(", ")
            ),
        );
    }
}

/// The string-keyed entries of a mapping, after checking every key is allowed.
struct Fields<'n, 'y> {
    entries: Vec<(&'n str, &'n MarkedYaml<'y>)>,
}

impl<'n, 'y> Fields<'n, 'y> {
    fn read(
        node: &'n MarkedYaml<'y>,
        allowed: &[&str],
        scope: &str,
        what: &str,
        errors: &mut Errors,
    ) -> Option<Self> {
        let YamlData::Mapping(mapping) = &node.data else {
            errors.at(
                Pos::of(node),
                format!("{scope}{what} must be a mapping, found {}", describe(node)),
            );
            return None;
        };
        let mut entries = Vec::new();
        for (key, value) in mapping {
            let YamlData::Value(Scalar::String(name)) = &key.data else {
                errors.at(
                    Pos::of(key),
                    format!("{scope}keys must be names, found {}", describe(key)),
                );
                continue;
            };
            if allowed.contains(&name.as_ref()) {
                entries.push((name.as_ref(), value));
            } else {
                errors.at(
                    Pos::of(key),
                    format!(
                        "{scope}unknown key {name:?} in {what}{} (expected one of {})",
                        did_you_mean(name, allowed),
                        allowed.join(", ")
                    ),
                );
            }
        }
        Some(Fields { entries })
    }

    fn get(&self, name: &str) -> Option<&'n MarkedYaml<'y>> {
        self.entries
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| *value)
    }
}

fn describe(node: &MarkedYaml<'_>) -> &'static str {
    match &node.data {
        YamlData::Value(Scalar::Null) | YamlData::BadValue => "nothing",
        YamlData::Value(Scalar::Boolean(_)) => "a boolean",
        YamlData::Value(Scalar::Integer(_) | Scalar::FloatingPoint(_)) => "a number",
        YamlData::Value(Scalar::String(_)) | YamlData::Representation(..) => "a string",
        YamlData::Sequence(_) => "a list",
        YamlData::Mapping(_) => "a mapping",
        YamlData::Tagged(..) => "a tagged value (tags are not supported)",
        YamlData::Alias(_) => "an alias",
    }
}

fn text(node: &MarkedYaml<'_>, scope: &str, field: &str, errors: &mut Errors) -> Option<String> {
    match &node.data {
        YamlData::Value(Scalar::String(value)) => Some(value.to_string()),
        _ => {
            errors.at(
                Pos::of(node),
                format!("{scope}{field} must be a string, found {}", describe(node)),
            );
            None
        }
    }
}

fn boolean(node: &MarkedYaml<'_>, scope: &str, field: &str, errors: &mut Errors) -> Option<bool> {
    match &node.data {
        YamlData::Value(Scalar::Boolean(value)) => Some(*value),
        _ => {
            errors.at(
                Pos::of(node),
                format!(
                    "{scope}{field} must be true or false, found {}",
                    describe(node)
                ),
            );
            None
        }
    }
}

fn integer_in(
    node: &MarkedYaml<'_>,
    scope: &str,
    field: &str,
    min: u32,
    max: u32,
    errors: &mut Errors,
) -> Option<u32> {
    let in_range = match &node.data {
        YamlData::Value(Scalar::Integer(value)) => u32::try_from(*value)
            .ok()
            .filter(|value| (min..=max).contains(value)),
        _ => {
            errors.at(
                Pos::of(node),
                format!(
                    "{scope}{field} must be a whole number, found {}",
                    describe(node)
                ),
            );
            return None;
        }
    };
    if in_range.is_none() {
        errors.at(
            Pos::of(node),
            format!("{scope}{field} must be between {min} and {max}"),
        );
    }
    in_range
}

fn duration(
    node: &MarkedYaml<'_>,
    scope: &str,
    field: &str,
    errors: &mut Errors,
) -> Option<Duration> {
    let YamlData::Value(Scalar::String(value)) = &node.data else {
        errors.at(
            Pos::of(node),
            format!(
                "{scope}{field} must be a duration such as 500ms, 5s, 10m or 1h, found {}",
                describe(node)
            ),
        );
        return None;
    };
    match parse_duration(value) {
        Ok(parsed) => Some(parsed),
        Err(message) => {
            errors.at(Pos::of(node), format!("{scope}{field}: {message}"));
            None
        }
    }
}

fn positive_duration(
    node: &MarkedYaml<'_>,
    scope: &str,
    field: &str,
    errors: &mut Errors,
) -> Option<Duration> {
    let parsed = duration(node, scope, field, errors)?;
    if parsed.is_zero() {
        errors.at(
            Pos::of(node),
            format!("{scope}{field} must be longer than 0s"),
        );
        return None;
    }
    Some(parsed)
}

fn http_url(node: &MarkedYaml<'_>, scope: &str, field: &str, errors: &mut Errors) -> Option<Url> {
    let value = text(node, scope, field, errors)?;
    let problem = match Url::parse(&value) {
        Ok(url) if !matches!(url.scheme(), "http" | "https") => {
            format!("{field} {value:?} must be an http or https URL")
        }
        Ok(url) if url.host().is_none() => format!("{field} {value:?} has no host"),
        Ok(url) if !url.username().is_empty() || url.password().is_some() => {
            // Credentials in a template end up in logs and the database: refuse them.
            format!("{field} must not carry credentials; use a secret reference instead")
        }
        Ok(url) => return Some(url),
        Err(error) => format!("{field} {value:?} is not a valid URL: {error}"),
    };
    errors.at(Pos::of(node), format!("{scope}{problem}"));
    None
}

/// ` (did you mean "x"?)` when a candidate is within two edits of `word`, else nothing.
fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|candidate| (edit_distance(word, candidate), *candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, candidate)| format!(", did you mean {candidate:?}?"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_only_for_near_misses() {
        assert_eq!(edit_distance("deplyo", "deploy"), 2);
        assert_eq!(
            did_you_mean("deplyo", &STEP_TYPES),
            ", did you mean \"deploy\"?"
        );
        assert_eq!(did_you_mean("frobnicate", &STEP_TYPES), "");
    }
}
