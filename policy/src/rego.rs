//! Policy in Rego: the environment's modules, evaluated with `regorus` against the input
//! document.
//!
//! Contract: modules are Rego v1. In modules whose package is `stella.promotion`,
//! - `deny`, if declared, must be a set (or array) of messages; any message fails the gate;
//! - `allow`, if declared, must be `true`; `false` or undefined fails the gate.
//!
//! At least one of them must be declared. Everything else fails closed: a module that does
//! not parse, an evaluation error, the time limit, an undefined or mistyped result, even a
//! panic inside the interpreter, each fails the gate with the error in the reason.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{Engine, Value};
use serde::{Deserialize, Serialize};

use crate::error::PolicyError;
use crate::gates::{Gate, GateResult};
use crate::input::PromotionInput;

/// The package the gate reads `deny` and `allow` from.
pub const PACKAGE: &str = "stella.promotion";
const PACKAGE_COMPONENTS: [&str; 2] = ["stella", "promotion"];
const DENY: &str = "data.stella.promotion.deny";
const ALLOW: &str = "data.stella.promotion.allow";

/// How long one rule (`deny` or `allow`) may evaluate before the gate fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Work units between clock reads; small enough that the limit is honoured closely.
const TIMER_CHECK_INTERVAL: u32 = 64;

/// The Rego modules of an environment, by name (the name appears in parse errors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySet {
    modules: BTreeMap<String, String>,
    #[serde(skip, default = "default_timeout")]
    timeout: Duration,
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::new(BTreeMap::new())
    }
}

impl PolicySet {
    pub fn new(modules: BTreeMap<String, String>) -> Self {
        Self {
            modules,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn modules(&self) -> &BTreeMap<String, String> {
        &self.modules
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// `sha256:…` of the canonical JSON of the modules (name → source): which policy decided.
    pub fn digest(&self) -> Result<String, PolicyError> {
        Ok(stella_pki::canonical_digest(&self.modules)?)
    }

    /// Parses every module and checks that `deny` or `allow` is declared in package
    /// `stella.promotion`, so a bad policy can be refused when it is stored rather than
    /// when it blocks a promotion.
    pub fn check(&self) -> Result<(), PolicyError> {
        let engine = self.load()?;
        let declared = Declared::find(&engine).map_err(|message| PolicyError::InvalidModule {
            name: self.modules.keys().cloned().collect::<Vec<_>>().join(", "),
            message,
        })?;
        if !declared.deny && !declared.allow {
            return Err(PolicyError::InvalidModule {
                name: self.modules.keys().cloned().collect::<Vec<_>>().join(", "),
                message: format!("no module declares {DENY} or {ALLOW}"),
            });
        }
        Ok(())
    }

    fn load(&self) -> Result<Engine, PolicyError> {
        let mut engine = Engine::new();
        engine.set_rego_v0(false);
        engine.set_strict_builtin_errors(true);
        engine.set_execution_timer_config(ExecutionTimerConfig {
            limit: self.timeout,
            check_interval: NonZeroU32::new(TIMER_CHECK_INTERVAL).unwrap_or(NonZeroU32::MIN),
        });
        for (name, source) in &self.modules {
            engine
                .add_policy(name.clone(), source.clone())
                .map_err(|e| PolicyError::InvalidModule {
                    name: name.clone(),
                    message: format!("does not parse: {}", e.to_string().trim()),
                })?;
        }
        Ok(engine)
    }

    /// The policy gate for `input`.
    pub(crate) fn gate(&self, input: &PromotionInput) -> GateResult {
        if self.modules.is_empty() {
            return GateResult::passed(Gate::Policy, "no Rego policies");
        }
        // An interpreter bug must not turn into an open gate or a crashed control plane.
        match catch_unwind(AssertUnwindSafe(|| self.evaluate(input))) {
            Ok(Ok(reason)) => GateResult::passed(Gate::Policy, reason),
            Ok(Err(reason)) => GateResult::failed(Gate::Policy, reason),
            Err(_) => GateResult::failed(
                Gate::Policy,
                "the Rego interpreter panicked (fail closed)".to_string(),
            ),
        }
    }

    /// `Ok(reason)` to pass, `Err(reason)` to fail.
    fn evaluate(&self, input: &PromotionInput) -> Result<String, String> {
        let mut engine = self.load().map_err(|e| e.to_string())?;
        let declared = Declared::find(&engine)?;
        if !declared.deny && !declared.allow {
            return Err(format!(
                "no module declares {DENY} or {ALLOW} (fail closed)"
            ));
        }
        let document = serde_json::to_string(input)
            .map_err(|e| format!("the input document does not serialize: {e}"))?;
        let document = Value::from_json_str(&document)
            .map_err(|e| format!("the input document does not load: {e}"))?;
        engine.set_input(document);

        let mut passed = Vec::new();
        if declared.deny {
            let messages = match eval(&mut engine, DENY)? {
                Value::Set(set) => set.iter().map(message).collect::<Vec<_>>(),
                Value::Array(items) => items.iter().map(message).collect(),
                Value::Undefined => {
                    return Err(format!("{DENY} is undefined (fail closed)"));
                }
                other => {
                    return Err(format!(
                        "{DENY} must be a set of messages, not {} (fail closed)",
                        message(&other)
                    ));
                }
            };
            if !messages.is_empty() {
                return Err(format!("denied by policy: {}", messages.join("; ")));
            }
            passed.push("nothing denied");
        }
        if declared.allow {
            match eval(&mut engine, ALLOW)? {
                Value::Bool(true) => passed.push("allow is true"),
                Value::Bool(false) => return Err(format!("{ALLOW} is false")),
                Value::Undefined => {
                    return Err(format!("{ALLOW} is undefined (fail closed)"));
                }
                other => {
                    return Err(format!(
                        "{ALLOW} must be a boolean, not {} (fail closed)",
                        message(&other)
                    ));
                }
            }
        }
        Ok(format!("policy: {}", passed.join(", ")))
    }
}

fn eval(engine: &mut Engine, rule: &str) -> Result<Value, String> {
    engine
        .eval_rule(rule.to_string())
        .map_err(|e| format!("evaluating {rule}: {} (fail closed)", e.to_string().trim()))
}

/// A deny message as written: strings as they are, anything else as JSON.
fn message(value: &Value) -> String {
    match value {
        Value::String(text) => text.to_string(),
        other => other.to_json_str().unwrap_or_else(|_| format!("{other:?}")),
    }
}

/// Which of the contract's rules the modules declare.
struct Declared {
    deny: bool,
    allow: bool,
}

impl Declared {
    fn find(engine: &Engine) -> Result<Self, String> {
        let packages = engine
            .get_policy_package_components()
            .map_err(|e| format!("reading the modules' packages: {e}"))?;
        let mut declared = Self {
            deny: false,
            allow: false,
        };
        for package in packages.iter().filter(|p| {
            p.components
                .iter()
                .map(String::as_str)
                .eq(PACKAGE_COMPONENTS)
        }) {
            let has = |rule: &str| {
                engine
                    .has_declared_rule_rooted_at(&package.source_file, rule)
                    .map_err(|e| format!("module {:?}: {e}", package.source_file))
            };
            declared.deny |= has("deny")?;
            declared.allow |= has("allow")?;
        }
        Ok(declared)
    }
}
