-- Versioned, signed trust bundles (job-signing keys agents accept) and which version each agent
-- has acknowledged, so a key rotation finishes only when every agent knows the new key.

CREATE TABLE trust_bundles (
    version     BIGINT PRIMARY KEY,
    document    TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

ALTER TABLE agents ADD COLUMN trust_bundle_version BIGINT NOT NULL DEFAULT 0;
