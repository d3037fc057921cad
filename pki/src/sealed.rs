//! Secrets sealed at rest with a key-encryption key (KEK): AES-256-GCM from ring.
//!
//! The KEK is 32 random bytes kept in a file as 64 hex digits (an optional trailing newline),
//! readable by its owner only; a file that group or others may read is refused. It is named by
//! its id — the first 16 hex digits of SHA-256 over the key — in errors and stored values; the
//! key itself is never printed.
//!
//! A sealed secret is text: `v1:<kek id>:<base64 of nonce (12 bytes) || ciphertext || tag>`.
//! Every seal draws a fresh random nonce, and the secret's name is the associated data, so a
//! sealed value moved to another name does not open.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use rand::rngs::OsRng;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Bytes of a key-encryption key.
pub const KEK_LEN: usize = 32;
/// The version prefix of sealed values this build writes and reads.
const SEALED_VERSION: &str = "v1";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("key-encryption key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key-encryption key file {path} is readable by group or others (mode {mode:04o}); \
         run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key-encryption key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "key-encryption key file {path}: expected 64 hexadecimal digits (32 bytes) and an \
         optional newline, {reason}"
    )]
    Format { path: PathBuf, reason: String },
    #[error("key-encryption key file {path} exists already; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error(
        "secret {name:?} was sealed with key-encryption key {sealed_with}, but this plane was \
         given key {have}: use the key-encryption key file the other replicas use"
    )]
    WrongKey {
        name: String,
        sealed_with: String,
        have: String,
    },
    #[error("{name}: not a sealed value ({reason})")]
    Malformed { name: String, reason: String },
    #[error(
        "{name}: the sealed value does not authenticate under key-encryption key {kek_id} \
         (tampered with, or stored under another name)"
    )]
    Unauthentic { name: String, kek_id: String },
    #[error("sealing or opening {name} failed in the cipher")]
    Seal { name: String },
}

/// The key that seals the plane's private keys in the database.
pub struct KeyEncryptionKey {
    key: [u8; KEK_LEN],
    key_id: String,
}

impl std::fmt::Debug for KeyEncryptionKey {
    // The key stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEncryptionKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Overwrites key material before its memory is freed (volatile writes are not optimised away).
fn wipe(bytes: &mut [u8]) {
    for byte in bytes.iter_mut() {
        // SAFETY: a valid, aligned, exclusive reference to one byte.
        unsafe { std::ptr::write_volatile(byte, 0) };
    }
}

impl Drop for KeyEncryptionKey {
    fn drop(&mut self) {
        wipe(&mut self.key);
    }
}

impl KeyEncryptionKey {
    fn from_bytes(key: [u8; KEK_LEN]) -> Self {
        let digest = Sha256::digest(key);
        let key_id = hex::encode(&digest[..8]);
        Self { key, key_id }
    }

    /// A new random key.
    pub fn generate() -> Self {
        let mut key = [0u8; KEK_LEN];
        OsRng.fill_bytes(&mut key);
        Self::from_bytes(key)
    }

    /// First 16 hex digits of SHA-256 over the key: names the key without revealing it.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Parses the file format (64 hex digits, optional trailing newline); `path` names the
    /// origin in errors. The text itself never appears in an error.
    pub fn parse(path: &Path, text: &str) -> Result<Self, SealError> {
        let format = |reason: String| SealError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let digits = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(text);
        if digits.len() != 2 * KEK_LEN {
            return Err(format(format!(
                "found {} characters",
                digits.chars().count()
            )));
        }
        let mut key = [0u8; KEK_LEN];
        hex::decode_to_slice(digits, &mut key)
            .map_err(|_| format("found characters that are not hexadecimal digits".into()))?;
        Ok(Self::from_bytes(key))
    }

