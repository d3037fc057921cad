-- Lookups the agent endpoint and the deployment path make on every session or result, which
-- scanned whole tables at 10,000 agents (profile in docs/benchmarks.md):
-- the targets an agent serves (every session setup, every inventory report),
CREATE INDEX IF NOT EXISTS targets_by_agent ON targets (agent_id);
-- agents by name (`agents::find`, on every target creation),
CREATE INDEX IF NOT EXISTS agents_by_name ON agents (name);
-- unfinished jobs of a deployment (settling it on every result).
CREATE INDEX IF NOT EXISTS jobs_by_deployment_status ON jobs (deployment_id, status);
