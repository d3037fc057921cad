//! Digests and the bits of image-reference syntax executors need to match them.
//!
//! The rule every docker-like executor applies (see ARCHITECTURE.md, "Digests of locally built
//! images"): a component digest names a local image when it equals the image *id* (the config
//! digest; locally built or imported images have only that) or when one of the image's
//! `RepoDigests` is exactly `<repo>@<digest>` (registry-synced images). These functions are that
//! rule without any engine client, so the docker, compose and ssh executors cannot drift apart.

use std::collections::HashMap;
use std::future::Future;

/// Checks the `sha256:<64 lowercase hex>` shape every digest in Stella has.
pub fn is_valid_digest(digest: &str) -> bool {
    match digest.strip_prefix("sha256:") {
        Some(hex) => {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        None => false,
    }
}

/// `demo/app:1` -> `demo/app`; `registry:5000/demo/app` stays as is (that colon is a port).
pub fn repository_of(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    match without_digest.rfind(':') {
        Some(i) if !without_digest[i + 1..].contains('/') => &without_digest[..i],
        _ => without_digest,
    }
}

/// The reference naming an explicit tag, if `image` carries one (`demo/app:1`).
pub fn tagged_reference(image: &str) -> Option<&str> {
    let without_digest = image.split('@').next().unwrap_or(image);
    (repository_of(without_digest) != without_digest).then_some(without_digest)
}

/// The engine reports Docker Hub repositories in their short form (`nginx`, `demo/app`), while a
/// job may spell them out (`docker.io/library/nginx`); compare both in the short form.
fn familiar(repo: &str) -> &str {
    let repo = repo
        .strip_prefix("docker.io/")
        .or_else(|| repo.strip_prefix("index.docker.io/"))
        .unwrap_or(repo);
    match repo.strip_prefix("library/") {
        Some(rest) if !rest.contains('/') => rest,
        _ => repo,
    }
}

/// Whether a `RepoDigests` entry (`repo@sha256:…`) is exactly `repo@digest`.
pub fn repo_digest_matches(entry: &str, repo: &str, digest: &str) -> bool {
    match entry.rsplit_once('@') {
        Some((r, d)) => d == digest && familiar(r) == familiar(repo),
        None => false,
    }
}

/// Whether a `RepoDigests` entry carries `digest`, whatever the repository.
pub fn repo_digest_has(entry: &str, digest: &str) -> bool {
    entry.rsplit_once('@').is_some_and(|(_, d)| d == digest)
}

/// The `RepoDigests` entry that makes an image match `repo@digest`, if any. Its spelling is the
/// engine's own, so it is what the engine resolves when used as a reference.
pub fn matching_repo_digest<'a, S: AsRef<str>>(
    repo_digests: &'a [S],
    repo: &str,
    digest: &str,
) -> Option<&'a str> {
    repo_digests
        .iter()
        .map(AsRef::as_ref)
        .find(|rd| repo_digest_matches(rd, repo, digest))
}

/// The whole matching rule: an image with id `image_id` and `repo_digests` is the one a
/// component of repository `repo` pinned to `digest` names.
pub fn image_matches<S: AsRef<str>>(
    image_id: &str,
    repo_digests: &[S],
    repo: &str,
    digest: &str,
) -> bool {
    image_id == digest || matching_repo_digest(repo_digests, repo, digest).is_some()
}

/// `sha256:0123456789ab…` for progress lines, which must stay short.
pub fn short_digest(digest: &str) -> String {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => format!("sha256:{}…", &hex[..12]),
        _ => digest.to_string(),
    }
}

/// The first 12 hex digits of a container or image id.
pub fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}

/// Works out which digest existing containers really run, remembering each image's
/// `RepoDigests` so that an inventory of many containers asks the engine once per image.
#[derive(Debug, Default)]
pub struct RunningDigests {
    repo_digests: HashMap<String, Vec<String>>,
}

