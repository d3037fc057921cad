-- Evidence: signed, hash-chained packets for every promotion decision, deployment and rollback.
-- Append-only: the database itself refuses to change or remove a packet.
CREATE TABLE evidence_packets (
    sequence       BIGINT PRIMARY KEY,
    id             TEXT NOT NULL UNIQUE,
    digest         TEXT NOT NULL UNIQUE,
    kind           TEXT NOT NULL,
    promotion_id   TEXT,
    deployment_id  TEXT,
    envelope       TEXT NOT NULL,
    recorded_at    BIGINT NOT NULL
);
CREATE INDEX evidence_by_time ON evidence_packets (recorded_at);
CREATE INDEX evidence_by_promotion ON evidence_packets (promotion_id);
CREATE INDEX evidence_by_deployment ON evidence_packets (deployment_id);

CREATE FUNCTION evidence_packets_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'evidence is append-only: packets cannot be changed';
    END IF;
    RAISE EXCEPTION 'evidence is append-only: packets cannot be deleted';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER evidence_packets_no_update BEFORE UPDATE ON evidence_packets
    FOR EACH ROW EXECUTE FUNCTION evidence_packets_append_only();
CREATE TRIGGER evidence_packets_no_delete BEFORE DELETE ON evidence_packets
    FOR EACH ROW EXECUTE FUNCTION evidence_packets_append_only();
-- TRUNCATE bypasses row triggers: refuse it as well.
CREATE TRIGGER evidence_packets_no_truncate BEFORE TRUNCATE ON evidence_packets
    FOR EACH STATEMENT EXECUTE FUNCTION evidence_packets_append_only();

-- The evidence keys and the periods they signed in (public halves only).
CREATE TABLE evidence_keys (
    key_id       TEXT PRIMARY KEY,
    public_key   TEXT NOT NULL,
    valid_from   BIGINT NOT NULL,
    valid_until  BIGINT
);

-- What a deployment was for, who asked, and the packet that records it.
ALTER TABLE deployments ADD COLUMN purpose TEXT NOT NULL DEFAULT 'deploy';
ALTER TABLE deployments ADD COLUMN replaces_release_id TEXT;
ALTER TABLE deployments ADD COLUMN requested_by TEXT NOT NULL DEFAULT '';
ALTER TABLE deployments ADD COLUMN evidence_id TEXT;
ALTER TABLE promotions ADD COLUMN evidence_id TEXT;
