-- Drift: findings per target with their history, ignore rules, the remediation policy of each
-- environment, and each target's remediation state (stella-drift's Remediator as JSON).

-- One row per finding occurrence: opened when a fingerprint first shows, `last_seen` moved
-- while it persists, closed (`resolved_at`) when a report no longer shows it or an ignore rule
-- silences it. Open rows are unique per target and fingerprint.
CREATE TABLE drift_findings (
    id           TEXT PRIMARY KEY,
    target_id    TEXT NOT NULL REFERENCES targets(id),
    fingerprint  TEXT NOT NULL,
    kind         TEXT NOT NULL,
    severity     TEXT NOT NULL,
    component    TEXT,
    workload     TEXT,
    expected     TEXT,
    observed     TEXT,
    labels       TEXT NOT NULL DEFAULT '{}',
    detail       TEXT NOT NULL,
    first_seen   BIGINT NOT NULL,
    last_seen    BIGINT NOT NULL,
    resolved_at  BIGINT,
    -- 'in_sync' (a report no longer showed it) or 'ignored:<rule id>'
    resolution   TEXT
);
CREATE UNIQUE INDEX drift_findings_open ON drift_findings (target_id, fingerprint)
    WHERE resolved_at IS NULL;
CREATE INDEX drift_findings_by_target ON drift_findings (target_id, first_seen);

CREATE TABLE drift_ignore_rules (
    id              TEXT PRIMARY KEY,
    environment_id  TEXT NOT NULL REFERENCES environments(id),
    -- NULL: every target of the environment
    target_id       TEXT REFERENCES targets(id),
    -- the selector's string form, e.g. kind=unmanaged_extra,label:team=ops
    selector        TEXT NOT NULL,
    reason          TEXT NOT NULL DEFAULT '',
    created_by      TEXT NOT NULL,
    created_at      BIGINT NOT NULL
);
CREATE INDEX drift_ignore_rules_by_env ON drift_ignore_rules (environment_id);

-- No row: notify, no webhook.
CREATE TABLE drift_policies (
    environment_id  TEXT PRIMARY KEY REFERENCES environments(id),
    -- stella-drift RemediationPolicy JSON
    policy          TEXT NOT NULL,
    webhook         TEXT NOT NULL DEFAULT '',
    updated_by      TEXT NOT NULL,
    updated_at      BIGINT NOT NULL
);

CREATE TABLE drift_targets (
    target_id                TEXT PRIMARY KEY REFERENCES targets(id),
    -- stella-drift Remediator JSON
    remediator               TEXT NOT NULL,
    -- the reconcile deployment whose outcome the remediator waits for
    reconcile_deployment_id  TEXT,
    -- the last Decision JSON
    decision                 TEXT NOT NULL DEFAULT '',
    -- agent clock of the last report evaluated: older reports arriving late are not evaluated
    observed_at              BIGINT NOT NULL DEFAULT 0,
    evaluated_at             BIGINT NOT NULL
);

-- Every reconcile issued, with how it ended.
CREATE TABLE drift_reconciles (
    deployment_id  TEXT PRIMARY KEY,
    target_id      TEXT NOT NULL REFERENCES targets(id),
    release_id     TEXT NOT NULL,
    issued_at      BIGINT NOT NULL,
    outcome        TEXT NOT NULL DEFAULT 'in_flight',
    error          TEXT NOT NULL DEFAULT '',
    finished_at    BIGINT
);
CREATE INDEX drift_reconciles_by_target ON drift_reconciles (target_id, issued_at);
