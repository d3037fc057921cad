//! Releases: immutable sets of component@digest. Everything downstream uses the digests.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::agents::validate_resource_name;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{new_id, now_ms, rfc3339};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleaseComponent {
    pub name: String,
    pub image: String,
    pub digest: String,
}

impl ReleaseComponent {
    /// Parses `name=IMAGE@sha256:DIGEST`, the CLI's form. A tag alone is refused: tags are
    /// resolved to digests only by a registry sync, never guessed.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name, reference) = spec
            .split_once('=')
            .ok_or_else(|| format!("component {spec:?}: expected NAME=IMAGE@sha256:DIGEST"))?;
        let Some((image, digest)) = reference.rsplit_once('@') else {
            return Err(format!(
                "component {name}: image {reference:?} has no digest; give IMAGE@sha256:DIGEST \
                 (releases are digest-first)"
            ));
        };
        Ok(Self {
            name: name.to_string(),
            image: image.to_string(),
            digest: digest.to_string(),
        })
    }

    pub fn validate(&self) -> ApiResult<()> {
        validate_resource_name("component", &self.name)?;
        let image_ok = !self.image.is_empty()
            && self.image.len() <= 255
            && self
                .image
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_./:".contains(&b));
        if !image_ok {
            return Err(ApiError::BadRequest(format!(
                "component {}: invalid image reference {:?}",
                self.name, self.image
            )));
        }
        if !is_sha256_digest(&self.digest) {
            return Err(ApiError::BadRequest(format!(
                "component {}: image {} has no valid digest (got {:?}); give IMAGE@sha256:<64 hex>",
                self.name, self.image, self.digest
            )));
        }
        Ok(())
    }
}