impl RunningDigests {
    /// The digest a container of image `image_id` really runs: the one Stella asked for
    /// (`label_digest`) when its image is that digest, otherwise the image id (which then shows
    /// the drift). `fetch` yields the image's `RepoDigests` (empty when the image is gone); it
    /// is called only when needed and at most once per image.
    pub async fn resolve<E, Fut>(
        &mut self,
        image_id: &str,
        label_digest: Option<&str>,
        fetch: impl FnOnce() -> Fut,
    ) -> Result<String, E>
    where
        Fut: Future<Output = Result<Vec<String>, E>>,
    {
        let Some(wanted) = label_digest else {
            return Ok(image_id.to_string());
        };
        if wanted == image_id {
            return Ok(wanted.to_string());
        }
        if !self.repo_digests.contains_key(image_id) {
            let digests = fetch().await?;
            self.repo_digests.insert(image_id.to_string(), digests);
        }
        let carries = self
            .repo_digests
            .get(image_id)
            .is_some_and(|ds| ds.iter().any(|rd| repo_digest_has(rd, wanted)));
        Ok(if carries { wanted } else { image_id }.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn digest_shape() {
        assert!(is_valid_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!is_valid_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(!is_valid_digest(&format!("sha256:{}", "a".repeat(63))));
        assert!(!is_valid_digest(&format!("sha512:{}", "a".repeat(64))));
        assert!(!is_valid_digest("latest"));
    }

    #[test]
    fn repositories_and_tags() {
        assert_eq!(repository_of("demo/app:1"), "demo/app");
        assert_eq!(repository_of("demo/app"), "demo/app");
        assert_eq!(
            repository_of("registry:5000/demo/app"),
            "registry:5000/demo/app"
        );
        assert_eq!(
            repository_of("registry:5000/demo/app:2"),
            "registry:5000/demo/app"
        );
        assert_eq!(repository_of("demo/app@sha256:abc"), "demo/app");
        assert_eq!(tagged_reference("demo/app:1"), Some("demo/app:1"));
        assert_eq!(tagged_reference("demo/app"), None);
        assert_eq!(tagged_reference("registry:5000/demo/app"), None);
    }

    #[test]
    fn repo_digest_matching() {
        let d = d('a');
        assert!(repo_digest_matches(
            &format!("nginx@{d}"),
            "docker.io/library/nginx",
            &d
        ));
        assert!(repo_digest_matches(
            &format!("demo/app@{d}"),
            "demo/app",
            &d
        ));
        assert!(!repo_digest_matches(
            &format!("other/app@{d}"),
            "demo/app",
            &d
        ));
        assert!(!repo_digest_matches("demo/app", "demo/app", &d));
        assert!(repo_digest_has(&format!("other/app@{d}"), &d));
        assert!(!repo_digest_has("other/app", &d));
        assert_eq!(short_digest(&d), "sha256:aaaaaaaaaaaa…");
        assert_eq!(short_digest("latest"), "latest");
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id(&d), "aaaaaaaaaaaa");
        assert_eq!(short_id("abc"), "abc");
    }

    #[test]
    fn the_id_or_an_exact_repo_digest_matches() {
        let (a, b) = (d('a'), d('b'));
        let none: [&str; 0] = [];
        // Imported images have no repo digest: the id decides.
        assert!(image_matches(&a, &none, "demo/app", &a));
        assert!(!image_matches(&b, &none, "demo/app", &a));
        // Registry images: the repo digest must name the same repository.
        let rds = [format!("other/app@{a}"), format!("docker.io/demo/app@{a}")];
        assert!(image_matches(&b, &rds, "demo/app", &a));
        assert_eq!(
            matching_repo_digest(&rds, "demo/app", &a),
            Some(rds[1].as_str())
        );
        assert!(!image_matches(&b, &rds[..1], "demo/app", &a));
    }

    #[tokio::test]
    async fn running_digests_show_drift_and_ask_once_per_image() {
        let (a, b, img) = (d('a'), d('b'), d('c'));
        let mut digests = RunningDigests::default();
        let calls = std::cell::Cell::new(0);
        let fetch = || {
            calls.set(calls.get() + 1);
            let rds = vec![format!("demo/app@{a}")];
            async move { Ok::<_, String>(rds) }
        };
        // No label: what the container runs is its image.
        assert_eq!(digests.resolve(&img, None, fetch).await.unwrap(), img);
        // The label names the image id itself.
        assert_eq!(digests.resolve(&a, Some(&a), fetch).await.unwrap(), a);
        assert_eq!(calls.get(), 0);
        // The image carries the wanted digest as a repo digest.
        assert_eq!(digests.resolve(&img, Some(&a), fetch).await.unwrap(), a);
        // It does not carry this one: the image id shows the drift. Cached: no second fetch.
        assert_eq!(digests.resolve(&img, Some(&b), fetch).await.unwrap(), img);
        assert_eq!(calls.get(), 1);
        let failing = || async { Err::<Vec<String>, _>("engine down".to_string()) };
        assert_eq!(
            RunningDigests::default()
                .resolve(&img, Some(&a), failing)
                .await,
            Err("engine down".to_string())
        );
    }
}
