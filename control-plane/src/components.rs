//! Components: an image repository in an OCI registry, and its versions — the repository's tags
//! resolved to manifest digests by a sync. A release names component versions; from then on only
//! their digests are used.

use serde::{Deserialize, Serialize};
use stella_registry::{ChannelRule, Credentials, RegistryClient, RegistryConfig, VersionRules};
use utoipa::ToSchema;

use crate::agents::validate_resource_name;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{new_id, now_ms, rfc3339};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateComponent {
    pub name: String,
    /// The registry's base URL: `https://registry.example.com` or `http://127.0.0.1:5000`
    /// (plain http only to a loopback address).
    pub registry: String,
    /// The repository in the registry, e.g. `team/api`.
    pub repository: String,
    /// A regex over the whole tag whose group `version` (or first group) is a semantic
    /// version; default: an optional `v` then a semver.
    #[serde(default)]
    pub tag_pattern: Option<String>,
    /// Channel rules in order, e.g. `beta=prerelease` or `rc=~-rc\.\d+$`; others are `stable`.
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// A secret reference for the password: `env:NAME` or `file:/path`, read by the plane when
    /// it syncs. The plane never stores the password itself.
    #[serde(default)]
    pub password_ref: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ComponentVersionView {
    pub tag: String,
    pub digest: String,
    pub semver: String,
    pub channel: String,
    pub synced_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Component {
    pub id: String,
    pub name: String,
    pub registry: String,
    pub repository: String,
    /// The image reference agents pull (`host[:port]/repository`), always with a digest.
    pub image: String,
    pub tag_pattern: String,
    pub channels: Vec<String>,
    pub username: Option<String>,
    pub password_ref: Option<String>,
    pub created_at: String,
    pub synced_at: Option<String>,
    /// Highest semantic version first.
    pub versions: Vec<ComponentVersionView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SkippedTagView {
    pub tag: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SyncResult {
    pub component: String,
    pub versions: Vec<ComponentVersionView>,
    /// Tags that are not versions under the component's rules, and why.
    pub skipped: Vec<SkippedTagView>,
    /// Tags whose digest changed since the previous sync (a moved tag).
    pub moved: Vec<String>,
}

fn rules_from(tag_pattern: Option<&str>, channels: &[String]) -> ApiResult<VersionRules> {
    let mut rules = match tag_pattern {
        Some(p) => VersionRules::new(p).map_err(|e| ApiError::BadRequest(e.to_string()))?,
        // A semver tag, pre-releases on `beta`, the rest `stable`.
        None => VersionRules::semver(),
    };
    for c in channels {
        let rule: ChannelRule = c
            .parse()
            .map_err(|e: stella_registry::RegistryError| ApiError::BadRequest(e.to_string()))?;
        rules = rules.with_channel(rule);
    }
    Ok(rules)
}

/// `host[:port]` of a registry URL, which prefixes the repository in image references.
fn registry_host(registry: &str) -> ApiResult<String> {
    let rest = registry
        .strip_prefix("https://")
        .or_else(|| registry.strip_prefix("http://"))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "registry {registry:?}: give an http:// or https:// URL"
            ))
        })?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') || host.contains('@') {
        return Err(ApiError::BadRequest(format!(
            "registry {registry:?}: give scheme, host and port only (no path, no credentials)"
        )));
    }
    Ok(host.to_string())
}

fn validate_password_ref(reference: &str) -> ApiResult<()> {
    match reference.split_once(':') {
        Some(("env", name)) if !name.is_empty() => Ok(()),
        Some(("file", path)) if path.starts_with('/') => Ok(()),
        _ => Err(ApiError::BadRequest(
            "password_ref must be a secret reference: env:NAME or file:/absolute/path \
             (the plane never stores registry passwords)"
                .to_string(),
        )),
    }
}

fn resolve_password(reference: &str) -> ApiResult<String> {
    let value = match reference.split_once(':') {
        Some(("env", name)) => std::env::var(name).map_err(|_| {
            ApiError::Unprocessable(format!(
                "registry password reference {reference}: the plane's environment has no {name}"
            ))
        })?,
        Some(("file", path)) => std::fs::read_to_string(path).map_err(|e| {
            ApiError::Unprocessable(format!(
                "registry password reference {reference}: cannot read it ({})",
                e.kind()
            ))
        })?,
        _ => {
            return Err(ApiError::Internal(
                "stored password reference invalid".into(),
            ));
        }
    };
    Ok(value.trim_end_matches(['\r', '\n']).to_string())
}

