-- Environments in order with their promotion rules; releases with author and labels;
-- promotions, approvals, decision records and persisted workflow runs.

-- The environment a release must have reached before this one (NULL: the first stage).
ALTER TABLE environments ADD COLUMN after_id TEXT REFERENCES environments(id);
ALTER TABLE environments ADD COLUMN required_approvals BIGINT NOT NULL DEFAULT 0;
ALTER TABLE environments ADD COLUMN separation_of_duties BIGINT NOT NULL DEFAULT 0;
-- JSON: freeze_windows, schedule_windows, variables, secret_refs (references only, never
-- values), policies (Rego modules by name), workflow (template YAML or null for the default).
ALTER TABLE environments ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
ALTER TABLE environments ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0;

ALTER TABLE releases ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
ALTER TABLE releases ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';

CREATE TABLE promotions (
    id              TEXT PRIMARY KEY,
    release_id      TEXT NOT NULL REFERENCES releases(id),
    environment_id  TEXT NOT NULL REFERENCES environments(id),
    -- pending, awaiting_approval, approved, deploying, deployed, rejected, cancelled, failed,
    -- rolled_back
    status          TEXT NOT NULL,
    requested_by    TEXT NOT NULL,
    reason          TEXT NOT NULL DEFAULT '',
    -- users who asked to override a freeze window (must be allowed by the window)
    freeze_override TEXT NOT NULL DEFAULT '',
    message         TEXT NOT NULL DEFAULT '',
    deployment_id   TEXT REFERENCES deployments(id),
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    finished_at     BIGINT
);
CREATE INDEX promotions_by_status ON promotions (status);
CREATE INDEX promotions_by_env ON promotions (environment_id, created_at);

CREATE TABLE approvals (
    promotion_id  TEXT NOT NULL REFERENCES promotions(id),
    user_name     TEXT NOT NULL,
    -- approve or reject
    decision      TEXT NOT NULL,
    comment       TEXT NOT NULL DEFAULT '',
    at            BIGINT NOT NULL,
    PRIMARY KEY (promotion_id, user_name)
);

-- Every gate evaluation: each gate's result and a hash of all inputs. Never updated.
CREATE TABLE decisions (
    id             TEXT PRIMARY KEY,
    promotion_id   TEXT NOT NULL REFERENCES promotions(id),
    at             BIGINT NOT NULL,
    outcome        TEXT NOT NULL,
    gates          TEXT NOT NULL,
    input_hash     TEXT NOT NULL,
    policy_digest  TEXT NOT NULL,
    input          TEXT NOT NULL
);
CREATE INDEX decisions_by_promotion ON decisions (promotion_id, at);

-- A promotion's workflow run; `state` is the engine's JSON, written at every transition.
CREATE TABLE workflow_runs (
    id            TEXT PRIMARY KEY,
    promotion_id  TEXT NOT NULL UNIQUE REFERENCES promotions(id),
    template      TEXT NOT NULL,
    state         TEXT NOT NULL,
    status        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX workflow_runs_by_status ON workflow_runs (status);

-- Which deployment a workflow step started, so a restarted plane finds it instead of
-- starting another (the step's idempotency key is unique).
CREATE TABLE workflow_step_deployments (
    idempotency_key  TEXT PRIMARY KEY,
    run_id           TEXT NOT NULL REFERENCES workflow_runs(id),
    step_id          TEXT NOT NULL,
    deployment_id    TEXT NOT NULL REFERENCES deployments(id),
    created_at       BIGINT NOT NULL
);