    /// Reads a key file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let io = |source| SealError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(SealError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(SealError::Permissions {
                    path: path.to_path_buf(),
                    mode,
                });
            }
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let kek = Self::parse(path, &text);
        wipe(&mut text.into_bytes());
        kek
    }

    /// Writes a new random key to `path` (mode 0600), refusing to replace an existing file.
    pub fn generate_file(path: &Path) -> Result<Self, SealError> {
        let io = |source| SealError::Io {
            path: path.to_path_buf(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(SealError::Exists {
                path: path.to_path_buf(),
            });
        }
        let kek = Self::generate();
        let mut opts = std::fs::OpenOptions::new();
        // create_new: a file that appeared since the check above is not replaced either.
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => SealError::Exists {
                path: path.to_path_buf(),
            },
            _ => io(e),
        })?;
        let written = (|| {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            let mut text = hex::encode(kek.key).into_bytes();
            text.push(b'\n');
            let written = file.write_all(&text);
            wipe(&mut text);
            written?;
            file.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(path);
            return Err(io(e));
        }
        Ok(kek)
    }

    /// The AEAD key (AES-256 accepts every 32-byte key, so this fails only if ring does).
    fn aead(&self, name: &str) -> Result<LessSafeKey, SealError> {
        UnboundKey::new(&AES_256_GCM, &self.key)
            .map(LessSafeKey::new)
            .map_err(|_| SealError::Seal {
                name: name.to_string(),
            })
    }

    /// Seals `plaintext` stored under `name` (the associated data).
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let mut in_out = plaintext.to_vec();
        self.aead(name)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut in_out,
            )
            .map_err(|_| SealError::Seal {
                name: name.to_string(),
            })?;
        let mut blob = Vec::with_capacity(NONCE_LEN + in_out.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&in_out);
        Ok(format!(
            "{SEALED_VERSION}:{}:{}",
            self.key_id,
            STANDARD.encode(blob)
        ))
    }

    /// The key id a sealed value names (without opening it).
    pub fn sealed_key_id<'a>(name: &str, sealed: &'a str) -> Result<&'a str, SealError> {
        let malformed = |reason: &str| SealError::Malformed {
            name: name.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = sealed.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(SEALED_VERSION), Some(id), Some(_)) => Ok(id),
            (Some(v), Some(_), Some(_)) if v.starts_with('v') => {
                Err(malformed(&format!("unknown format version {v:?}")))
            }
            _ => Err(malformed("expected v1:<key id>:<base64>")),
        }
    }

    /// Opens a value sealed by [`KeyEncryptionKey::seal`] under the same `name`.
    pub fn open(&self, name: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let id = Self::sealed_key_id(name, sealed)?;
        if !bool::from(id.as_bytes().ct_eq(self.key_id.as_bytes())) {
            return Err(SealError::WrongKey {
                name: name.to_string(),
                sealed_with: id.to_string(),
                have: self.key_id.clone(),
            });
        }
        let malformed = |reason: &str| SealError::Malformed {
            name: name.to_string(),
            reason: reason.to_string(),
        };
        let encoded = sealed
            .rsplit_once(':')
            .map(|(_, b)| b)
            .ok_or_else(|| malformed("expected v1:<key id>:<base64>"))?;
        let blob = STANDARD
            .decode(encoded)
            .map_err(|_| malformed("the payload is not standard base64"))?;
        if blob.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(malformed("the payload is too short"));
        }
        let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| malformed("the payload is too short"))?;
        let mut in_out = ciphertext.to_vec();
        let plain = self
            .aead(name)?
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut in_out)
            .map_err(|_| SealError::Unauthentic {
                name: name.to_string(),
                kek_id: self.key_id.clone(),
            })?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_a_fresh_nonce_each_time() {
        let kek = KeyEncryptionKey::generate();
        let a = kek.seal("ca", b"secret pem").unwrap();
        let b = kek.seal("ca", b"secret pem").unwrap();
        assert_ne!(a, b, "every seal draws its own nonce");
        assert!(a.starts_with(&format!("v1:{}:", kek.key_id())), "{a}");
        assert!(!a.contains("secret"));
        assert_eq!(kek.open("ca", &a).unwrap(), b"secret pem");
        assert_eq!(kek.open("ca", &b).unwrap(), b"secret pem");
        assert_eq!(kek.key_id().len(), 16);
        assert!(!format!("{kek:?}").contains(&hex::encode(kek.key)));
    }

    #[test]
    fn another_key_is_refused_naming_both_ids() {
        let (one, two) = (KeyEncryptionKey::generate(), KeyEncryptionKey::generate());
        let sealed = one.seal("job-signing", b"k").unwrap();
        let e = two.open("job-signing", &sealed).unwrap_err();
        assert!(matches!(e, SealError::WrongKey { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(one.key_id()) && msg.contains(two.key_id()),
            "{msg}"
        );
        // Another key claiming the first key's id still does not open it.
        let forged = sealed.replace(one.key_id(), two.key_id());
        let e = two.open("job-signing", &forged).unwrap_err();
        assert!(matches!(e, SealError::Unauthentic { .. }), "{e}");
    }

    #[test]
    fn tampering_and_swapped_names_are_refused() {
        let kek = KeyEncryptionKey::generate();
        let sealed = kek.seal("ca", b"the ca key").unwrap();
        let (head, b64) = sealed.rsplit_once(':').unwrap();
        let mut blob = STANDARD.decode(b64).unwrap();
        for i in [0, NONCE_LEN, blob.len() - 1] {
            blob[i] ^= 1;
            let tampered = format!("{head}:{}", STANDARD.encode(&blob));
            let e = kek.open("ca", &tampered).unwrap_err();
            assert!(matches!(e, SealError::Unauthentic { .. }), "byte {i}: {e}");
            blob[i] ^= 1;
        }
        let e = kek.open("ca.next", &sealed).unwrap_err();
        assert!(matches!(e, SealError::Unauthentic { .. }), "{e}");
        assert!(e.to_string().contains("another name"), "{e}");
        for bad in [
            "",
            "v1:x",
            "v2:abc:AAAA",
            &format!("v1:{}:not base64!", kek.key_id()),
            &format!("v1:{}:AAAA", kek.key_id()),
        ] {
            let e = kek.open("ca", bad).unwrap_err();
            assert!(matches!(e, SealError::Malformed { .. }), "{bad:?}: {e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_written_0600_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let kek = KeyEncryptionKey::generate_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        let loaded = KeyEncryptionKey::load(&path).unwrap();
        assert_eq!(loaded.key_id(), kek.key_id());
        let sealed = kek.seal("x", b"y").unwrap();
        assert_eq!(loaded.open("x", &sealed).unwrap(), b"y");

        // Never overwritten.
        let e = KeyEncryptionKey::generate_file(&path).unwrap_err();
        assert!(matches!(e, SealError::Exists { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

        // Readable by others: refused with the path and the fix.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = KeyEncryptionKey::load(&path).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("chmod 600") && e.contains("640"),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

        // Wrong length, not hex, missing: clear, and the contents are never echoed.
        for (contents, expected) in [
            ("abcd\n", "found 4 characters"),
            (&"g".repeat(64)[..], "not hexadecimal"),
            (
                &format!("{}\n\n", "a".repeat(64))[..],
                "found 65 characters",
            ),
        ] {
            std::fs::write(&path, contents).unwrap();
            let e = KeyEncryptionKey::load(&path).unwrap_err().to_string();
            assert!(e.contains(expected) && e.contains("64 hexadecimal"), "{e}");
            assert!(!e.contains("gggg"), "{e}");
        }
        std::fs::write(&path, format!("{}\r\n", "A".repeat(64))).unwrap();
        assert!(KeyEncryptionKey::load(&path).is_ok());
        let e = KeyEncryptionKey::load(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
        let e = KeyEncryptionKey::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
