//! Conventions of executors that drive a Docker Engine (docker, compose, ssh in mode `docker`),
//! independent of how they talk to it (an API client or the `docker` CLI).

use std::path::PathBuf;

use crate::digest::{repository_of, short_digest, tagged_reference};
use crate::{ComponentSpec, PluginError, ProgressSink};

/// The engine's socket when `DOCKER_HOST` is not set.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// The restart policy of Stella's containers. Stella is the only thing that should stop a
/// deployed workload; a host reboot or a crash must not leave the target silently running
/// nothing.
pub const RESTART_POLICY: &str = "unless-stopped";

/// The engine socket this process should use: `DOCKER_HOST` (a `unix://` socket) when set,
/// else [`DEFAULT_SOCKET`].
pub fn docker_socket() -> Result<PathBuf, PluginError> {
    socket_from_docker_host(std::env::var("DOCKER_HOST").ok().as_deref())
}

/// The socket a `DOCKER_HOST` value names; only `unix://` sockets are supported.
pub fn socket_from_docker_host(docker_host: Option<&str>) -> Result<PathBuf, PluginError> {
    match docker_host.map(str::trim).filter(|h| !h.is_empty()) {
        None => Ok(PathBuf::from(DEFAULT_SOCKET)),
        Some(host) => match host.strip_prefix("unix://") {
            Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
            _ => Err(PluginError::Backend(format!(
                "DOCKER_HOST={host} is not supported: only unix:// sockets are"
            ))),
        },
    }
}

/// The images of one engine, as [`resolve_image`] needs them.
#[async_trait::async_trait]
pub trait ImageStore: Sync {
    /// The id of the local image `digest` names for repository `repo`: its id, or an exact
    /// `repo@digest` repo digest (see [`crate::digest::image_matches`]).
    async fn find_image(&self, repo: &str, digest: &str) -> Result<Option<String>, PluginError>;

    /// The id of the image `reference` names, if there is one (empty if the engine gives none).
    async fn image_id(&self, reference: &str) -> Result<Option<String>, PluginError>;

    /// Pulls `repo@digest` for `component`. `Ok(Err(detail))` when the engine refused, with its
    /// own message: it is what an operator needs to see.
    async fn pull(
        &self,
        component: &str,
        repo: &str,
        digest: &str,
    ) -> Result<Result<(), String>, PluginError>;
}

/// The refusal for component `c` when its tag names a local image with other content
/// (`actual_id`): the operator built or pulled something else under that name, and pulling
/// would silently paper over the disagreement.
pub fn other_content_under_tag(c: &ComponentSpec, actual_id: String) -> PluginError {
    PluginError::DigestMismatch {
        component: c.name.clone(),
        image: c.image.clone(),
        expected: c.digest.clone(),
        actual: if actual_id.is_empty() {
            "an image without id".to_string()
        } else {
            actual_id
        },
    }
}