pub async fn create(state: &AppState, req: CreateComponent) -> ApiResult<Component> {
    validate_resource_name("component", &req.name)?;
    registry_host(&req.registry)?;
    stella_registry::validate_repository(&req.repository)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let rules = rules_from(req.tag_pattern.as_deref(), &req.channels)?;
    if let Some(r) = &req.password_ref {
        validate_password_ref(r)?;
        if req.username.is_none() {
            return Err(ApiError::BadRequest(
                "password_ref needs a username".to_string(),
            ));
        }
    }
    // Checks the URL and TLS settings the same way a sync will, before anything is stored.
    RegistryClient::new(RegistryConfig::new(&req.registry))
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let rules_json =
        serde_json::to_string(&rules).map_err(|e| ApiError::Internal(e.to_string()))?;
    let id = new_id("cmp");
    let inserted = sqlx::query(
        "INSERT INTO components (id, name, registry, repository, rules, username, password_ref,
             created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&id)
    .bind(&req.name)
    .bind(req.registry.trim_end_matches('/'))
    .bind(&req.repository)
    .bind(&rules_json)
    .bind(req.username.as_deref().unwrap_or_default())
    .bind(req.password_ref.as_deref().unwrap_or_default())
    .bind(now_ms())
    .execute(&state.db)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::Conflict(format!(
            "component {:?} already exists",
            req.name
        )));
    }
    find(state, &id).await
}

type ComponentRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
);

async fn row(state: &AppState, id_or_name: &str) -> ApiResult<ComponentRow> {
    sqlx::query_as(
        "SELECT id, name, registry, repository, rules, username, password_ref, created_at,
             synced_at
         FROM components WHERE id = $1 OR name = $2",
    )
    .bind(id_or_name)
    .bind(id_or_name)
    .fetch_optional(&state.db)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("component {id_or_name:?} not found")))
}

async fn versions(state: &AppState, component_id: &str) -> ApiResult<Vec<ComponentVersionView>> {
    let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(
        "SELECT tag, digest, semver, channel, synced_at FROM component_versions
         WHERE component_id = $1",
    )
    .bind(component_id)
    .fetch_all(&state.db)
    .await?;
    let mut views: Vec<ComponentVersionView> = rows
        .into_iter()
        .map(|(tag, digest, semver, channel, at)| ComponentVersionView {
            tag,
            digest,
            semver,
            channel,
            synced_at: rfc3339(at),
        })
        .collect();
    views.sort_by(|a, b| {
        let va = semver_key(&a.semver);
        let vb = semver_key(&b.semver);
        vb.cmp(&va).then_with(|| a.tag.cmp(&b.tag))
    });
    Ok(views)
}

fn semver_key(s: &str) -> Option<semver::Version> {
    semver::Version::parse(s).ok()
}

fn view(r: ComponentRow, versions: Vec<ComponentVersionView>) -> ApiResult<Component> {
    let (id, name, registry, repository, rules, username, password_ref, created_at, synced_at) = r;
    let rules: VersionRules = serde_json::from_str(&rules)
        .map_err(|e| ApiError::Internal(format!("component rules unreadable: {e}")))?;
    Ok(Component {
        image: format!("{}/{repository}", registry_host(&registry)?),
        id,
        name,
        registry,
        repository,
        tag_pattern: rules.tag_pattern().to_string(),
        channels: rules.channels().iter().map(|c| c.to_string()).collect(),
        username: (!username.is_empty()).then_some(username),
        password_ref: (!password_ref.is_empty()).then_some(password_ref),
        created_at: rfc3339(created_at),
        synced_at: synced_at.map(rfc3339),
        versions,
    })
}

pub async fn find(state: &AppState, id_or_name: &str) -> ApiResult<Component> {
    let r = row(state, id_or_name).await?;
    let versions = versions(state, &r.0).await?;
    view(r, versions)
}

pub async fn list(state: &AppState) -> ApiResult<Vec<Component>> {
    let ids: Vec<(String,)> = sqlx::query_as("SELECT id FROM components ORDER BY name")
        .fetch_all(&state.db)
        .await?;
    let mut out = Vec::with_capacity(ids.len());
    for (id,) in ids {
        out.push(find(state, &id).await?);
    }
    Ok(out)
}

