//! Files executors keep on the agent host (stickers, generated manifests), and the sticker's
//! encoding wherever it lives.
//!
//! Every file is replaced atomically: a sibling temp file is written and made durable, then
//! renamed over the target and the rename made durable, so a reader sees the old file or the new
//! one, never a torn one, even across a crash.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{PluginError, STICKER_SCHEMA, VersionSticker};

/// The sticker is meant to be read by operators.
pub const STICKER_MODE: u32 = 0o644;

/// A complete, durable sibling of `path` that has not replaced it yet. Dropped without
/// [`StagedFile::commit`], it removes itself and `path` stays as it was.
#[derive(Debug)]
pub struct StagedFile {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Writes `bytes` with permissions `mode` (on Unix, whatever the umask) to a new temp file
    /// next to `path`, creating `path`'s directory if needed, and syncs it.
    pub fn stage(path: &Path, bytes: &[u8], mode: u32) -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = path
            .parent()
            .ok_or_else(|| io::Error::other("path has no parent directory"))?;
        fs::create_dir_all(dir)?;
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::other("path has no UTF-8 file name"))?;
        let tmp = dir.join(format!(
            ".{file_name}.{}.{}.tmp",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let staged = Self {
            tmp,
            path: path.to_path_buf(),
            committed: false,
        };
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options.open(&staged.tmp)?;
        // The umask may have narrowed the mode given at creation.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok(staged)
    }

    /// Where the staged content is, e.g. to have a tool check it before it replaces `path`.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the staged file over `path` and makes the rename durable.
    pub fn commit(mut self) -> io::Result<()> {
        fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        match self.path.parent() {
            Some(dir) => fs::File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` atomically with permissions `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    StagedFile::stage(path, bytes, mode)?.commit()
}

/// The file's bytes, or `None` when it does not exist.
pub async fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match tokio::fs::read(path).await {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The file's text, or `None` when it does not exist; not UTF-8 is an error.
pub async fn read_optional_string(path: &Path) -> io::Result<Option<String>> {
    match tokio::fs::read_to_string(path).await {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The bytes of `sticker` as every executor writes it: pretty JSON and a final newline.
pub fn encode_sticker(sticker: &VersionSticker) -> Result<Vec<u8>, PluginError> {
    let mut bytes = serde_json::to_vec_pretty(sticker)
        .map_err(|e| PluginError::Sticker(format!("cannot encode sticker: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Parses a sticker read from `shown` (a path, for messages), refusing a schema this SDK does
/// not understand.
pub fn decode_sticker(bytes: &[u8], shown: &str) -> Result<VersionSticker, PluginError> {
    let sticker: VersionSticker = serde_json::from_slice(bytes)
        .map_err(|e| PluginError::Sticker(format!("{shown} is not a valid sticker: {e}")))?;
    if sticker.schema != STICKER_SCHEMA {
        return Err(PluginError::Sticker(format!(
            "{shown} has schema {:?}, expected {STICKER_SCHEMA:?}",
            sticker.schema
        )));
    }
    Ok(sticker)
}

/// Writes `sticker` to `path` on the agent host, atomically and world-readable.
pub async fn write_sticker(path: PathBuf, sticker: &VersionSticker) -> Result<(), PluginError> {
    let bytes = encode_sticker(sticker)?;
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || write_atomic(&path, &bytes, STICKER_MODE))
        .await
        .map_err(|e| PluginError::Sticker(format!("sticker writer failed: {e}")))?
        .map_err(|e| PluginError::Sticker(format!("cannot write {shown}: {e}")))
}

/// The sticker at `path` on the agent host, or `None` when there is none.
pub async fn read_sticker(path: &Path) -> Result<Option<VersionSticker>, PluginError> {
    let Some(bytes) = read_optional(path)
        .await
        .map_err(|e| PluginError::Sticker(format!("cannot read {}: {e}", path.display())))?
    else {
        return Ok(None);
    };
    decode_sticker(&bytes, &path.display().to_string()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ComponentSpec, DeploySpec, TargetRef};
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn staged_files_replace_or_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/file.yml");
        write_atomic(&path, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(mode_of(&path), 0o600);

        let staged = StagedFile::stage(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(staged.temp_path()).unwrap(), b"two");
        drop(staged);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);

        StagedFile::stage(&path, b"three", 0o644)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        assert_eq!(mode_of(&path), 0o644);
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    fn sticker() -> VersionSticker {
        let spec = DeploySpec {
            job_id: "j".to_string(),
            deployment_id: "d".to_string(),
            release_id: "r1".to_string(),
            release_name: "R".to_string(),
            target: TargetRef {
                name: "t".to_string(),
                kind: "docker".to_string(),
                config: serde_json::Value::Null,
            },
            components: vec![ComponentSpec {
                name: "web".to_string(),
                image: "demo/app:1".to_string(),
                digest: format!("sha256:{}", "c".repeat(64)),
            }],
            strategy: Default::default(),
        };
        VersionSticker::for_deploy(&spec, "2025-01-01T00:00:00Z".to_string())
    }

    #[tokio::test]
    async fn stickers_roundtrip_and_refuse_what_they_do_not_understand() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("targets/t").join(crate::STICKER_FILE_NAME);
        assert_eq!(read_sticker(&path).await.unwrap(), None);

        let s = sticker();
        write_sticker(path.clone(), &s).await.unwrap();
        assert_eq!(read_sticker(&path).await.unwrap(), Some(s.clone()));
        assert_eq!(mode_of(&path), STICKER_MODE);
        assert!(fs::read(&path).unwrap().ends_with(b"}\n"));
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);

        let mut next = s.clone();
        next.release_id = "r2".to_string();
        write_sticker(path.clone(), &next).await.unwrap();
        assert_eq!(read_sticker(&path).await.unwrap(), Some(next));

        let mut foreign = serde_json::to_value(&s).unwrap();
        foreign["schema"] = serde_json::json!("stella.version/v999");
        fs::write(&path, serde_json::to_vec(&foreign).unwrap()).unwrap();
        match read_sticker(&path).await {
            Err(PluginError::Sticker(m)) => assert!(m.contains("v999"), "{m}"),
            other => panic!("expected a sticker error, got {other:?}"),
        }
        fs::write(&path, b"{not json").unwrap();
        match read_sticker(&path).await {
            Err(PluginError::Sticker(m)) => assert!(m.contains("not a valid sticker"), "{m}"),
            other => panic!("expected a sticker error, got {other:?}"),
        }
        assert_eq!(
            decode_sticker(&encode_sticker(&s).unwrap(), "x").unwrap(),
            s
        );
    }

    #[tokio::test]
    async fn optional_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert_eq!(read_optional(&path).await.unwrap(), None);
        assert_eq!(read_optional_string(&path).await.unwrap(), None);
        fs::write(&path, b"text").unwrap();
        assert_eq!(read_optional(&path).await.unwrap(), Some(b"text".to_vec()));
        assert_eq!(
            read_optional_string(&path).await.unwrap(),
            Some("text".to_string())
        );
    }
}
