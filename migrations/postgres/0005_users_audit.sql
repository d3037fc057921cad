-- API users: every API token belongs to a user and carries one role. The tokens that existed
-- before roles (the admin token of `stella dev`/`serve`) stay admins.
ALTER TABLE api_tokens ADD COLUMN user_name TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE api_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE api_tokens ADD COLUMN revoked_at BIGINT;
UPDATE api_tokens SET user_name = name;

-- Every mutation through the API: who, what, when, from where, and how it ended.
CREATE TABLE audit_log (
    id         TEXT PRIMARY KEY,
    at         BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    role       TEXT NOT NULL,
    method     TEXT NOT NULL,
    path       TEXT NOT NULL,
    status     BIGINT NOT NULL,
    client_ip  TEXT NOT NULL
);
CREATE INDEX audit_log_by_time ON audit_log (at);
