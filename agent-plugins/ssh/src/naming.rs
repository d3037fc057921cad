//! Names Stella derives from user input, shell quoting for remote commands, and the bits of
//! image-reference syntax docker mode needs. The image helpers mirror the docker executor's so
//! both executors agree on what a digest matches (executors may not depend on each other).

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

/// `STELLA_IMAGE_<NAME>`: the component name upper-cased, anything but `[A-Z0-9]` as `_`, so
/// that every component name gives a valid shell variable name.
pub(crate) fn image_env_name(component: &str) -> String {
    let mut name = String::from("STELLA_IMAGE_");
    name.extend(component.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    name
}

/// Quotes `s` as one word for a POSIX shell. The caller guarantees there is no NUL byte in it
/// (a command line cannot carry one); everything else, newlines included, survives verbatim.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            // Close the quote, emit an escaped quote, reopen.
            out.push_str(r"'\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
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

pub(crate) fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitized() {
        assert_eq!(container_name("prod/eu 1", "web"), "stella-prod_eu_1-web");
        assert_eq!(image_env_name("web-api.v2"), "STELLA_IMAGE_WEB_API_V2");
        assert_eq!(image_env_name("Worker"), "STELLA_IMAGE_WORKER");
    }

    #[test]
    fn quoting_survives_a_shell() {
        for s in [
            "plain",
            "it's",
            "a b\nc",
            "$(touch /x) `y` \"z\" \\",
            "",
            "'''",
        ] {
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("printf %s {}", quote(s)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), s);
        }
    }

    #[test]
    fn repositories_and_tags() {
        assert_eq!(repository_of("demo/app:1"), "demo/app");
        assert_eq!(
            repository_of("registry:5000/demo/app"),
            "registry:5000/demo/app"
        );
        assert_eq!(repository_of("demo/app@sha256:abc"), "demo/app");
        assert_eq!(tagged_reference("demo/app:1"), Some("demo/app:1"));
        assert_eq!(tagged_reference("demo/app"), None);
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
        assert_eq!(short_digest(&d), "sha256:aaaaaaaaaaaa…");
        assert_eq!(short_id(&d), "aaaaaaaaaaaa");
    }
}
