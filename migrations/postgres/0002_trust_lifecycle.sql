-- Trust lifecycle: revocable, multi-use join tokens; agent certificates kept for receipt
-- verification and in-band renewal (the previous serial stays valid until the new one is used);
-- signed agent receipts on job results.

ALTER TABLE join_tokens ADD COLUMN revoked_at BIGINT;

ALTER TABLE agents ADD COLUMN cert_pem TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN previous_cert_serial TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN revoked_at BIGINT;
ALTER TABLE agents ADD COLUMN revoked_reason TEXT NOT NULL DEFAULT '';

ALTER TABLE jobs ADD COLUMN receipt TEXT NOT NULL DEFAULT '';

-- Every certificate ever issued to an agent, so receipts signed under a since-renewed
-- certificate still verify (by the certificate fingerprint named in the receipt's key id).
CREATE TABLE agent_certificates (
    fingerprint  TEXT PRIMARY KEY,
    agent_id     TEXT NOT NULL REFERENCES agents(id),
    serial       TEXT NOT NULL,
    cert_pem     TEXT NOT NULL,
    not_after    BIGINT NOT NULL,
    issued_at    BIGINT NOT NULL
);
CREATE INDEX agent_certificates_by_agent ON agent_certificates (agent_id);
