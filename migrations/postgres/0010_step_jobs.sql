-- Workflow steps run by agents (HTTP health probes, scripts) are grouped like deploy jobs: one
-- deployment row per step attempt, one signed job per target. `kind` says which work its jobs
-- do; everything that means "a release put on targets" reads only kind = 'deploy'.
ALTER TABLE deployments ADD COLUMN kind TEXT NOT NULL DEFAULT 'deploy';
