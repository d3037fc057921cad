//! Names Stella derives from user input, and the bits of image-reference syntax it needs.

/// Keeps `[a-zA-Z0-9_.-]`, replaces everything else with `_`.
pub(crate) fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn container_name(target: &str, component: &str) -> String {
    format!("stella-{}-{}", sanitize(target), sanitize(component))
}

/// A single path segment for `target`. A leading dot is replaced so that names like `..` can
/// never climb out of the state directory, and the result is never empty.
pub(crate) fn path_segment(target: &str) -> String {
    let mut s = sanitize(target);
    if s.starts_with('.') {
        s.replace_range(0..1, "_");
    }
    if s.is_empty() {
        s.push('_');
    }
    s
}

/// `demo/app:1` -> `demo/app`; `registry:5000/demo/app` stays as is (that colon is a port).
pub(crate) fn repository_of(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    match without_digest.rfind(':') {
        Some(i) if !without_digest[i + 1..].contains('/') => &without_digest[..i],
        _ => without_digest,
    }
}

/// The reference naming an explicit tag, if `image` carries one (`demo/app:1`).
pub(crate) fn tagged_reference(image: &str) -> Option<&str> {
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
pub(crate) fn repo_digest_matches(entry: &str, repo: &str, digest: &str) -> bool {
    match entry.rsplit_once('@') {
        Some((r, d)) => d == digest && familiar(r) == familiar(repo),
        None => false,
    }
}

/// Whether a `RepoDigests` entry carries `digest`, whatever the repository.
pub(crate) fn repo_digest_has(entry: &str, digest: &str) -> bool {
    entry.rsplit_once('@').is_some_and(|(_, d)| d == digest)
}

/// `sha256:0123456789ab…` for progress lines, which must stay short.
pub(crate) fn short_digest(digest: &str) -> String {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => format!("sha256:{}…", &hex[..12]),
        _ => digest.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitized() {
        assert_eq!(container_name("prod/eu 1", "web"), "stella-prod_eu_1-web");
        assert_eq!(sanitize("a.b-c_D9"), "a.b-c_D9");
        assert_eq!(path_segment(".."), "_.");
        assert_eq!(path_segment(""), "_");
        assert_eq!(path_segment("a/../b"), "a_.._b");
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
        let d = format!("sha256:{}", "a".repeat(64));
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
        assert!(repo_digest_has(&format!("other/app@{d}"), &d));
        assert!(!repo_digest_has("other/app", &d));
        assert_eq!(short_digest(&d), "sha256:aaaaaaaaaaaa…");
    }
}
