//! The client: one registry, its credentials and trust, and the three questions Stella asks
//! (which tags, which digest, which versions).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{StreamExt, stream};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, LINK, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode, Url};
use rustls::ClientConfig;
use serde::Deserialize;
use tracing::{debug, warn};

use crate::RegistryError;
use crate::auth::{Challenge, TokenCache, TokenResponse, parse_challenges};
use crate::config::{Credentials, RegistryConfig, check_transport, parse_base_url};
use crate::error::{display_url, error_chain};
use crate::reference::{is_sha256_digest, is_valid_tag, validate_repository, validate_tag};
use crate::versions::{ComponentVersion, SkippedTag, SyncReport, VersionRules};

pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// What a tag may resolve to. Docker schema 1 manifests are absent on purpose: their digest is
/// computed over a rewritten body, so it cannot be checked the way Stella checks digests.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
];

/// The registry's limit for a manifest (distribution refuses bigger ones).
const MAX_MANIFEST_BYTES: usize = 4 << 20;
const MAX_TAG_PAGE_BYTES: usize = 16 << 20;
const MAX_TOKEN_BYTES: usize = 64 << 10;
const MAX_ERROR_BODY_CHARS: usize = 300;
/// A registry that keeps sending `next` links is broken; stop rather than loop forever.
const MAX_TAG_PAGES: usize = 10_000;
/// Tags resolved at once during a sync: enough to hide latency, few enough to be polite.
const SYNC_CONCURRENCY: usize = 4;
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_REDIRECTS: usize = 5;

/// A tag and the manifest digest it points to right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedTag {
    pub tag: String,
    /// `sha256:<hex>` of the manifest (or index) bytes.
    pub digest: String,
    /// One of [`MANIFEST_MEDIA_TYPES`].
    pub media_type: String,
}

/// An OCI Distribution v2 client for one registry. Cheap to share (`&self` everywhere); bearer
/// tokens are cached per repository scope for the life of the client.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: Url,
    credentials: Credentials,
    allow_insecure_http: bool,
    tags_page_size: u32,
    tokens: TokenCache,
    /// Set once the registry asked for Basic auth: later requests send it straight away.
    basic_required: AtomicBool,
}

/// Which endpoint a `404` came from, to say what was not found.
enum Lookup<'a> {
    Repository(&'a str),
    Tag(&'a str, &'a str),
}

#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct MediaTypeField {
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
}

