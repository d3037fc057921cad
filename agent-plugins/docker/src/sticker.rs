//! The version sticker of docker targets, kept on the agent host (a docker target has no
//! filesystem of its own that outlives its containers).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use stella_plugin_sdk::{PluginError, STICKER_FILE_NAME, STICKER_SCHEMA, VersionSticker};

use crate::naming::path_segment;

pub(crate) fn sticker_path(state_dir: &Path, target: &str) -> PathBuf {
    state_dir
        .join("targets")
        .join(path_segment(target))
        .join(STICKER_FILE_NAME)
}

pub(crate) async fn write(path: PathBuf, sticker: &VersionSticker) -> Result<(), PluginError> {
    let mut bytes = serde_json::to_vec_pretty(sticker)
        .map_err(|e| PluginError::Sticker(format!("cannot encode sticker: {e}")))?;
    bytes.push(b'\n');
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
        .await
        .map_err(|e| PluginError::Sticker(format!("sticker writer failed: {e}")))?
        .map_err(|e| PluginError::Sticker(format!("cannot write {shown}: {e}")))
}

pub(crate) async fn read(path: &Path) -> Result<Option<VersionSticker>, PluginError> {
    let bytes = match tokio::fs::read(path).await {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(PluginError::Sticker(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let sticker: VersionSticker = serde_json::from_slice(&bytes).map_err(|e| {
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

/// Readers must see either the old sticker or the new one, never a torn file, even across a
/// crash: write a sibling temp file, make it durable, then rename over the target.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("sticker path has no parent directory"))?;
    fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(STICKER_FILE_NAME);
    let tmp = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o644);
        }
        let mut file = options.open(&tmp)?;
        // The umask may have narrowed the mode given at creation; the sticker is meant to be
        // world-readable so that operators can inspect it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(0o644))?;
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
