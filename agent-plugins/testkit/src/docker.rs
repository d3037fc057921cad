//! The machine's Docker Engine as tests use it: through the `docker` CLI, with images imported
//! from the static busybox binary (tests never pull), and guards that remove what a test made.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use serde_json::Value;
use stella_plugin_sdk::{ComponentSpec, ExecutorContext};

use crate::{must, unique};

/// The static busybox binary every test image is made of (`apt-get install busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";

/// A long-running CMD that exits promptly on SIGTERM (a bare `sleep` as PID 1 ignores it, and
/// every stop would then wait the engine's full 10 s grace period). `secs` varies the config so
/// that images built from it differ.
pub fn sleep_cmd(secs: u32) -> String {
    format!(
        r#"CMD ["/bin/busybox","sh","-c","trap 'exit 0' TERM; while :; do /bin/busybox sleep {secs} & wait $!; done"]"#
    )
}

/// Runs `docker <args>`, panics unless it succeeds, and returns its trimmed stdout.
pub fn docker(args: &[&str]) -> String {
    let out = must(
        Command::new("docker").args(args).output(),
        "docker CLI runs",
    );
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether `docker <args>` succeeds.
pub fn docker_ok(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `docker container inspect` of one container, as JSON.
pub fn inspect(container: &str) -> Value {
    let raw = docker(&["container", "inspect", container]);
    let v: Value = must(serde_json::from_str(&raw), "docker inspect prints JSON");
    v[0].clone()
}

/// When the container last started (`State.StartedAt`), to tell later whether it restarted.
pub fn started_at(container: &str) -> Value {
    inspect(container)["State"]["StartedAt"].clone()
}

/// The container still runs image `image` and has not been restarted since `started_at`.
pub fn assert_untouched(container: &str, image: &str, started_at: &Value) {
    let info = inspect(container);
    assert_eq!(
        info["Image"],
        Value::from(image),
        "{container} runs another image"
    );
    assert_eq!(
        &info["State"]["StartedAt"], started_at,
        "{container} was restarted"
    );
}

/// Whether the container exists (in any state).
pub fn exists(container: &str) -> bool {
    docker_ok(&["container", "inspect", container])
}

/// Full ids of every container (in any state) carrying `label` (`key=value`), sorted.
pub fn containers_labelled(label: &str) -> Vec<String> {
    let out = docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label={label}"),
    ]);
    let mut ids: Vec<String> = out.split_whitespace().map(String::from).collect();
    ids.sort();
    ids
}

/// Runs `image` detached as container `name` carrying `labels`, as someone acting behind the
/// executor's back would; returns the container id.
pub fn run_labelled(name: &str, labels: &[(&str, &str)], image: &str) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut args = vec!["run", "-d", "--name", name];
    for label in &labels {
        args.push("--label");
        args.push(label);
    }
    args.push(image);
    docker(&args)
}

/// A well-formed digest no image has: unique per call (and per `salt`, which callers vary per
/// test crate), so that no other test can make it resolvable by accident.
pub fn unknown_digest(salt: u64) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    format!(
        "sha256:{:016x}{:016x}{:016x}{:016x}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed),
        salt
    )
}

/// Imports a busybox rootfs as `reference` with the given Dockerfile `changes` (`CMD …`,
/// `HEALTHCHECK …`) and returns its image id. `content` is written into the image as a file,
/// so images differ in content and not just in config.
pub fn import_busybox_image(reference: &str, content: &str, changes: &[&str]) -> String {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} missing: apt-get install -y busybox-static"
    );
    let dir = must(tempfile::tempdir(), "temp dir");
    let rootfs = dir.path().join("rootfs");
    must(std::fs::create_dir_all(rootfs.join("bin")), "rootfs/bin");
    must(
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")),
        "copy busybox",
    );
    must(
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")),
        "bin/sh",
    );
    must(std::fs::write(rootfs.join("tag"), content), "rootfs/tag");
    let tar = dir.path().join("rootfs.tar");
    let status = must(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status(),
        "tar runs",
    );
    assert!(status.success(), "tar of the rootfs failed");
    let mut args = vec!["import".to_string()];
    for c in changes {
        args.push("--change".to_string());
        args.push(c.to_string());
    }
    args.push(tar.to_string_lossy().into_owned());
    args.push(reference.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args);
    docker(&["image", "inspect", "-f", "{{.Id}}", reference])
}

/// Removes, when dropped, what a test made on the engine: containers (named, or found by label),
/// networks and images, in that order. Failures are ignored: cleanup must never mask the
/// test's own result.
#[derive(Debug, Default)]
pub struct Cleanup {
    containers: Mutex<Vec<String>>,
    labels: Mutex<Vec<String>>,
    networks: Mutex<Vec<String>>,
    images: Mutex<Vec<String>>,
}

