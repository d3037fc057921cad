//! Files in the project directory: the lock file and the version sticker. Both are replaced
//! atomically, so a reader (or compose) sees the old file or the new one, never a torn one, even
//! across a crash.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use stella_plugin_sdk::{PluginError, STICKER_SCHEMA, VersionSticker};

/// The lock file carries environment values, which may be secrets.
pub(crate) const LOCK_FILE_MODE: u32 = 0o600;
/// The sticker is meant to be read by operators.
pub(crate) const STICKER_MODE: u32 = 0o644;

/// A complete, durable sibling of `path` that has not replaced it yet. Dropped without
/// [`StagedFile::commit`], it removes itself and `path` stays as it was.
pub(crate) struct StagedFile {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl StagedFile {
    pub(crate) fn stage(path: &Path, bytes: &[u8], mode: u32) -> io::Result<Self> {
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

    pub(crate) fn temp_path(&self) -> &Path {
        &self.tmp
    }

    pub(crate) fn commit(mut self) -> io::Result<()> {
        fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        // Make the rename itself durable.
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

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    StagedFile::stage(path, bytes, mode)?.commit()
}

/// The file's text, or `None` when it does not exist.
pub(crate) async fn read_optional(path: &Path) -> io::Result<Option<String>> {
    match tokio::fs::read_to_string(path).await {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) async fn write_sticker(
    path: PathBuf,
    sticker: &VersionSticker,
) -> Result<(), PluginError> {
    let mut bytes = serde_json::to_vec_pretty(sticker)
        .map_err(|e| PluginError::Sticker(format!("cannot encode sticker: {e}")))?;
    bytes.push(b'\n');
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || write_atomic(&path, &bytes, STICKER_MODE))
        .await
        .map_err(|e| PluginError::Sticker(format!("sticker writer failed: {e}")))?
        .map_err(|e| PluginError::Sticker(format!("cannot write {shown}: {e}")))
}

pub(crate) async fn read_sticker(path: &Path) -> Result<Option<VersionSticker>, PluginError> {
    let Some(text) = read_optional(path)
        .await
        .map_err(|e| PluginError::Sticker(format!("cannot read {}: {e}", path.display())))?
    else {
        return Ok(None);
    };
    let sticker: VersionSticker = serde_json::from_str(&text).map_err(|e| {
        PluginError::Sticker(format!("{} is not a valid sticker: {e}", path.display()))
    })?;
    if sticker.schema != STICKER_SCHEMA {
        return Err(PluginError::Sticker(format!(
            "{} has schema {:?}, expected {STICKER_SCHEMA:?}",
            path.display(),
            sticker.schema
        )));
    }
    Ok(Some(sticker))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn staged_files_replace_or_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/file.yml");
        write_atomic(&path, b"one", LOCK_FILE_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let staged = StagedFile::stage(&path, b"two", LOCK_FILE_MODE).unwrap();
        assert_eq!(fs::read(staged.temp_path()).unwrap(), b"two");
        drop(staged);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);

        StagedFile::stage(&path, b"three", LOCK_FILE_MODE)
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }
}
