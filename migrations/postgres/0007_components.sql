-- Components map an image repository in an OCI registry; their versions are the repository's
-- tags resolved to manifest digests by `stella component sync`.
CREATE TABLE components (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    registry      TEXT NOT NULL,
    repository    TEXT NOT NULL,
    -- JSON of the version rules (tag pattern, channel rules, default channel)
    rules         TEXT NOT NULL,
    username      TEXT NOT NULL DEFAULT '',
    -- a secret reference (env:NAME or file:/path), resolved at sync time; never the secret
    password_ref  TEXT NOT NULL DEFAULT '',
    created_at    BIGINT NOT NULL,
    synced_at     BIGINT
);

CREATE TABLE component_versions (
    component_id  TEXT NOT NULL REFERENCES components(id),
    tag           TEXT NOT NULL,
    digest        TEXT NOT NULL,
    media_type    TEXT NOT NULL,
    semver        TEXT NOT NULL,
    channel       TEXT NOT NULL,
    synced_at     BIGINT NOT NULL,
    PRIMARY KEY (component_id, tag)
);
