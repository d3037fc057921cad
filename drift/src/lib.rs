//! Drift findings: desired vs observed state, ignore rules, remediation policy.
