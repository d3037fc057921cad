//! Promotion gates and decision records (freeze, schedule, dependency, approvals, separation of duties, Rego).