/// The plane does not link plugins, so the digest shape check lives here too (and in the SDK).
fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateRelease {
    pub name: String,
    /// Components given with their image and digest.
    #[serde(default)]
    pub components: Vec<ReleaseComponent>,
    /// Components by reference to a registered component: `api:v2.3.1` (a tag, resolved to
    /// its digest now) or `worker@sha256:…`.
    #[serde(default)]
    pub refs: Vec<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Release {
    pub id: String,
    pub name: String,
    pub components: Vec<ReleaseComponent>,
    /// The user who created it (empty for releases created before users existed).
    #[serde(default)]
    pub created_by: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub created_at: String,
}

/// How two releases differ, component by component.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleaseDiff {
    pub from: String,
    pub to: String,
    pub changes: Vec<ComponentChange>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ComponentChange {
    pub component: String,
    /// added, removed, changed or unchanged.
    pub change: String,
    pub from: Option<ReleaseComponent>,
    pub to: Option<ReleaseComponent>,
}

pub async fn diff(state: &AppState, from: &str, to: &str) -> ApiResult<ReleaseDiff> {
    let a = find(state, from).await?;
    let b = find(state, to).await?;
    let mut names: Vec<&String> = a
        .components
        .iter()
        .chain(&b.components)
        .map(|c| &c.name)
        .collect();
    names.sort();
    names.dedup();
    let changes = names
        .into_iter()
        .map(|name| {
            let old = a.components.iter().find(|c| &c.name == name).cloned();
            let new = b.components.iter().find(|c| &c.name == name).cloned();
            let change = match (&old, &new) {
                (None, Some(_)) => "added",
                (Some(_), None) => "removed",
                (Some(o), Some(n)) if o == n => "unchanged",
                _ => "changed",
            };
            ComponentChange {
                component: name.clone(),
                change: change.to_string(),
                from: old,
                to: new,
            }
        })
        .collect();
    Ok(ReleaseDiff {
        from: a.name,
        to: b.name,
        changes,
    })
}

pub async fn create(
    state: &AppState,
    mut req: CreateRelease,
    created_by: &str,
) -> ApiResult<Release> {
    validate_resource_name("release", &req.name)?;
    crate::tokens::validate_labels(&req.labels)?;
    // Tags are resolved once, here; the release stores only digests.
    for reference in std::mem::take(&mut req.refs) {
        let (name, image, digest) = crate::components::resolve_reference(state, &reference).await?;
        req.components.push(ReleaseComponent {
            name,
            image,
            digest,
        });
    }
    if req.components.is_empty() {
        return Err(ApiError::BadRequest(
            "a release needs at least one component".to_string(),
        ));
    }
    for (i, c) in req.components.iter().enumerate() {
        c.validate()?;
        if req.components[..i].iter().any(|o| o.name == c.name) {
            return Err(ApiError::BadRequest(format!(
                "component {} is given twice",
                c.name
            )));
        }
    }
    let id = new_id("rel");
    let now = now_ms();
    let mut tx = crate::store::write_tx(&state.db).await?;
    let labels =
        serde_json::to_string(&req.labels).map_err(|e| ApiError::Internal(e.to_string()))?;
    let inserted = sqlx::query(
        "INSERT INTO releases (id, name, created_at, created_by, labels) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(&id)
    .bind(&req.name)
    .bind(now)
    .bind(created_by)
    .bind(&labels)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::Conflict(format!(
            "release {:?} already exists; releases are immutable, create a new one",
            req.name
        )));
    }
    for c in &req.components {
        sqlx::query(
            "INSERT INTO release_components (release_id, name, image, digest) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(&c.name)
        .bind(&c.image)
        .bind(&c.digest)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Release {
        id,
        name: req.name,
        components: req.components,
        created_by: created_by.to_string(),
        labels: req.labels,
        created_at: rfc3339(now),
    })
}

pub async fn components(state: &AppState, release_id: &str) -> ApiResult<Vec<ReleaseComponent>> {
    let rows = sqlx::query(
        "SELECT name, image, digest FROM release_components WHERE release_id = $1 ORDER BY name",
    )
    .bind(release_id)
    .fetch_all(&state.db)
    .await?;
    Ok(rows
        .iter()
        .map(|r| ReleaseComponent {
            name: r.get("name"),
            image: r.get("image"),
            digest: r.get("digest"),
        })
        .collect())
}

type ReleaseRow = (String, String, i64, String, String);

async fn from_row(
    state: &AppState,
    (id, name, at, created_by, labels): ReleaseRow,
) -> ApiResult<Release> {
    let components = components(state, &id).await?;
    Ok(Release {
        id,
        name,
        components,
        created_by,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        created_at: rfc3339(at),
    })
}

pub async fn find(state: &AppState, id_or_name: &str) -> ApiResult<Release> {
    let row: Option<ReleaseRow> = sqlx::query_as(
        "SELECT id, name, created_at, created_by, labels FROM releases WHERE id = $1 OR name = $2",
    )
    .bind(id_or_name)
    .bind(id_or_name)
    .fetch_optional(&state.db)
    .await?;
    let row = row.ok_or_else(|| ApiError::NotFound(format!("release {id_or_name:?} not found")))?;
    from_row(state, row).await
}

pub async fn list(state: &AppState) -> ApiResult<Vec<Release>> {
    let rows: Vec<ReleaseRow> = sqlx::query_as(
        "SELECT id, name, created_at, created_by, labels FROM releases ORDER BY created_at, name",
    )
    .fetch_all(&state.db)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(from_row(state, row).await?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_digest_references_and_refuses_tags() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let c = ReleaseComponent::parse(&format!("web=127.0.0.1:5000/demo/app:1@{d}")).unwrap();
        assert_eq!(c.name, "web");
        assert_eq!(c.image, "127.0.0.1:5000/demo/app:1");
        assert_eq!(c.digest, d);
        assert!(c.validate().is_ok());
        let err = ReleaseComponent::parse("web=demo/app:1").unwrap_err();
        assert!(err.contains("has no digest"), "{err}");
        assert!(ReleaseComponent::parse("demo/app@sha256:00").is_err());
        let bad = ReleaseComponent::parse("web=demo/app@sha256:00").unwrap();
        assert!(bad.validate().is_err());
    }
}
