//! Assertions on the errors and the sticker storage every executor shares, so that each test
//! states what it expects in one line and all executors are held to the same contract.

use std::fmt::Debug;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::{Value, json};
use stella_plugin_sdk::{
    ComponentSpec, DeploySpec, Executor, PluginError, STICKER_SCHEMA, TargetRef, VersionSticker,
    labels,
};

use crate::{must, spec};

/// A CMD that prints a line to stdout and one to stderr, then exits 3; see [`crash_reported`].
pub const CRASH_CMD: &str =
    r#"CMD ["/bin/busybox","sh","-c","echo starting up; echo fatal: boom-marker >&2; exit 3"]"#;

/// The error of a call that must have failed.
pub fn failure<T: Debug>(result: Result<T, PluginError>) -> PluginError {
    match result {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e,
    }
}

/// The message of an `InvalidConfig` error.
pub fn invalid_config(err: &PluginError) -> String {
    match err {
        PluginError::InvalidConfig(m) => {
            assert_eq!(err.reason_code(), "invalid_target_config");
            m.clone()
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

/// The message of a `Backend` error.
pub fn backend(err: &PluginError) -> String {
    match err {
        PluginError::Backend(m) => m.clone(),
        other => panic!("expected Backend, got {other:?}"),
    }
}

/// A `DigestMismatch` of `component`: wanted `expected`, found `actual`.
pub fn digest_mismatch(err: &PluginError, component: &str, expected: &str, actual: &str) {
    match err {
        PluginError::DigestMismatch {
            component: c,
            expected: e,
            actual: a,
            ..
        } => {
            assert_eq!(c, component);
            assert_eq!(e, expected);
            assert_eq!(a, actual);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert_eq!(err.reason_code(), "digest_mismatch");
}

/// An `ImageUnavailable` of `component` for `digest`; returns its (non-empty) detail.
pub fn unavailable(err: &PluginError, component: &str, digest: &str) -> String {
    match err {
        PluginError::ImageUnavailable {
            component: c,
            digest: d,
            detail,
        } => {
            assert_eq!(c, component);
            assert_eq!(d, digest);
            assert!(!detail.is_empty());
            assert_eq!(err.reason_code(), "image_unavailable");
            detail.clone()
        }
        other => panic!("expected ImageUnavailable, got {other:?}"),
    }
}

/// An `Unhealthy` of `component`; returns its detail and log tail.
pub fn unhealthy(err: &PluginError, component: &str) -> (String, String) {
    match err {
        PluginError::Unhealthy {
            component: c,
            detail,
            log_tail,
        } => {
            assert_eq!(c, component);
            assert_eq!(err.reason_code(), "unhealthy");
            (detail.clone(), log_tail.clone())
        }
        other => panic!("expected Unhealthy, got {other:?}"),
    }
}

/// `component`, running [`CRASH_CMD`], was reported as exited or restarting, with both lines
/// of its output in the log tail.
pub fn crash_reported(err: &PluginError, component: &str) {
    let (detail, log_tail) = unhealthy(err, component);
    assert!(
        detail.contains("exit") || detail.contains("restart"),
        "{detail}"
    );
    assert!(log_tail.contains("boom-marker"), "{log_tail:?}");
    assert!(log_tail.contains("starting up"), "{log_tail:?}");
}

/// `info` (`docker inspect` of a container) is the container a docker-like executor creates
/// for component `c` of `spec`: named `stella-<target>-<component>`, running, created from the
/// image *id* `image_id` (never from the tag), restarting unless stopped, and carrying every
/// label of the release.
pub fn stella_container(info: &Value, spec: &DeploySpec, c: &ComponentSpec, image_id: &str) {
    assert_eq!(info["Image"], json!(image_id));
    assert_eq!(
        info["Config"]["Image"],
        json!(image_id),
        "created from the id, not the tag"
    );
    assert_eq!(
        info["Name"],
        json!(format!("/stella-{}-{}", spec.target.name, c.name))
    );
    assert_eq!(info["State"]["Status"], json!("running"));
    assert_eq!(
        info["HostConfig"]["RestartPolicy"]["Name"],
        json!("unless-stopped")
    );
    let on_container = &info["Config"]["Labels"];
    for (key, value) in labels::container_labels(spec, c) {
        assert_eq!(on_container[key], json!(value), "label {key}");
    }
}

/// Checks `exec`'s sticker of `target`, which lives at `path` on this machine: none at first;
/// written and read back whole, mode 0644, alone in its directory (no temp files left behind);
/// replaced whole; and a sticker of another schema or a file that is not JSON is a sticker
/// error. Returns the sticker it wrote first.
pub async fn sticker_roundtrip(
    exec: &dyn Executor,
    target: &TargetRef,
    path: &Path,
) -> VersionSticker {
    assert_eq!(must(exec.read_sticker(target).await, "read sticker"), None);
    let s = spec(
        target,
        "r1",
        vec![ComponentSpec {
            name: "web".to_string(),
            image: "demo/app:1".to_string(),
            digest: format!("sha256:{}", "c".repeat(64)),
        }],
    );
    let sticker = VersionSticker::for_deploy(&s, "2025-01-01T00:00:00Z".to_string());
    must(exec.write_sticker(target, &sticker).await, "write sticker");
    assert_eq!(
        must(exec.read_sticker(target).await, "read sticker"),
        Some(sticker.clone())
    );
    let on_disk: VersionSticker = must(
        serde_json::from_slice(&must(std::fs::read(path), "sticker file")),
        "JSON",
    );
    assert_eq!(on_disk, sticker);
    let mode = must(std::fs::metadata(path), "sticker metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);

    let mut next = sticker.clone();
    next.release_id = "r2".to_string();
    must(exec.write_sticker(target, &next).await, "overwrite sticker");
    assert_eq!(
        must(exec.read_sticker(target).await, "read sticker"),
        Some(next)
    );
    let dir = path.parent().unwrap_or(Path::new("/"));
    let entries: Vec<String> = must(std::fs::read_dir(dir), "sticker directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    assert_eq!(entries, vec![name], "only the sticker in its directory");

    let mut foreign = must(serde_json::to_value(&sticker), "sticker as JSON");
    foreign["schema"] = json!("stella.version/v999");
    must(
        std::fs::write(path, must(serde_json::to_vec(&foreign), "JSON")),
        "write foreign sticker",
    );
    assert!(matches!(
        exec.read_sticker(target).await,
        Err(PluginError::Sticker(_))
    ));
    must(std::fs::write(path, b"{not json"), "write garbage");
    assert!(matches!(
        exec.read_sticker(target).await,
        Err(PluginError::Sticker(_))
    ));
    assert_eq!(STICKER_SCHEMA, sticker.schema);
    sticker
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_told_apart() {
        let d = format!("sha256:{}", "a".repeat(64));
        let mismatch = PluginError::DigestMismatch {
            component: "api".to_string(),
            image: "x".to_string(),
            expected: d.clone(),
            actual: "sha256:b".to_string(),
        };
        digest_mismatch(&mismatch, "api", &d, "sha256:b");
        let crash = PluginError::Unhealthy {
            component: "web".to_string(),
            detail: "container exited with code 3".to_string(),
            log_tail: "starting up\nfatal: boom-marker".to_string(),
        };
        crash_reported(&crash, "web");
        assert_eq!(
            invalid_config(&failure(Err::<(), _>(PluginError::InvalidConfig(
                "k: bad".to_string()
            )))),
            "k: bad"
        );
        assert_eq!(backend(&PluginError::Backend("down".to_string())), "down");
        let gone = PluginError::ImageUnavailable {
            component: "web".to_string(),
            digest: d.clone(),
            detail: "no pull".to_string(),
        };
        assert_eq!(unavailable(&gone, "web", &d), "no pull");
    }

    #[test]
    #[should_panic(expected = "expected Backend")]
    fn a_wrong_error_panics() {
        backend(&PluginError::Sticker("x".to_string()));
    }
}
