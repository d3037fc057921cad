-- The plane's private keys sealed at rest, shared by every replica of one database
-- (`stella serve --key-encryption-key-file`): the CA(s), job-signing and evidence keys, each
-- AES-256-GCM sealed under the key-encryption key named by `kek_id` (see control-plane
-- `sealed_keys.rs`). Empty when the plane keeps its keys in files.
CREATE TABLE plane_secrets (
    name        TEXT PRIMARY KEY,
    sealed      TEXT NOT NULL,
    kek_id      TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);
