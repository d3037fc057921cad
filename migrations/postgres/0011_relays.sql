-- Relays: which relay each agent was last seen behind (air-gap export picks the jobs of the
-- agents behind a relay from here), and which air-gap result files were imported (a second
-- import of the same file changes nothing).
CREATE TABLE relayed_agents (
    agent_id    TEXT PRIMARY KEY REFERENCES agents(id),
    relay_id    TEXT NOT NULL REFERENCES agents(id),
    last_seen   BIGINT NOT NULL
);
CREATE INDEX relayed_agents_by_relay ON relayed_agents(relay_id);

CREATE TABLE airgap_imports (
    digest          TEXT PRIMARY KEY,
    relay_id        TEXT NOT NULL,
    imported_at     BIGINT NOT NULL,
    results_new     BIGINT NOT NULL,
    results_known   BIGINT NOT NULL
);
