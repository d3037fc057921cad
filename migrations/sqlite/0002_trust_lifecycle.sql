-- Trust lifecycle: revocable, multi-use join tokens; agent certificates kept for receipt
-- verification and in-band renewal (the previous serial stays valid until the new one is used);
-- signed agent receipts on job results.

ALTER TABLE join_tokens ADD COLUMN revoked_at BIGINT;

ALTER TABLE agents ADD COLUMN cert_pem TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN previous_cert_serial TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN revoked_at BIGINT;
ALTER TABLE agents ADD COLUMN revoked_reason TEXT NOT NULL DEFAULT '';

ALTER TABLE jobs ADD COLUMN receipt TEXT NOT NULL DEFAULT '';
