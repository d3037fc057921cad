//! Names Stella derives from user input, and the bits of image-reference syntax it needs.
//!
//! Executors never depend on each other, so the reference helpers mirror the docker executor's.

/// Keeps `[a-zA-Z0-9_.-]`, replaces everything else with `_`: the characters compose accepts in
/// a service name.
pub(crate) fn service_name(component: &str) -> String {
    component
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether `name` is a project name every compose flavour accepts as is: compose v2 refuses
/// anything else and v1 would silently rewrite it (so its labels would not match the name).
pub(crate) fn is_valid_project(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && name.len() <= 63
}

/// `stella-<target>`, made a valid project name. When the target name had to be rewritten
/// (upper case, `/`, spaces...) a short hash of the original is appended, so that targets
/// `a.b` and `a-b` can never share one project: a shared project would make each deployment
/// remove the other's services as orphans.
pub(crate) fn default_project(target: &str) -> String {
    let mut cleaned: String = target
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    let rewritten = cleaned != target;
    // Leave room for the prefix and the hash within the 63 characters.
    cleaned.truncate(40);
    if rewritten {
        format!("stella-{cleaned}-{:08x}", fnv1a32(target.as_bytes()))
    } else {
        format!("stella-{cleaned}")
    }
}

/// A single path segment for `target`. A leading dot is replaced so that names like `..` can
/// never climb out of the state directory, and the result is never empty.
pub(crate) fn path_segment(target: &str) -> String {
    let mut s = service_name(target);
    if s.starts_with('.') {
        s.replace_range(0..1, "_");
    }
    if s.is_empty() {
        s.push('_');
    }
    s
}

/// FNV-1a: stable across releases and platforms, which `std`'s hashers do not promise.
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
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

/// The first 12 hex digits of a container or image id.
pub(crate) fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_and_paths() {
        assert_eq!(service_name("web"), "web");
        assert_eq!(service_name("a/b c"), "a_b_c");
        assert_eq!(service_name("a.b-c_D9"), "a.b-c_D9");
        assert_eq!(path_segment(".."), "_.");
        assert_eq!(path_segment(""), "_");
        assert_eq!(path_segment("a/../b"), "a_.._b");
    }

    #[test]
    fn project_names() {
        assert_eq!(default_project("prod-1"), "stella-prod-1");
        let rewritten = default_project("Prod/EU 1");
        assert!(rewritten.starts_with("stella-prod-eu-1-"), "{rewritten}");
        assert!(is_valid_project(&rewritten));
        // Names that clean up to the same string still get distinct projects.
        assert_ne!(default_project("a.b"), default_project("a-b"));
        assert_ne!(default_project("A.b"), default_project("a.B"));
        assert!(is_valid_project(&default_project(&"X".repeat(300))));
        assert!(is_valid_project("stella-x_1"));
        assert!(!is_valid_project("Stella"));
        assert!(!is_valid_project("-x"));
        assert!(!is_valid_project(""));
        assert!(!is_valid_project("a.b"));
        assert!(!is_valid_project(&"a".repeat(64)));
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
        assert!(!repo_digest_matches(
            &format!("other/app@{d}"),
            "demo/app",
            &d
        ));
        assert!(repo_digest_has(&format!("other/app@{d}"), &d));
        assert!(!repo_digest_has("other/app", &d));
        assert_eq!(short_digest(&d), "sha256:aaaaaaaaaaaa…");
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
    }
}