impl RegistryClient {
    /// Checks the configuration and builds the HTTP client; makes no request.
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        let base = parse_base_url(&config.base_url, config.allow_insecure_http)?;
        if config.tags_page_size == 0 {
            return Err(RegistryError::InvalidConfig(
                "tags page size must be at least 1".to_string(),
            ));
        }
        if config.timeout.is_zero() {
            return Err(RegistryError::InvalidConfig(
                "timeout must be longer than zero".to_string(),
            ));
        }
        let tls = tls_config(config.extra_ca_pem.as_deref())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(MAX_CONNECT_TIMEOUT))
            .redirect(redirect_policy(config.allow_insecure_http))
            .user_agent(concat!("stella-registry/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                RegistryError::InvalidConfig(format!(
                    "cannot build the HTTP client: {}",
                    error_chain(&e)
                ))
            })?;
        Ok(Self {
            http,
            base,
            credentials: config.credentials,
            allow_insecure_http: config.allow_insecure_http,
            tags_page_size: config.tags_page_size,
            tokens: TokenCache::default(),
            basic_required: AtomicBool::new(false),
        })
    }

    /// The registry root this client talks to.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// `GET /v2/`: whether the registry answers and accepts the credentials.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        let url = self.url("v2/")?;
        let resp = self.send(Method::GET, &url, None, "").await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(status_error(&url, resp, None).await)
        }
    }

    /// Every tag of `repository`, following `Link: <…>; rel="next"` pages, in the registry's
    /// order, without duplicates.
    pub async fn list_tags(&self, repository: &str) -> Result<Vec<String>, RegistryError> {
        validate_repository(repository)?;
        let scope = pull_scope(repository);
        let mut url = self.url(&format!("v2/{repository}/tags/list"))?;
        url.query_pairs_mut()
            .append_pair("n", &self.tags_page_size.to_string());
        let mut tags = Vec::new();
        let mut seen_tags = HashSet::new();
        let mut seen_pages = HashSet::new();
        loop {
            if seen_pages.len() >= MAX_TAG_PAGES {
                return Err(bad_response(&url, "more than 10000 pages of tags"));
            }
            seen_pages.insert(url.clone());
            let resp = self
                .send(Method::GET, &url, Some("application/json"), &scope)
                .await?;
            if !resp.status().is_success() {
                return Err(status_error(&url, resp, Some(Lookup::Repository(repository))).await);
            }
            let next = next_link(&url, resp.headers())?;
            let body = read_limited(&url, resp, MAX_TAG_PAGE_BYTES).await?;
            let page: TagList = serde_json::from_slice(&body)
                .map_err(|e| bad_response(&url, &format!("tag list is not JSON: {e}")))?;
            for tag in page.tags.unwrap_or_default() {
                if seen_tags.insert(tag.clone()) {
                    tags.push(tag);
                }
            }
            let Some(next) = next else { break };
            if !same_origin(&next, &self.base) {
                return Err(bad_response(
                    &url,
                    &format!(
                        "the next page link {} leaves the registry",
                        display_url(&next)
                    ),
                ));
            }
            if seen_pages.contains(&next) {
                return Err(bad_response(
                    &url,
                    "the next page link points back to a page already read",
                ));
            }
            url = next;
        }
        debug!(registry = %self.base, repository, tags = tags.len(), "listed tags");
        Ok(tags)
    }

    /// The manifest digest `tag` of `repository` points to now. Asks with `HEAD` and falls back
    /// to `GET` when the answer lacks the digest or the media type; a fetched body must hash to
    /// the digest the registry announced.
    pub async fn resolve(&self, repository: &str, tag: &str) -> Result<ResolvedTag, RegistryError> {
        validate_repository(repository)?;
        validate_tag(tag)?;
        let scope = pull_scope(repository);
        let url = self.url(&format!("v2/{repository}/manifests/{tag}"))?;
        let accept = MANIFEST_MEDIA_TYPES.join(", ");

        let head = self.send(Method::HEAD, &url, Some(&accept), &scope).await?;
        if head.status().is_success() {
            let digest = header_text(head.headers(), "docker-content-digest");
            let media_type = content_type(head.headers());
            match (digest, media_type) {
                (Some(digest), Some(media_type))
                    if is_sha256_digest(&digest)
                        && MANIFEST_MEDIA_TYPES.contains(&media_type.as_str()) =>
                {
                    return Ok(ResolvedTag {
                        tag: tag.to_string(),
                        digest,
                        media_type,
                    });
                }
                (Some(digest), _) if !is_sha256_digest(&digest) => {
                    return Err(RegistryError::BadDigest {
                        url: display_url(&url),
                        detail: format!(
                            "the registry announced digest {digest:?}; only sha256 digests \
                             are accepted"
                        ),
                    });
                }
                _ => {}
            }
        }
        // HEAD answers carry no error body and may lack headers: ask again with GET.
        debug!(url = %display_url(&url), status = %head.status(), "manifest HEAD incomplete, fetching");
        let resp = self.send(Method::GET, &url, Some(&accept), &scope).await?;
        if !resp.status().is_success() {
            return Err(status_error(&url, resp, Some(Lookup::Tag(repository, tag))).await);
        }
        let announced = header_text(resp.headers(), "docker-content-digest");
        let header_type = content_type(resp.headers());
        let body = read_limited(&url, resp, MAX_MANIFEST_BYTES).await?;
        let digest = stella_pki::sha256_digest(&body);
        if let Some(announced) = announced
            && announced != digest
        {
            return Err(RegistryError::BadDigest {
                url: display_url(&url),
                detail: format!(
                    "the registry announced {announced} but the manifest it sent hashes to \
                     {digest}; refusing it"
                ),
            });
        }
        let media_type = header_type
            .filter(|t| MANIFEST_MEDIA_TYPES.contains(&t.as_str()))
            .or_else(|| {
                serde_json::from_slice::<MediaTypeField>(&body)
                    .ok()
                    .and_then(|m| m.media_type)
            })
            .unwrap_or_default();
        if !MANIFEST_MEDIA_TYPES.contains(&media_type.as_str()) {
            return Err(bad_response(
                &url,
                &format!(
                    "manifest media type {media_type:?} is not supported (expected one of {})",
                    MANIFEST_MEDIA_TYPES.join(", ")
                ),
            ));
        }
        Ok(ResolvedTag {
            tag: tag.to_string(),
            digest,
            media_type,
        })
    }

    /// Lists `repository`'s tags, keeps those `rules` call versions and resolves each to its
    /// digest. Tags that are not versions, and tags deleted between listing and resolving, are
    /// reported as skipped; any other failure fails the whole sync (no partial result).
    pub async fn sync(
        &self,
        repository: &str,
        rules: &VersionRules,
    ) -> Result<SyncReport, RegistryError> {
        let tags = self.list_tags(repository).await?;
        let mut report = SyncReport::default();
        let mut candidates = Vec::new();
        for tag in tags {
            if !is_valid_tag(&tag) {
                report.skipped.push(SkippedTag {
                    reason: "not a valid tag name".to_string(),
                    tag,
                });
                continue;
            }
            match rules.classify(&tag) {
                Ok((version, channel)) => candidates.push((tag, version, channel)),
                Err(reason) => report.skipped.push(SkippedTag { tag, reason }),
            }
        }
        let resolved: Vec<_> = stream::iter(candidates)
            .map(|(tag, version, channel)| async move {
                let result = self.resolve(repository, &tag).await;
                (tag, version, channel, result)
            })
            .buffered(SYNC_CONCURRENCY)
            .collect()
            .await;
        for (tag, version, channel, result) in resolved {
            match result {
                Ok(r) => report.versions.push(ComponentVersion {
                    tag,
                    digest: r.digest,
                    media_type: r.media_type,
                    semver: Some(version),
                    channel,
                }),
                Err(RegistryError::TagNotFound { .. }) => report.skipped.push(SkippedTag {
                    tag,
                    reason: "deleted while syncing".to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
        report
            .versions
            .sort_by(|a, b| b.semver.cmp(&a.semver).then_with(|| a.tag.cmp(&b.tag)));
        debug!(
            registry = %self.base,
            repository,
            versions = report.versions.len(),
            skipped = report.skipped.len(),
            "synced"
        );
        Ok(report)
    }

    fn url(&self, path: &str) -> Result<Url, RegistryError> {
        self.base.join(path).map_err(|e| {
            RegistryError::InvalidInput(format!("cannot build a URL for {path:?}: {e}"))
        })
    }

    /// Sends a request, answering the registry's challenge (Basic, or Bearer through its token
    /// service) when it replies 401. Returns every other answer as it is.
    async fn send(
        &self,
        method: Method,
        url: &Url,
        accept: Option<&str>,
        scope: &str,
    ) -> Result<Response, RegistryError> {
        let mut sent_basic = false;
        let mut fetched_token = false;
        loop {
            let mut request = self.http.request(method.clone(), url.clone());
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            match &self.credentials {
                Credentials::Bearer { token } => request = request.bearer_auth(token),
                Credentials::Basic { username, password }
                    if self.basic_required.load(Ordering::Relaxed) =>
                {
                    sent_basic = true;
                    request = request.basic_auth(username, Some(password));
                }
                _ => {
                    if let Some(token) = self.tokens.get(scope) {
                        request = request.bearer_auth(token);
                    }
                }
            }
            debug!(%method, url = %display_url(url), "registry request");
            let resp = request.send().await.map_err(|e| transport_error(url, &e))?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let challenge = parse_challenges(
                resp.headers()
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            let refused = |detail: String| RegistryError::Unauthorized {
                url: display_url(url),
                detail,
            };
            match (challenge, &self.credentials) {
                (_, Credentials::Bearer { .. }) => {
                    return Err(refused("the registry refused the bearer token".to_string()));
                }
                (Some(Challenge::Basic), Credentials::Basic { username, .. }) => {
                    if sent_basic {
                        return Err(refused(format!(
                            "the registry refused the password of user {username:?}"
                        )));
                    }
                    self.basic_required.store(true, Ordering::Relaxed);
                }
                (Some(Challenge::Basic), Credentials::Anonymous) => {
                    return Err(refused(
                        "the registry requires a username and password; none are configured"
                            .to_string(),
                    ));
                }
                (Some(Challenge::Bearer { .. }), _) if fetched_token => {
                    return Err(refused(format!(
                        "the registry refused the token its token service issued for scope \
                         {scope:?}"
                    )));
                }
                (
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope: asked,
                    }),
                    _,
                ) => {
                    // The registry's own scope is authoritative; ours names the cache entry.
                    let wanted = asked.as_deref().unwrap_or(scope);
                    let (token, expires_in) =
                        self.fetch_token(&realm, service.as_deref(), wanted).await?;
                    self.tokens.put(scope, token, expires_in);
                    fetched_token = true;
                }
                (None, _) => {
                    return Err(refused(
                        "401 without a Basic or Bearer challenge Stella can answer".to_string(),
                    ));
                }
            }
        }
    }

    /// Asks the token service of a Bearer challenge for a token, with the Basic credentials if
    /// there are any (anonymous otherwise).
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(String, Option<u64>), RegistryError> {
        let mut url = Url::parse(realm).map_err(|e| RegistryError::BadResponse {
            url: display_url(&self.base),
            detail: format!("the token realm {realm:?} is not a URL: {e}"),
        })?;
        // Credentials go to the realm: it must meet the same transport policy as the registry.
        check_transport(&url, self.allow_insecure_http, "token realm").map_err(|e| {
            RegistryError::BadResponse {
                url: display_url(&self.base),
                detail: e.to_string(),
            }
        })?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            if !scope.is_empty() {
                query.append_pair("scope", scope);
            }
        }
        let mut request = self.http.get(url.clone());
        if let Credentials::Basic { username, password } = &self.credentials {
            request = request.basic_auth(username, Some(password));
        }
        debug!(url = %display_url(&url), "fetching registry token");
        let resp = request
            .send()
            .await
            .map_err(|e| transport_error(&url, &e))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let detail = match &self.credentials {
                Credentials::Basic { username, .. } => {
                    format!("the token service refused user {username:?} (HTTP {status})")
                }
                _ => format!("the token service refused an anonymous token (HTTP {status})"),
            };
            return Err(RegistryError::Unauthorized {
                url: display_url(&url),
                detail,
            });
        }
        if !status.is_success() {
            return Err(status_error(&url, resp, None).await);
        }
        let body = read_limited(&url, resp, MAX_TOKEN_BYTES).await?;
        let answer: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| bad_response(&url, &format!("token answer is not JSON: {e}")))?;
        let expires_in = answer.expires_in;
        let token = answer
            .into_token()
            .ok_or_else(|| bad_response(&url, "token answer holds no token"))?;
        Ok((token, expires_in))
    }
}

