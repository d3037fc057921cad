//! Workflow templates (YAML DAGs) and the run state machine.
