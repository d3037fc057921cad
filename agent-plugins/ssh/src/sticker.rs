//! The version sticker of ssh targets, kept on the target host itself and moved over SFTP.

use russh::ChannelMsg;
use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, OpenFlags, Packet, StatusCode};
use stella_plugin_sdk::files::{STICKER_MODE, decode_sticker, encode_sticker};
use stella_plugin_sdk::{PluginError, STICKER_FILE_NAME, VersionSticker};
use tracing::{debug, info};

use crate::conn::Connection;

/// OpenSSH's atomic rename (plain SFTP rename refuses to replace an existing file).
const POSIX_RENAME: &str = "posix-rename@openssh.com";
const FSYNC: &str = "fsync@openssh.com";
/// A sticker is a few KiB; anything far larger at that path is not one.
const MAX_STICKER_BYTES: u64 = 4 << 20;
const CHUNK: u32 = 32 * 1024;

fn sticker_err(path: &str, what: &str, e: impl std::fmt::Display) -> PluginError {
    PluginError::Sticker(format!("{path}: {what}: {e}"))
}

fn status_code(e: &SftpError) -> Option<StatusCode> {
    match e {
        SftpError::Status(s) => Some(s.status_code),
        _ => None,
    }
}

struct Sftp {
    session: RawSftpSession,
    posix_rename: bool,
    fsync: bool,
}

async fn open(conn: &Connection, timeout_secs: u64) -> Result<Sftp, PluginError> {
    let dest = conn.destination();
    let mut channel = conn.open_channel().await?;
    channel
        .request_subsystem(true, "sftp")
        .await
        .map_err(|e| PluginError::Sticker(format!("{dest}: cannot start SFTP: {e}")))?;
    // Wait for the answer to the subsystem request: a server without SFTP would otherwise
    // only show up as a protocol timeout.
    loop {
        match channel.wait().await {
            Some(ChannelMsg::Success) => break,
            Some(ChannelMsg::Failure) => {
                return Err(PluginError::Sticker(format!(
                    "{dest}: the SSH server refused the sftp subsystem (is `Subsystem sftp` \
                     configured in its sshd_config?)"
                )));
            }
            Some(ChannelMsg::Close) | Some(ChannelMsg::Eof) | None => {
                return Err(PluginError::Sticker(format!(
                    "{dest}: the SSH server closed the SFTP channel"
                )));
            }
            Some(other) => debug!(?other, "ignoring message before sftp start"),
        }
    }
    let session = RawSftpSession::new(channel.into_stream());
    session.set_timeout(timeout_secs.max(1));
    let version = session
        .init()
        .await
        .map_err(|e| PluginError::Sticker(format!("{dest}: SFTP handshake failed: {e}")))?;
    let has = |name: &str| version.extensions.get(name).is_some_and(|v| v == "1");
    Ok(Sftp {
        posix_rename: has(POSIX_RENAME),
        fsync: has(FSYNC),
        session,
    })
}