/// The host's trust store plus `extra_ca_pem`, on ring.
fn tls_config(extra_ca_pem: Option<&str>) -> Result<ClientConfig, RegistryError> {
    let (config, trust) = stella_pki::client_config_host_trust(extra_ca_pem)
        .map_err(|e| RegistryError::InvalidConfig(format!("extra CA PEM is unusable: {e}")))?;
    for e in &trust.errors {
        warn!(error = %e, "cannot read part of the host's trust store");
    }
    debug!(
        added = trust.added,
        ignored = trust.ignored,
        "host trust store loaded"
    );
    Ok(config)
}

/// Follows at most a few redirects, and none to plain http on another host: a registry must not
/// be able to move Stella off TLS. (reqwest drops `Authorization` on a change of host itself.)
fn redirect_policy(allow_insecure_http: bool) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            let error = format!("more than {MAX_REDIRECTS} redirects");
            attempt.error(error)
        } else if let Err(e) = check_transport(attempt.url(), allow_insecure_http, "redirect") {
            attempt.error(e.to_string())
        } else {
            attempt.follow()
        }
    })
}

fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The media type without parameters (`application/json; charset=utf-8` → `application/json`).
fn content_type(headers: &HeaderMap) -> Option<String> {
    header_text(headers, CONTENT_TYPE.as_str())
        .and_then(|v| v.split(';').next().map(|t| t.trim().to_ascii_lowercase()))
        .filter(|v| !v.is_empty())
}