fn client_for(r: &ComponentRow) -> ApiResult<RegistryClient> {
    let (_, _, registry, _, _, username, password_ref, _, _) = r;
    let mut config = RegistryConfig::new(registry);
    if !username.is_empty() {
        let password = if password_ref.is_empty() {
            String::new()
        } else {
            resolve_password(password_ref)?
        };
        config = config.with_credentials(Credentials::Basic {
            username: username.clone(),
            password,
        });
    }
    RegistryClient::new(config).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn registry_failure(component: &str, e: stella_registry::RegistryError) -> ApiError {
    ApiError::Unprocessable(format!("component {component}: registry: {e}"))
}

/// Lists the repository's tags, resolves each to its manifest digest and stores the versions.
pub async fn sync(state: &AppState, id_or_name: &str) -> ApiResult<SyncResult> {
    let r = row(state, id_or_name).await?;
    let client = client_for(&r)?;
    let rules: VersionRules = serde_json::from_str(&r.4)
        .map_err(|e| ApiError::Internal(format!("component rules unreadable: {e}")))?;
    let report = client
        .sync(&r.3, &rules)
        .await
        .map_err(|e| registry_failure(&r.1, e))?;
    let before: Vec<(String, String)> =
        sqlx::query_as("SELECT tag, digest FROM component_versions WHERE component_id = $1")
            .bind(&r.0)
            .fetch_all(&state.db)
            .await?;
    let now = now_ms();
    let mut moved = Vec::new();
    let mut tx = crate::store::write_tx(&state.db).await?;
    for v in &report.versions {
        if before.iter().any(|(t, d)| t == &v.tag && d != &v.digest) {
            moved.push(v.tag.clone());
        }
        sqlx::query(
            "INSERT INTO component_versions (component_id, tag, digest, media_type, semver,
                 channel, synced_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (component_id, tag) DO UPDATE SET digest = excluded.digest,
                 media_type = excluded.media_type, semver = excluded.semver,
                 channel = excluded.channel, synced_at = excluded.synced_at",
        )
        .bind(&r.0)
        .bind(&v.tag)
        .bind(&v.digest)
        .bind(&v.media_type)
        .bind(v.semver.as_ref().map(|s| s.to_string()).unwrap_or_default())
        .bind(&v.channel)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE components SET synced_at = $1 WHERE id = $2")
        .bind(now)
        .bind(&r.0)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    if !moved.is_empty() {
        tracing::warn!(component = %r.1, tags = ?moved, "tags moved to other digests since the last sync");
    }
    tracing::info!(component = %r.1, versions = report.versions.len(), skipped = report.skipped.len(), "component synced");
    Ok(SyncResult {
        component: r.1.clone(),
        versions: versions(state, &r.0).await?,
        skipped: report
            .skipped
            .into_iter()
            .map(|s| SkippedTagView {
                tag: s.tag,
                reason: s.reason,
            })
            .collect(),
        moved,
    })
}

/// The image and digest of `component:tag` (a synced version, else resolved now and stored)
/// or `component@sha256:…`.
pub async fn resolve_reference(
    state: &AppState,
    reference: &str,
) -> ApiResult<(String, String, String)> {
    let (name, tag, digest) = if let Some((name, digest)) = reference.split_once('@') {
        (name, None, Some(digest))
    } else if let Some((name, tag)) = reference.split_once(':') {
        (name, Some(tag), None)
    } else {
        return Err(ApiError::BadRequest(format!(
            "component reference {reference:?}: give COMPONENT:TAG or COMPONENT@sha256:DIGEST"
        )));
    };
    let r = row(state, name).await?;
    let image = format!("{}/{}", registry_host(&r.2)?, r.3);
    if let Some(digest) = digest {
        if !stella_registry::is_sha256_digest(digest) {
            return Err(ApiError::BadRequest(format!(
                "component {name}: {digest:?} is not a sha256:<64 hex> digest"
            )));
        }
        return Ok((r.1, image, digest.to_string()));
    }
    let tag = tag.unwrap_or_default();
    stella_registry::validate_tag(tag).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let synced: Option<(String,)> = sqlx::query_as(
        "SELECT digest FROM component_versions WHERE component_id = $1 AND tag = $2",
    )
    .bind(&r.0)
    .bind(tag)
    .fetch_optional(&state.db)
    .await?;
    if let Some((digest,)) = synced {
        return Ok((r.1, image, digest));
    }
    // Not synced yet: resolve this one tag now, so that what the release pins is what the
    // registry serves at creation time.
    let client = client_for(&r)?;
    let resolved = client
        .resolve(&r.3, tag)
        .await
        .map_err(|e| registry_failure(&r.1, e))?;
    Ok((r.1, image, resolved.digest))
}