fn ssh_string(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn parent_of(path: &str) -> Option<&str> {
    let (parent, _) = path.rsplit_once('/')?;
    (!parent.is_empty()).then_some(parent)
}

fn file_name_of(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

impl Sftp {
    /// `mkdir -p`: each missing ancestor, leaving existing ones alone.
    async fn create_dirs(&self, dir: &str) -> Result<(), PluginError> {
        let mut missing = Vec::new();
        let mut cur = Some(dir);
        while let Some(d) = cur {
            match self.session.stat(d).await {
                Ok(_) => break,
                Err(e) if status_code(&e) == Some(StatusCode::NoSuchFile) => {
                    missing.push(d);
                    cur = parent_of(d);
                }
                Err(e) => return Err(sticker_err(d, "cannot stat", e)),
            }
        }
        for d in missing.into_iter().rev() {
            let attrs = FileAttributes {
                permissions: Some(0o755),
                ..FileAttributes::empty()
            };
            if let Err(e) = self.session.mkdir(d, attrs).await {
                // Someone else may have created it in between; only a missing dir is fatal.
                if self.session.stat(d).await.is_err() {
                    return Err(sticker_err(d, "cannot create directory", e));
                }
            }
        }
        Ok(())
    }

    async fn write_file(&self, path: &str, bytes: &[u8]) -> Result<(), PluginError> {
        let attrs = FileAttributes {
            permissions: Some(STICKER_MODE),
            ..FileAttributes::empty()
        };
        let handle = self
            .session
            .open(
                path,
                OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUDE,
                attrs,
            )
            .await
            .map_err(|e| sticker_err(path, "cannot create", e))?
            .handle;
        let result = async {
            let mut offset = 0u64;
            for chunk in bytes.chunks(CHUNK as usize) {
                self.session
                    .write(handle.as_str(), offset, chunk.to_vec())
                    .await
                    .map_err(|e| sticker_err(path, "cannot write", e))?;
                offset += chunk.len() as u64;
            }
            // The umask may have narrowed the mode given at creation; the sticker is meant to
            // be world-readable so that operators can inspect it.
            let mode = FileAttributes {
                permissions: Some(STICKER_MODE),
                ..FileAttributes::empty()
            };
            self.session
                .fsetstat(handle.as_str(), mode)
                .await
                .map_err(|e| sticker_err(path, "cannot set mode", e))?;
            if self.fsync {
                let mut data = Vec::new();
                ssh_string(&mut data, &handle);
                let reply = self
                    .session
                    .extended(FSYNC, data)
                    .await
                    .map_err(|e| sticker_err(path, "cannot fsync", e))?;
                check_status(reply).map_err(|e| sticker_err(path, "cannot fsync", e))?;
            }
            Ok(())
        }
        .await;
        let closed = self.session.close(handle.as_str()).await;
        result?;
        closed.map_err(|e| sticker_err(path, "cannot close", e))?;
        Ok(())
    }

    async fn rename_over(&self, from: &str, to: &str) -> Result<(), PluginError> {
        if self.posix_rename {
            let mut data = Vec::new();
            ssh_string(&mut data, from);
            ssh_string(&mut data, to);
            let reply = self
                .session
                .extended(POSIX_RENAME, data)
                .await
                .map_err(|e| sticker_err(to, "cannot rename into place", e))?;
            return check_status(reply).map_err(|e| sticker_err(to, "cannot rename into place", e));
        }
        // Without the extension, SFTP rename refuses an existing target: remove it first. A
        // reader may then briefly see no sticker, never a torn one.
        match self.session.remove(to).await {
            Ok(_) => {}
            Err(e) if status_code(&e) == Some(StatusCode::NoSuchFile) => {}
            Err(e) => return Err(sticker_err(to, "cannot replace", e)),
        }
        self.session
            .rename(from, to)
            .await
            .map(|_| ())
            .map_err(|e| sticker_err(to, "cannot rename into place", e))
    }

    async fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, PluginError> {
        let handle = match self
            .session
            .open(path, OpenFlags::READ, FileAttributes::empty())
            .await
        {
            Ok(h) => h.handle,
            Err(e) if status_code(&e) == Some(StatusCode::NoSuchFile) => return Ok(None),
            Err(e) => return Err(sticker_err(path, "cannot open", e)),
        };
        let result = async {
            let mut bytes = Vec::new();
            loop {
                match self
                    .session
                    .read(handle.as_str(), bytes.len() as u64, CHUNK)
                    .await
                {
                    Ok(data) if data.data.is_empty() => break,
                    Ok(data) => {
                        bytes.extend_from_slice(&data.data);
                        if bytes.len() as u64 > MAX_STICKER_BYTES {
                            return Err(PluginError::Sticker(format!(
                                "{path}: larger than {MAX_STICKER_BYTES} bytes, not a sticker"
                            )));
                        }
                    }
                    Err(e) if status_code(&e) == Some(StatusCode::Eof) => break,
                    Err(e) => return Err(sticker_err(path, "cannot read", e)),
                }
            }
            Ok(bytes)
        }
        .await;
        if let Err(e) = self.session.close(handle.as_str()).await {
            debug!(path, error = %e, "closing the sticker handle failed");
        }
        result.map(Some)
    }
}

fn check_status(reply: Packet) -> Result<(), SftpError> {
    match reply {
        Packet::Status(s) if s.status_code == StatusCode::Ok => Ok(()),
        Packet::Status(s) => Err(SftpError::Status(s)),
        _ => Err(SftpError::UnexpectedPacket),
    }
}

/// Readers must see either the old sticker or the new one, never a torn file: write a sibling
/// temp file, make it durable where the server allows, then rename it over the sticker.
pub(crate) async fn write(
    conn: &Connection,
    path: &str,
    sticker: &VersionSticker,
    timeout_secs: u64,
) -> Result<(), PluginError> {
    let bytes = encode_sticker(sticker)?;
    let sftp = open(conn, timeout_secs).await?;
    if let Some(dir) = parent_of(path) {
        sftp.create_dirs(dir).await?;
    }
    let name = file_name_of(path);
    let name = if name.is_empty() {
        STICKER_FILE_NAME
    } else {
        name
    };
    let tmp = format!(
        "{}/.{name}.{}.tmp",
        parent_of(path).unwrap_or(""),
        unique_suffix()
    );
    let result = async {
        sftp.write_file(&tmp, &bytes).await?;
        sftp.rename_over(&tmp, path).await
    }
    .await;
    if result.is_err() {
        // Best effort: a leftover temp file is harmless but untidy.
        let _ = sftp.session.remove(tmp.as_str()).await;
    }
    let _ = sftp.session.close_session();
    result?;
    info!(dest = conn.destination(), path, "sticker written");
    Ok(())
}

pub(crate) async fn read(
    conn: &Connection,
    path: &str,
    timeout_secs: u64,
) -> Result<Option<VersionSticker>, PluginError> {
    let sftp = open(conn, timeout_secs).await?;
    let bytes = sftp.read_file(path).await;
    let _ = sftp.session.close_session();
    let Some(bytes) = bytes? else {
        return Ok(None);
    };
    decode_sticker(&bytes, path).map(Some)
}

/// Distinct per agent process and call, so that two agents (or two jobs) never share a temp
/// file.
fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}.{nanos:x}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(parent_of("/var/lib/stella/x.json"), Some("/var/lib/stella"));
        assert_eq!(parent_of("/x.json"), None);
        assert_eq!(file_name_of("/var/lib/stella/x.json"), "x.json");
        let mut v = Vec::new();
        ssh_string(&mut v, "ab");
        assert_eq!(v, vec![0, 0, 0, 2, b'a', b'b']);
    }
}
