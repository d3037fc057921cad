-- Several control-plane replicas on one database.

-- Each replica's row, refreshed while it runs: which replicas are alive, and where.
CREATE TABLE plane_replicas (
    id               TEXT PRIMARY KEY,
    host             TEXT NOT NULL,
    api_url          TEXT NOT NULL,
    agent_endpoints  TEXT NOT NULL,
    started_at       BIGINT NOT NULL,
    seen_at          BIGINT NOT NULL
);

-- The replica that drives a workflow run, until when: a replica that stops renewing (crash)
-- loses its runs to the others once the lease runs out.
ALTER TABLE workflow_runs ADD COLUMN lease_owner TEXT;
ALTER TABLE workflow_runs ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0;

-- The replica whose session first offered a job, and which replica holds the agent's session.
ALTER TABLE jobs ADD COLUMN claimed_by TEXT;
ALTER TABLE agents ADD COLUMN session_replica TEXT;

-- The replicas' sweep looks up agents with queued jobs.
CREATE INDEX jobs_by_status ON jobs (status, agent_id);