/// The id of the local image component `c`'s digest names, pulling `repo@digest` when there is
/// none. Refuses (before anything changes) when the component's tag names other content, when
/// the pull fails, and when the pulled image does not carry the digest after all.
pub async fn resolve_image(
    store: &dyn ImageStore,
    c: &ComponentSpec,
    progress: &dyn ProgressSink,
) -> Result<String, PluginError> {
    let repo = repository_of(&c.image);
    let wanted = format!("{repo}@{}", short_digest(&c.digest));
    if let Some(id) = store.find_image(repo, &c.digest).await? {
        progress.progress(&format!(
            "{}: resolved {wanted} to local image {}",
            c.name,
            short_digest(&id)
        ));
        return Ok(id);
    }
    if let Some(tagged) = tagged_reference(&c.image)
        && let Some(id) = store.image_id(tagged).await?
    {
        return Err(other_content_under_tag(c, id));
    }
    progress.progress(&format!("{}: pulling {wanted}", c.name));
    if let Err(detail) = store.pull(&c.name, repo, &c.digest).await? {
        return Err(PluginError::ImageUnavailable {
            component: c.name.clone(),
            digest: c.digest.clone(),
            detail,
        });
    }
    match store.find_image(repo, &c.digest).await? {
        Some(id) => {
            progress.progress(&format!(
                "{}: pulled {wanted} as image {}",
                c.name,
                short_digest(&id)
            ));
            Ok(id)
        }
        None => Err(PluginError::DigestMismatch {
            component: c.name.clone(),
            image: c.image.clone(),
            expected: c.digest.clone(),
            actual: "no local image carries that digest after the pull".to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// An engine with images by reference (id or tag) and a registry to pull from.
    #[derive(Default)]
    struct FakeStore {
        local: Mutex<HashMap<String, String>>,
        registry: HashMap<String, String>,
    }

    #[async_trait::async_trait]
    impl ImageStore for FakeStore {
        async fn find_image(
            &self,
            repo: &str,
            digest: &str,
        ) -> Result<Option<String>, PluginError> {
            let local = self.local.lock().unwrap();
            Ok(local
                .get(digest)
                .or_else(|| local.get(&format!("{repo}@{digest}")))
                .cloned())
        }

        async fn image_id(&self, reference: &str) -> Result<Option<String>, PluginError> {
            Ok(self.local.lock().unwrap().get(reference).cloned())
        }

        async fn pull(
            &self,
            _component: &str,
            repo: &str,
            digest: &str,
        ) -> Result<Result<(), String>, PluginError> {
            let reference = format!("{repo}@{digest}");
            match self.registry.get(&reference) {
                Some(id) => {
                    self.local.lock().unwrap().insert(reference, id.clone());
                    Ok(Ok(()))
                }
                None if repo.starts_with("broken") => Err(PluginError::Backend("down".into())),
                None if repo.starts_with("liar") => Ok(Ok(())),
                None => Ok(Err("manifest unknown".to_string())),
            }
        }
    }

    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);

    impl ProgressSink for Lines {
        fn progress(&self, message: &str) {
            self.0.lock().unwrap().push(message.to_string());
        }
    }

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn component(image: &str, digest: &str) -> ComponentSpec {
        ComponentSpec {
            name: "web".to_string(),
            image: image.to_string(),
            digest: digest.to_string(),
        }
    }

    #[tokio::test]
    async fn local_images_resolve_without_a_pull() {
        let store = FakeStore::default();
        store.local.lock().unwrap().insert(d('a'), d('a'));
        let lines = Lines::default();
        let id = resolve_image(&store, &component("demo/app:1", &d('a')), &lines)
            .await
            .unwrap();
        assert_eq!(id, d('a'));
        assert_eq!(
            lines.0.lock().unwrap().clone(),
            vec!["web: resolved demo/app@sha256:aaaaaaaaaaaa… to local image sha256:aaaaaaaaaaaa…"]
        );
    }

    #[tokio::test]
    async fn a_tag_with_other_content_refuses_before_pulling() {
        let store = FakeStore::default();
        store
            .local
            .lock()
            .unwrap()
            .insert("demo/app:1".to_string(), d('b'));
        match resolve_image(&store, &component("demo/app:1", &d('a')), &Lines::default()).await {
            Err(PluginError::DigestMismatch { actual, .. }) => assert_eq!(actual, d('b')),
            other => panic!("expected DigestMismatch, got {other:?}"),
        }
        let c = component("demo/app:1", &d('a'));
        match other_content_under_tag(&c, String::new()) {
            PluginError::DigestMismatch { actual, .. } => assert_eq!(actual, "an image without id"),
            other => panic!("expected DigestMismatch, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn missing_images_are_pulled_by_digest() {
        let mut store = FakeStore::default();
        store
            .registry
            .insert(format!("demo/app@{}", d('a')), d('c'));
        let lines = Lines::default();
        let id = resolve_image(&store, &component("demo/app", &d('a')), &lines)
            .await
            .unwrap();
        assert_eq!(id, d('c'));
        let lines = lines.0.lock().unwrap().clone();
        assert_eq!(lines[0], "web: pulling demo/app@sha256:aaaaaaaaaaaa…");
        assert_eq!(
            lines[1],
            "web: pulled demo/app@sha256:aaaaaaaaaaaa… as image sha256:cccccccccccc…"
        );

        match resolve_image(&store, &component("other/app", &d('a')), &Lines::default()).await {
            Err(PluginError::ImageUnavailable { detail, .. }) => {
                assert_eq!(detail, "manifest unknown")
            }
            other => panic!("expected ImageUnavailable, got {other:?}"),
        }
        assert!(matches!(
            resolve_image(&store, &component("broken/app", &d('a')), &Lines::default()).await,
            Err(PluginError::Backend(_))
        ));
        match resolve_image(&store, &component("liar/app", &d('a')), &Lines::default()).await {
            Err(PluginError::DigestMismatch { actual, .. }) => {
                assert!(actual.contains("after the pull"), "{actual}")
            }
            other => panic!("expected DigestMismatch, got {other:?}"),
        }
    }

    #[test]
    fn docker_host_parsing() {
        assert_eq!(
            socket_from_docker_host(None).unwrap(),
            PathBuf::from("/var/run/docker.sock")
        );
        assert_eq!(
            socket_from_docker_host(Some("")).unwrap(),
            PathBuf::from("/var/run/docker.sock")
        );
        assert_eq!(
            socket_from_docker_host(Some("unix:///run/user/1/docker.sock")).unwrap(),
            PathBuf::from("/run/user/1/docker.sock")
        );
        assert!(socket_from_docker_host(Some("tcp://1.2.3.4:2375")).is_err());
        assert!(socket_from_docker_host(Some("unix://")).is_err());
    }
}
