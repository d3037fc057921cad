//! Ignore rules: known differences an operator chose to silence.
//!
//! A rule is a scope (one target, or every target of the environment the rules were loaded
//! for) and a selector: conditions that must all hold. The selector's string form is what
//! the CLI takes and the plane stores, e.g. `kind=unmanaged_extra`, `component=sidecar`,
//! `label:team=ops`, or several joined by commas: `kind=stopped,component=batch`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::finding::{Finding, FindingKind, UnknownKind};

/// The rules that apply to the targets of one environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IgnoreRules {
    rules: Vec<IgnoreRule>,
}

impl IgnoreRules {
    pub fn new(rules: Vec<IgnoreRule>) -> Self {
        Self { rules }
    }

    pub fn push(&mut self, rule: IgnoreRule) {
        self.rules.push(rule);
    }

    pub fn rules(&self) -> &[IgnoreRule] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule that silences `finding`, if any.
    pub fn silencing(&self, finding: &Finding) -> Option<&IgnoreRule> {
        self.rules.iter().find(|rule| rule.silences(finding))
    }
}

impl FromIterator<IgnoreRule> for IgnoreRules {
    fn from_iter<I: IntoIterator<Item = IgnoreRule>>(iter: I) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IgnoreRule {
    pub scope: IgnoreScope,
    pub selector: Selector,
}

impl IgnoreRule {
    pub fn new(scope: IgnoreScope, selector: Selector) -> Self {
        Self { scope, selector }
    }

    pub fn silences(&self, finding: &Finding) -> bool {
        let in_scope = match &self.scope {
            IgnoreScope::Environment => true,
            IgnoreScope::Target(target) => *target == finding.target,
        };
        in_scope && self.selector.matches(finding)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IgnoreScope {
    /// Every target of the environment whose rules these are: the plane passes an
    /// environment's rules only with that environment's targets.
    Environment,
    /// One target, by name.
    Target(String),
}

/// Conditions that must all hold for a finding to be silenced. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    conditions: Vec<Condition>,
}

impl Selector {
    pub fn new(conditions: Vec<Condition>) -> Result<Self, IgnoreRuleError> {
        if conditions.is_empty() {
            return Err(IgnoreRuleError::Empty);
        }
        Ok(Self { conditions })
    }

    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    pub fn matches(&self, finding: &Finding) -> bool {
        self.conditions.iter().all(|c| c.matches(finding))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `kind=<finding kind>`
    Kind(FindingKind),
    /// `component=<name>`: the finding's component. Findings without one never match.
    Component(String),
    /// `workload=<name>`: the finding's workload, for extras that carry neither a component
    /// nor labels.
    Workload(String),
    /// `label:<key>=<value>`: a label of the workloads concerned. Findings about nothing
    /// observed (a component with no workload reported at all, sticker_*) carry no labels and
    /// never match.
    Label { key: String, value: String },
}

impl Condition {
    pub fn matches(&self, finding: &Finding) -> bool {
        match self {
            Self::Kind(kind) => finding.kind == *kind,
            Self::Component(name) => finding.component.as_deref() == Some(name.as_str()),
            Self::Workload(name) => finding.workload.as_deref() == Some(name.as_str()),
            Self::Label { key, value } => finding.labels.get(key) == Some(value),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IgnoreRuleError {
    #[error(
        "empty ignore rule: give at least one of kind=KIND, component=NAME, workload=NAME, label:KEY=VALUE"
    )]
    Empty,
    #[error(
        "ignore rule condition {condition:?} has no '=': expected kind=KIND, component=NAME, workload=NAME or label:KEY=VALUE"
    )]
    MissingEquals { condition: String },
    #[error(
        "ignore rule condition {condition:?}: unknown field {field:?}: expected kind, component, workload or label:KEY"
    )]
    UnknownField { condition: String, field: String },
    #[error("ignore rule condition {condition:?} has an empty value")]
    EmptyValue { condition: String },
    #[error("ignore rule condition {condition:?} has an empty label key: expected label:KEY=VALUE")]
    EmptyLabelKey { condition: String },
    #[error("ignore rule condition {condition:?}: {source}")]
    Kind {
        condition: String,
        #[source]
        source: UnknownKind,
    },
}