/// The `rel="next"` target of the `Link` headers, resolved against the page's URL.
fn next_link(page: &Url, headers: &HeaderMap) -> Result<Option<Url>, RegistryError> {
    for value in headers.get_all(LINK).iter().filter_map(|v| v.to_str().ok()) {
        for link in value.split(',') {
            let Some((target, params)) = link
                .trim()
                .strip_prefix('<')
                .and_then(|rest| rest.split_once('>'))
            else {
                continue;
            };
            let is_next = params.split(';').any(|p| {
                p.trim().split_once('=').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("rel")
                        && v.trim().trim_matches('"').eq_ignore_ascii_case("next")
                })
            });
            if is_next {
                return page.join(target).map(Some).map_err(|e| {
                    bad_response(
                        page,
                        &format!("next page link {target:?} is not a URL: {e}"),
                    )
                });
            }
        }
    }
    Ok(None)
}

/// The body, refusing one longer than `limit` (a registry must not make Stella buffer
/// arbitrary amounts).
async fn read_limited(
    url: &Url,
    mut resp: Response,
    limit: usize,
) -> Result<Vec<u8>, RegistryError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(bad_response(
            url,
            &format!("body larger than {limit} bytes"),
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(url, &e))? {
        if body.len() + chunk.len() > limit {
            return Err(bad_response(
                url,
                &format!("body larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn bad_response(url: &Url, detail: &str) -> RegistryError {
    RegistryError::BadResponse {
        url: display_url(url),
        detail: detail.to_string(),
    }
}

fn transport_error(url: &Url, e: &reqwest::Error) -> RegistryError {
    if e.is_redirect() {
        // The registry answered, with a redirect Stella will not follow.
        return bad_response(url, &error_chain(e));
    }
    RegistryError::Unreachable {
        url: display_url(url),
        detail: error_chain(e),
    }
}

/// The error for a non-success answer other than 401, reading the Distribution error body.
async fn status_error(url: &Url, resp: Response, lookup: Option<Lookup<'_>>) -> RegistryError {
    let status = resp.status();
    let body = read_limited(url, resp, MAX_TOKEN_BYTES)
        .await
        .unwrap_or_default();
    let errors = serde_json::from_slice::<ErrorBody>(&body)
        .map(|b| b.errors)
        .unwrap_or_default();
    let has_code = |code: &str| errors.iter().any(|e| e.code == code);
    let shown = if errors.is_empty() {
        excerpt(&String::from_utf8_lossy(&body))
    } else {
        excerpt(
            &errors
                .iter()
                .map(|e| format!("{}: {}", e.code, e.message))
                .collect::<Vec<_>>()
                .join("; "),
        )
    };
    match (status, lookup) {
        (StatusCode::NOT_FOUND, Some(Lookup::Repository(repository))) => {
            RegistryError::RepositoryNotFound {
                repository: repository.to_string(),
                url: display_url(url),
            }
        }
        (StatusCode::NOT_FOUND, Some(Lookup::Tag(repository, _))) if has_code("NAME_UNKNOWN") => {
            RegistryError::RepositoryNotFound {
                repository: repository.to_string(),
                url: display_url(url),
            }
        }
        (StatusCode::NOT_FOUND, Some(Lookup::Tag(repository, tag))) => RegistryError::TagNotFound {
            repository: repository.to_string(),
            tag: tag.to_string(),
            url: display_url(url),
        },
        (StatusCode::FORBIDDEN, _) => RegistryError::Unauthorized {
            url: display_url(url),
            detail: format!("access denied (HTTP 403){}", suffix(&shown)),
        },
        _ => bad_response(url, &format!("HTTP {status}{}", suffix(&shown))),
    }
}

fn suffix(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

fn excerpt(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() > MAX_ERROR_BODY_CHARS {
        let cut: String = text.chars().take(MAX_ERROR_BODY_CHARS).collect();
        format!("{cut}…")
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn link(values: &[&str]) -> Result<Option<Url>, RegistryError> {
        let page = Url::parse("http://127.0.0.1:5000/v2/demo/app/tags/list?n=2").unwrap();
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(LINK, HeaderValue::from_str(v).unwrap());
        }
        next_link(&page, &headers)
    }

    #[test]
    fn next_links_are_found_and_resolved() {
        assert_eq!(
            link(&[r#"</v2/demo/app/tags/list?n=2&last=b>; rel="next""#]).unwrap(),
            Some(Url::parse("http://127.0.0.1:5000/v2/demo/app/tags/list?n=2&last=b").unwrap())
        );
        assert_eq!(
            link(&[r#"<https://x/prev>; rel=prev, <https://x/next>; rel=next"#]).unwrap(),
            Some(Url::parse("https://x/next").unwrap())
        );
        assert_eq!(link(&[r#"<https://x/prev>; rel="prev""#]).unwrap(), None);
        assert_eq!(link(&["garbage"]).unwrap(), None);
        assert_eq!(link(&[]).unwrap(), None);
    }

    #[test]
    fn origins_and_content_types() {
        let a = Url::parse("https://r.example/v2/").unwrap();
        assert!(same_origin(
            &a,
            &Url::parse("https://r.example:443/x").unwrap()
        ));
        assert!(!same_origin(&a, &Url::parse("http://r.example/x").unwrap()));
        assert!(!same_origin(
            &a,
            &Url::parse("https://evil.example/x").unwrap()
        ));
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert_eq!(content_type(&headers).as_deref(), Some("application/json"));
        assert_eq!(excerpt(&"x".repeat(400)).chars().count(), 301);
    }

    #[test]
    fn a_bad_extra_ca_is_refused() {
        let config = RegistryConfig::new("https://r.example").with_extra_ca_pem("not a pem");
        match RegistryClient::new(config) {
            Err(RegistryError::InvalidConfig(m)) => assert!(m.contains("extra CA"), "{m}"),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
        let mut config = RegistryConfig::new("https://r.example");
        config.tags_page_size = 0;
        assert!(matches!(
            RegistryClient::new(config),
            Err(RegistryError::InvalidConfig(_))
        ));
    }
}