fn push(list: &Mutex<Vec<String>>, item: &str) {
    list.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(item.to_string());
}

fn take(list: &Mutex<Vec<String>>) -> Vec<String> {
    std::mem::take(&mut *list.lock().unwrap_or_else(PoisonError::into_inner))
}

impl Cleanup {
    /// A container, by name or id.
    pub fn container(&self, name: &str) {
        push(&self.containers, name);
    }

    /// Every container carrying `label` (`key=value`) when the guard drops.
    pub fn labelled(&self, label: &str) {
        push(&self.labels, label);
    }

    pub fn network(&self, name: &str) {
        push(&self.networks, name);
    }

    pub fn image(&self, reference: &str) {
        push(&self.images, reference);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut doomed = take(&self.containers);
        for label in take(&self.labels) {
            if let Ok(out) = Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("label={label}")])
                .output()
            {
                doomed.extend(
                    String::from_utf8_lossy(&out.stdout)
                        .split_whitespace()
                        .map(String::from),
                );
            }
        }
        for c in doomed {
            let _ = Command::new("docker").args(["rm", "-f", &c]).output();
        }
        for n in take(&self.networks) {
            let _ = Command::new("docker").args(["network", "rm", &n]).output();
        }
        for i in take(&self.images) {
            let _ = Command::new("docker").args(["rmi", "-f", &i]).output();
        }
    }
}

/// Per-test names (`id`, and an image repository `repo` of its own), a state directory for the
/// executor, and the [`Cleanup`] of everything the test makes.
#[derive(Debug)]
pub struct Scratch {
    pub id: String,
    /// `<prefix>-<id>/app`.
    pub repo: String,
    pub cleanup: Cleanup,
    /// Removed when dropped, like everything else.
    pub state: tempfile::TempDir,
}

impl Scratch {
    /// `prefix` tells the test crates' repositories apart (`stella-test`, `stella-ctest`, ...).
    pub fn new(prefix: &str) -> Self {
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} missing: apt-get install -y busybox-static"
        );
        let id = unique();
        Self {
            repo: format!("{prefix}-{id}/app"),
            id,
            cleanup: Cleanup::default(),
            state: must(tempfile::tempdir(), "state dir"),
        }
    }

    /// The context of an executor keeping its state in [`Scratch::state`].
    pub fn ctx(&self) -> ExecutorContext {
        ExecutorContext {
            state_dir: self.state.path().to_path_buf(),
        }
    }

    /// Imports a busybox image as `<repo>:<tag>` (see [`import_busybox_image`]); returns its id.
    pub fn image(&self, tag: &str, changes: &[&str]) -> String {
        let reference = format!("{}:{tag}", self.repo);
        self.cleanup.image(&reference);
        import_busybox_image(&reference, tag, changes)
    }

    /// An image whose CMD sleeps until stopped (see [`sleep_cmd`]).
    pub fn sleeper(&self, tag: &str, secs: u32) -> String {
        self.image(tag, &[&sleep_cmd(secs)])
    }

    /// Component `name` of image `<repo>:<tag>` pinned to `digest`.
    pub fn component(&self, name: &str, tag: &str, digest: &str) -> ComponentSpec {
        ComponentSpec {
            name: name.to_string(),
            image: format!("{}:{tag}", self.repo),
            digest: digest.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeper_cmd_and_unknown_digests() {
        let cmd = sleep_cmd(7);
        assert!(cmd.starts_with("CMD [") && cmd.contains("trap 'exit 0' TERM"));
        assert!(cmd.contains("sleep 7 &"));
        let (a, b) = (unknown_digest(1), unknown_digest(1));
        assert_ne!(a, b);
        assert!(stella_plugin_sdk::is_valid_digest(&a), "{a}");
    }

    #[test]
    fn images_are_imported_and_cleaned_up() {
        let reference = {
            let scratch = Scratch::new("stella-kit");
            let id = scratch.sleeper("v1", 3600);
            assert!(stella_plugin_sdk::is_valid_digest(&id), "{id}");
            assert_eq!(
                docker(&[
                    "image",
                    "inspect",
                    "-f",
                    "{{.Id}}",
                    &format!("{}:v1", scratch.repo)
                ]),
                id
            );
            let c = scratch.component("web", "v1", &id);
            assert_eq!(c.image, format!("{}:v1", scratch.repo));
            c.image
        };
        assert!(
            !docker_ok(&["image", "inspect", &reference]),
            "image left behind"
        );
    }
}