impl FromStr for Condition {
    type Err = IgnoreRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let condition = s.trim();
        let (field, value) =
            condition
                .split_once('=')
                .ok_or_else(|| IgnoreRuleError::MissingEquals {
                    condition: condition.to_string(),
                })?;
        let (field, value) = (field.trim(), value.trim());
        if value.is_empty() {
            return Err(IgnoreRuleError::EmptyValue {
                condition: condition.to_string(),
            });
        }
        if let Some(key) = field.strip_prefix("label:") {
            let key = key.trim();
            if key.is_empty() {
                return Err(IgnoreRuleError::EmptyLabelKey {
                    condition: condition.to_string(),
                });
            }
            return Ok(Self::Label {
                key: key.to_string(),
                value: value.to_string(),
            });
        }
        match field {
            "kind" => value
                .parse()
                .map(Self::Kind)
                .map_err(|source| IgnoreRuleError::Kind {
                    condition: condition.to_string(),
                    source,
                }),
            "component" => Ok(Self::Component(value.to_string())),
            "workload" => Ok(Self::Workload(value.to_string())),
            _ => Err(IgnoreRuleError::UnknownField {
                condition: condition.to_string(),
                field: field.to_string(),
            }),
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kind(kind) => write!(f, "kind={kind}"),
            Self::Component(name) => write!(f, "component={name}"),
            Self::Workload(name) => write!(f, "workload={name}"),
            Self::Label { key, value } => write!(f, "label:{key}={value}"),
        }
    }
}

impl FromStr for Selector {
    type Err = IgnoreRuleError;

    /// Comma-separated conditions, all of which must hold.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(IgnoreRuleError::Empty);
        }
        let conditions = s
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<Condition>, _>>()?;
        Self::new(conditions)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, condition) in self.conditions.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{condition}")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for Selector {
    type Error = IgnoreRuleError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Selector> for String {
    fn from(selector: Selector) -> Self {
        selector.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_cli_forms_parse() {
        assert_eq!(
            "kind=unmanaged_extra"
                .parse::<Selector>()
                .unwrap()
                .conditions(),
            [Condition::Kind(FindingKind::UnmanagedExtra)]
        );
        assert_eq!(
            "component=sidecar"
                .parse::<Selector>()
                .unwrap()
                .conditions(),
            [Condition::Component("sidecar".into())]
        );
        assert_eq!(
            "label:team=ops".parse::<Selector>().unwrap().conditions(),
            [Condition::Label {
                key: "team".into(),
                value: "ops".into()
            }]
        );
    }

    #[test]
    fn conditions_combine_and_print_back_to_the_same_text() {
        let selector: Selector = " kind=stopped , label:app.tier=batch,workload=cron-1"
            .parse()
            .unwrap();
        assert_eq!(selector.conditions().len(), 3);
        assert_eq!(
            selector.to_string(),
            "kind=stopped,label:app.tier=batch,workload=cron-1"
        );
        assert_eq!(selector.to_string().parse::<Selector>().unwrap(), selector);
    }

    #[test]
    fn label_values_may_contain_equals_signs() {
        let selector: Selector = "label:expr=a=b".parse().unwrap();
        assert_eq!(
            selector.conditions(),
            [Condition::Label {
                key: "expr".into(),
                value: "a=b".into()
            }]
        );
    }

    #[test]
    fn bad_rules_are_refused_with_what_is_wrong() {
        let cases = [
            ("", IgnoreRuleError::Empty),
            ("   ", IgnoreRuleError::Empty),
            (
                "kind",
                IgnoreRuleError::MissingEquals {
                    condition: "kind".into(),
                },
            ),
            (
                "kind=stopped,",
                IgnoreRuleError::MissingEquals {
                    condition: "".into(),
                },
            ),
            (
                "team=ops",
                IgnoreRuleError::UnknownField {
                    condition: "team=ops".into(),
                    field: "team".into(),
                },
            ),
            (
                "component=",
                IgnoreRuleError::EmptyValue {
                    condition: "component=".into(),
                },
            ),
            (
                "label:=ops",
                IgnoreRuleError::EmptyLabelKey {
                    condition: "label:=ops".into(),
                },
            ),
            (
                "kind=drifted",
                IgnoreRuleError::Kind {
                    condition: "kind=drifted".into(),
                    source: UnknownKind {
                        given: "drifted".into(),
                    },
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Selector>(), Err(want), "{text:?}");
        }
        let message = "kind=drifted".parse::<Selector>().unwrap_err().to_string();
        assert!(
            message.contains("unknown drift kind \"drifted\""),
            "{message}"
        );
        assert!(message.contains("unmanaged_extra"), "{message}");
    }

    #[test]
    fn rules_serialize_with_the_selector_as_text_and_refuse_bad_text() {
        let rule = IgnoreRule::new(
            IgnoreScope::Target("web-1".into()),
            "kind=unmanaged_extra,label:team=ops".parse().unwrap(),
        );
        let json = serde_json::to_value(&rule).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "scope": {"target": "web-1"},
                "selector": "kind=unmanaged_extra,label:team=ops"
            })
        );
        assert_eq!(serde_json::from_value::<IgnoreRule>(json).unwrap(), rule);
        let bad = serde_json::json!({"scope": "environment", "selector": "kind=nope"});
        let err = serde_json::from_value::<IgnoreRule>(bad).unwrap_err();
        assert!(err.to_string().contains("unknown drift kind"), "{err}");
    }
}
