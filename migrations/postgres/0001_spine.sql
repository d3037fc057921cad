-- The spine: agents, join tokens, environments, targets, releases, deployments, jobs, inventory.
-- Portable SQL on purpose: migrations/postgres/ holds the same schema (only the evidence
-- triggers differ); a test applies both and compares them.
-- Times are unix milliseconds (BIGINT); JSON documents are TEXT.

CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE join_tokens (
    id          TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    labels      TEXT NOT NULL,
    max_uses    BIGINT NOT NULL,
    uses        BIGINT NOT NULL DEFAULT 0,
    expires_at  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE agents (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    hostname        TEXT NOT NULL,
    labels          TEXT NOT NULL,
    capabilities    TEXT NOT NULL,
    version         TEXT NOT NULL,
    cert_serial     TEXT NOT NULL,
    cert_not_after  BIGINT NOT NULL,
    status          TEXT NOT NULL,
    join_token_id   TEXT NOT NULL REFERENCES join_tokens(id),
    next_sequence   BIGINT NOT NULL DEFAULT 0,
    last_heartbeat  BIGINT,
    last_connected  BIGINT,
    enrolled_at     BIGINT NOT NULL
);

CREATE TABLE environments (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE targets (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    environment_id  TEXT NOT NULL REFERENCES environments(id),
    kind            TEXT NOT NULL,
    agent_id        TEXT NOT NULL REFERENCES agents(id),
    config          TEXT NOT NULL,
    created_at      BIGINT NOT NULL
);

CREATE TABLE releases (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE release_components (
    release_id  TEXT NOT NULL REFERENCES releases(id),
    name        TEXT NOT NULL,
    image       TEXT NOT NULL,
    digest      TEXT NOT NULL,
    PRIMARY KEY (release_id, name)
);

CREATE TABLE deployments (
    id              TEXT PRIMARY KEY,
    release_id      TEXT NOT NULL REFERENCES releases(id),
    environment_id  TEXT NOT NULL REFERENCES environments(id),
    status          TEXT NOT NULL,
    message         TEXT NOT NULL DEFAULT '',
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    finished_at     BIGINT
);

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    deployment_id    TEXT NOT NULL REFERENCES deployments(id),
    agent_id         TEXT NOT NULL REFERENCES agents(id),
    target_id        TEXT NOT NULL REFERENCES targets(id),
    kind             TEXT NOT NULL,
    sequence         BIGINT NOT NULL,
    idempotency_key  TEXT NOT NULL UNIQUE,
    envelope         TEXT NOT NULL,
    not_after        BIGINT NOT NULL,
    status           TEXT NOT NULL,
    reason_code      TEXT NOT NULL DEFAULT '',
    message          TEXT NOT NULL DEFAULT '',
    outcome          TEXT NOT NULL DEFAULT '',
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    finished_at      BIGINT,
    UNIQUE (agent_id, sequence)
);
CREATE INDEX jobs_by_agent_status ON jobs (agent_id, status, sequence);
CREATE INDEX jobs_by_deployment ON jobs (deployment_id);

CREATE TABLE job_events (
    job_id   TEXT NOT NULL REFERENCES jobs(id),
    seq      BIGINT NOT NULL,
    at       BIGINT NOT NULL,
    message  TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE inventory (
    target_id      TEXT NOT NULL REFERENCES targets(id),
    agent_id       TEXT NOT NULL REFERENCES agents(id),
    component      TEXT NOT NULL,
    digest         TEXT NOT NULL,
    state          TEXT NOT NULL,
    health         TEXT NOT NULL,
    workload_id    TEXT NOT NULL,
    release_id     TEXT NOT NULL,
    deployment_id  TEXT NOT NULL,
    reported_at    BIGINT NOT NULL,
    PRIMARY KEY (target_id, workload_id)
);

CREATE TABLE target_observations (
    target_id    TEXT PRIMARY KEY REFERENCES targets(id),
    sticker      TEXT NOT NULL,
    error        TEXT NOT NULL,
    reported_at  BIGINT NOT NULL
);
