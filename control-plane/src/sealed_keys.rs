//! The plane's private keys sealed in the database (`stella serve --key-encryption-key-file`),
//! so that every replica of one database signs with the same keys and a rotation made through
//! one replica reaches the others without copying files.
//!
//! Table `plane_secrets` (migration 0013): one row per secret, `sealed` being
//! `v1:<kek id>:<base64>` from [`stella_pki::KeyEncryptionKey::seal`] with the row's name as
//! associated data. Names: [`CA`] and [`NEXT_CA`] (JSON `{"cert_pem","key_pem"}`), [`JOB_KEY`],
//! [`NEXT_JOB_KEY`] and [`EVIDENCE_KEY`] (PKCS#8 PEM). A staged key is inserted with `ON CONFLICT
//! DO NOTHING` and read back, so replicas staging at once agree on the winner's key; finishing a
//! rotation moves the staged row onto the active name in one write transaction.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use stella_pki::{CertificateAuthority, KeyEncryptionKey, SealError, SigningKey};

use crate::store::{Db, now_ms, write_tx};

pub const CA: &str = "ca";
pub const NEXT_CA: &str = "ca.next";
pub const JOB_KEY: &str = "job-signing";
pub const NEXT_JOB_KEY: &str = "job-signing.next";
pub const EVIDENCE_KEY: &str = "evidence";
/// Every plane needs these; the `.next` ones exist during a rotation only.
pub const REQUIRED: [&str; 3] = [CA, JOB_KEY, EVIDENCE_KEY];

#[derive(Debug, thiserror::Error)]
pub enum SealedKeysError {
    // The driver's message is part of ours (not a `source`), as in `store::StoreError`.
    #[error(
        "the sealed plane keys (table plane_secrets): {0} (a database whose schema predates \
         migration 0013 needs `stella migrate`)"
    )]
    Db(sqlx::Error),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("sealed secret {name}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("sealed secret {name} is missing from the database")]
    Missing { name: String },
    #[error("{0}")]
    Conflict(String),
}

impl From<sqlx::Error> for SealedKeysError {
    fn from(e: sqlx::Error) -> Self {
        SealedKeysError::Db(e)
    }
}

/// Everything the plane signs with: the same in file and sealed mode.
pub struct KeyMaterial {
    pub ca: Arc<CertificateAuthority>,
    pub next_ca: Option<Arc<CertificateAuthority>>,
    pub job: SigningKey,
    pub next_job: Option<SigningKey>,
    pub evidence: SigningKey,
}

#[derive(Serialize, Deserialize)]
struct CaPem {
    cert_pem: String,
    key_pem: String,
}

fn invalid(name: &str) -> impl FnOnce(String) -> SealedKeysError + '_ {
    move |reason| SealedKeysError::Invalid {
        name: name.to_string(),
        reason,
    }
}

pub fn encode_ca(name: &str, ca: &CertificateAuthority) -> Result<String, SealedKeysError> {
    serde_json::to_string(&CaPem {
        cert_pem: ca.cert_pem().to_string(),
        key_pem: ca.key_pem(),
    })
    .map_err(|e| invalid(name)(e.to_string()))
}

fn decode_ca(name: &str, text: &str) -> Result<CertificateAuthority, SealedKeysError> {
    let pem: CaPem = serde_json::from_str(text).map_err(|e| invalid(name)(e.to_string()))?;
    CertificateAuthority::from_pem(&pem.cert_pem, &pem.key_pem)
        .map_err(|e| invalid(name)(e.to_string()))
}

pub fn encode_signing_key(name: &str, key: &SigningKey) -> Result<String, SealedKeysError> {
    key.to_pem().map_err(|e| invalid(name)(e.to_string()))
}

fn decode_signing_key(name: &str, text: &str) -> Result<SigningKey, SealedKeysError> {
    SigningKey::from_pem(text).map_err(|e| invalid(name)(e.to_string()))
}

/// The database and the key that seals and opens its secrets; while the key-encryption key is
/// being changed, also the previous key, which only opens (and [`SealedStore::reseal_previous`]
/// moves its rows onto the current key).
#[derive(Clone)]
pub struct SealedStore {
    db: Db,
    kek: Arc<KeyEncryptionKey>,
    previous: Option<Arc<KeyEncryptionKey>>,
}

/// A row as stored: (sealed value, kek id).
type Rows = BTreeMap<String, (String, String)>;

async fn read_rows<'e, E>(executor: E) -> Result<Rows, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT name, sealed, kek_id FROM plane_secrets ORDER BY name")
            .fetch_all(executor)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(name, sealed, kek)| (name, (sealed, kek)))
        .collect())
}

async fn insert_if_absent<'e, E>(
    executor: E,
    name: &str,
    sealed: &str,
    kek_id: &str,
) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO plane_secrets (name, sealed, kek_id, updated_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(sealed)
    .bind(kek_id)
    .bind(now_ms())
    .execute(executor)
    .await?;
    Ok(())
}

/// Whether the database holds sealed plane keys (a plane started without its key-encryption
/// key must not create keys of its own next to them). A database whose schema predates the
/// table (`--no-migrate`) holds none.
pub async fn any_sealed(db: &Db) -> bool {
    match sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM plane_secrets")
        .fetch_one(db)
        .await
    {
        Ok(n) => n > 0,
        Err(e) => {
            tracing::debug!(error = %e, "no sealed plane keys table");
            false
        }
    }
}

impl SealedStore {
    pub fn new(db: Db, kek: KeyEncryptionKey) -> Self {
        Self {
            db,
            kek: Arc::new(kek),
            previous: None,
        }
    }

    /// Also opens secrets sealed with `previous` (the key being replaced). Refused when it is
    /// the current key: a typo that would otherwise look like a finished change.
    pub fn with_previous(mut self, previous: KeyEncryptionKey) -> Result<Self, SealedKeysError> {
        if previous.key_id() == self.kek.key_id() {
            return Err(SealedKeysError::Conflict(format!(
                "the previous key-encryption key is the current one ({}): give the new key as                  --key-encryption-key-file and the old one as --previous-key-encryption-key-file",
                self.kek.key_id()
            )));
        }
        self.previous = Some(Arc::new(previous));
        Ok(self)
    }

    pub fn kek_id(&self) -> &str {
        self.kek.key_id()
    }

    /// The key that opens a row sealed with `kek_id`: the current one or the previous one.
    fn opener(&self, name: &str, kek_id: &str) -> Result<&KeyEncryptionKey, SealError> {
        if kek_id == self.kek.key_id() {
            return Ok(&self.kek);
        }
        match &self.previous {
            Some(previous) if kek_id == previous.key_id() => Ok(previous),
            Some(previous) => Err(SealError::WrongKey {
                name: name.to_string(),
                sealed_with: kek_id.to_string(),
                have: format!("{} (and previous {})", self.kek.key_id(), previous.key_id()),
            }),
            None => Err(SealError::WrongKey {
                name: name.to_string(),
                sealed_with: kek_id.to_string(),
                have: self.kek.key_id().to_string(),
            }),
        }
    }

    /// Refuses rows sealed under a key this store lacks before anything is opened or written.
    fn check_kek(&self, rows: &Rows) -> Result<(), SealedKeysError> {
        for (name, (_, kek_id)) in rows {
            self.opener(name, kek_id)?;
        }
        Ok(())
    }

    /// The stored rows, every one sealed with this store's key (else an error naming both).
    pub async fn rows(&self) -> Result<Rows, SealedKeysError> {
        let rows = read_rows(&self.db).await?;
        self.check_kek(&rows)?;
        Ok(rows)
    }

    fn open(&self, name: &str, sealed: &str) -> Result<String, SealedKeysError> {
        let kek_id = KeyEncryptionKey::sealed_key_id(name, sealed)?;
        let plain = self.opener(name, kek_id)?.open(name, sealed)?;
        String::from_utf8(plain).map_err(|_| invalid(name)("not UTF-8 text".into()))
    }

    fn seal(&self, name: &str, plaintext: &str) -> Result<String, SealedKeysError> {
        Ok(self.kek.seal(name, plaintext.as_bytes())?)
    }

    /// Opens every secret and parses the key material; `None` when a required one is missing.
    pub fn material_of(&self, rows: &Rows) -> Result<Option<KeyMaterial>, SealedKeysError> {
        if REQUIRED.iter().any(|name| !rows.contains_key(*name)) {
            return Ok(None);
        }
        let text = |name: &str| -> Result<Option<String>, SealedKeysError> {
            rows.get(name)
                .map(|(sealed, _)| self.open(name, sealed))
                .transpose()
        };
        let required = |name: &str| -> Result<String, SealedKeysError> {
            text(name)?.ok_or_else(|| SealedKeysError::Missing {
                name: name.to_string(),
            })
        };
        Ok(Some(KeyMaterial {
            ca: Arc::new(decode_ca(CA, &required(CA)?)?),
            next_ca: text(NEXT_CA)?
                .map(|t| decode_ca(NEXT_CA, &t).map(Arc::new))
                .transpose()?,
            job: decode_signing_key(JOB_KEY, &required(JOB_KEY)?)?,
            next_job: text(NEXT_JOB_KEY)?
                .map(|t| decode_signing_key(NEXT_JOB_KEY, &t))
                .transpose()?,
            evidence: decode_signing_key(EVIDENCE_KEY, &required(EVIDENCE_KEY)?)?,
        }))
    }

    /// The key material as stored now.
    pub async fn material(&self) -> Result<KeyMaterial, SealedKeysError> {
        let rows = self.rows().await?;
        self.material_of(&rows)?
            .ok_or_else(|| SealedKeysError::Missing {
                name: REQUIRED
                    .iter()
                    .find(|n| !rows.contains_key(**n))
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
            })
    }

    /// First start on this database: stores `candidates` (plaintext by name) when the table is
    /// empty, or only the required secrets that are missing (freshly generated by `generate`)
    /// when another replica stored some already; returns whether the table was empty (so the
    /// candidates are what is stored now). One write transaction: replicas starting at once
    /// store one complete set, the first one's.
    pub async fn initialize(
        &self,
        candidates: &BTreeMap<&'static str, String>,
        generate: impl Fn(&str) -> Result<String, SealedKeysError>,
    ) -> Result<bool, SealedKeysError> {
        let mut tx = write_tx(&self.db).await?;
        let existing = read_rows(&mut *tx).await?;
        self.check_kek(&existing)?;
        let was_empty = existing.is_empty();
        if was_empty {
            for (name, plain) in candidates {
                let sealed = self.seal(name, plain)?;
                insert_if_absent(&mut *tx, name, &sealed, self.kek.key_id()).await?;
            }
        } else {
            for name in REQUIRED.iter().filter(|n| !existing.contains_key(**n)) {
                let sealed = self.seal(name, &generate(name)?)?;
                insert_if_absent(&mut *tx, name, &sealed, self.kek.key_id()).await?;
            }
        }
        tx.commit().await?;
        Ok(was_empty)
    }

    /// Stages `plaintext` under `name` unless something is staged there already; returns what
    /// is stored (ours, or the value another replica staged first). In a write transaction, after
    /// checking that every stored row is sealed with this store's key.
    async fn stage(&self, name: &str, plaintext: &str) -> Result<String, SealedKeysError> {
        let mut tx = write_tx(&self.db).await?;
        let rows = read_rows(&mut *tx).await?;
        self.check_kek(&rows)?;
        if let Some((sealed, _)) = rows.get(name) {
            return self.open(name, sealed);
        }
        let sealed = self.seal(name, plaintext)?;
        insert_if_absent(&mut *tx, name, &sealed, self.kek.key_id()).await?;
        tx.commit().await?;
        Ok(plaintext.to_string())
    }

    /// Stages a job-signing key (rotation start); returns the staged key.
    pub async fn stage_signing_key(
        &self,
        name: &str,
        key: &SigningKey,
    ) -> Result<SigningKey, SealedKeysError> {
        let stored = self.stage(name, &encode_signing_key(name, key)?).await?;
        decode_signing_key(name, &stored)
    }

    /// Stages a CA (CA rotation start); returns the staged CA.
    pub async fn stage_ca(
        &self,
        name: &str,
        ca: &CertificateAuthority,
    ) -> Result<CertificateAuthority, SealedKeysError> {
        let stored = self.stage(name, &encode_ca(name, ca)?).await?;
        decode_ca(name, &stored)
    }

    /// Seals again with the current key every secret sealed with the previous one, in one write
    /// transaction (a row changed meanwhile by another replica is left to it: the update is
    /// conditional on the value read). Returns how many were resealed; 0 once done, so every
    /// replica restarted with both keys may run it.
    pub async fn reseal_previous(&self) -> Result<usize, SealedKeysError> {
        let Some(previous) = &self.previous else {
            return Ok(0);
        };
        let mut tx = write_tx(&self.db).await?;
        let rows = read_rows(&mut *tx).await?;
        self.check_kek(&rows)?;
        let mut resealed = 0;
        for (name, (sealed, kek_id)) in &rows {
            if kek_id != previous.key_id() {
                continue;
            }
            let plain = self.open(name, sealed)?;
            let updated = sqlx::query(
                "UPDATE plane_secrets SET sealed = $1, kek_id = $2, updated_at = $3
                 WHERE name = $4 AND sealed = $5",
            )
            .bind(self.seal(name, &plain)?)
            .bind(self.kek.key_id())
            .bind(now_ms())
            .bind(name)
            .bind(sealed)
            .execute(&mut *tx)
            .await?;
            resealed += updated.rows_affected() as usize;
        }
        tx.commit().await?;
        Ok(resealed)
    }

    /// Moves the secret staged under `from` onto `to` (resealed under its new name) and removes
    /// `from`, in one write transaction. `check` is handed the staged plaintext and refuses a
    /// value other than the one the caller means to promote. Returns false when nothing is
    /// staged (another replica finished first).
    async fn promote(
        &self,
        from: &str,
        to: &str,
        check: impl FnOnce(&str) -> Result<(), SealedKeysError>,
    ) -> Result<bool, SealedKeysError> {
        let mut tx = write_tx(&self.db).await?;
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT sealed, kek_id FROM plane_secrets WHERE name = $1")
                .bind(from)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((sealed, kek_id)) = row else {
            return Ok(false);
        };
        self.check_kek(&BTreeMap::from([(
            from.to_string(),
            (sealed.clone(), kek_id),
        )]))?;
        let plain = self.open(from, &sealed)?;
        check(&plain)?;
        let resealed = self.seal(to, &plain)?;
        sqlx::query(
            "INSERT INTO plane_secrets (name, sealed, kek_id, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET sealed = excluded.sealed, kek_id = excluded.kek_id,
                 updated_at = excluded.updated_at",
        )
        .bind(to)
        .bind(&resealed)
        .bind(self.kek.key_id())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM plane_secrets WHERE name = $1")
            .bind(from)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Makes the staged job-signing key (`key_id`) the active one.
    pub async fn promote_signing_key(&self, key_id: &str) -> Result<bool, SealedKeysError> {
        self.promote(NEXT_JOB_KEY, JOB_KEY, |plain| {
            let staged = decode_signing_key(NEXT_JOB_KEY, plain)?;
            if staged.key_id() == key_id {
                Ok(())
            } else {
                Err(SealedKeysError::Conflict(format!(
                    "the staged job-signing key is {}, not {key_id}: another replica changed \
                     the rotation; check `stella keys status` and retry",
                    staged.key_id()
                )))
            }
        })
        .await
    }

    /// Makes the staged CA (`fingerprint`) the active one.
    pub async fn promote_ca(&self, fingerprint: &str) -> Result<bool, SealedKeysError> {
        self.promote(NEXT_CA, CA, |plain| {
            let staged = decode_ca(NEXT_CA, plain)?;
            if staged.fingerprint() == fingerprint {
                Ok(())
            } else {
                Err(SealedKeysError::Conflict(format!(
                    "the staged CA is {}, not {fingerprint}: another replica changed the \
                     rotation; check `stella ca status` and retry",
                    staged.fingerprint()
                )))
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop (the crate has no tempfile dependency).
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    async fn db() -> (Scratch, Db) {
        let dir = std::env::temp_dir().join(crate::store::new_id("stella-sealed-keys-test"));
        std::fs::create_dir_all(&dir).unwrap();
        let db = crate::store::open_sqlite(&dir.join("s.db")).await.unwrap();
        (Scratch(dir), db)
    }

    fn generated() -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            (
                CA,
                encode_ca(CA, &CertificateAuthority::generate("test CA").unwrap()).unwrap(),
            ),
            (
                JOB_KEY,
                encode_signing_key(JOB_KEY, &SigningKey::generate()).unwrap(),
            ),
            (
                EVIDENCE_KEY,
                encode_signing_key(EVIDENCE_KEY, &SigningKey::generate()).unwrap(),
            ),
        ])
    }

    fn no_generate(name: &str) -> Result<String, SealedKeysError> {
        panic!("nothing to generate, asked for {name}")
    }

    #[tokio::test]
    async fn initialize_stores_once_and_stage_promote_round_trip() {
        let (_dir, db) = db().await;
        let store = SealedStore::new(db.clone(), KeyEncryptionKey::generate());
        let first = generated();
        assert!(store.initialize(&first, no_generate).await.unwrap());
        // A second initialisation (another replica) changes nothing.
        assert!(!store.initialize(&generated(), no_generate).await.unwrap());
        let m = store.material().await.unwrap();
        assert_eq!(
            m.job.key_id(),
            decode_signing_key(JOB_KEY, &first[JOB_KEY])
                .unwrap()
                .key_id()
        );
        assert!(m.next_job.is_none() && m.next_ca.is_none());

        let staged = store
            .stage_signing_key(NEXT_JOB_KEY, &SigningKey::generate())
            .await
            .unwrap();
        // Staging again keeps the first staged key.
        let again = store
            .stage_signing_key(NEXT_JOB_KEY, &SigningKey::generate())
            .await
            .unwrap();
        assert_eq!(staged.key_id(), again.key_id());
        let e = store
            .promote_signing_key("ed25519:other")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("another replica"), "{e}");
        assert!(store.promote_signing_key(staged.key_id()).await.unwrap());
        assert!(!store.promote_signing_key(staged.key_id()).await.unwrap());
        let m = store.material().await.unwrap();
        assert_eq!(m.job.key_id(), staged.key_id());
        assert!(m.next_job.is_none());

        let ca = store
            .stage_ca(NEXT_CA, &CertificateAuthority::generate("next").unwrap())
            .await
            .unwrap();
        assert!(store.promote_ca(&ca.fingerprint()).await.unwrap());
        let m = store.material().await.unwrap();
        assert_eq!(m.ca.fingerprint(), ca.fingerprint());
        assert!(m.next_ca.is_none());

        // No private key in the clear in the database.
        let rows = read_rows(&db).await.unwrap();
        assert!(rows.values().all(|(s, _)| !s.contains("PRIVATE KEY")));
    }

    #[tokio::test]
    async fn another_key_is_refused_and_nothing_is_written() {
        let (_dir, db) = db().await;
        let one = SealedStore::new(db.clone(), KeyEncryptionKey::generate());
        one.initialize(&generated(), no_generate).await.unwrap();
        let before = read_rows(&db).await.unwrap();
        let two = SealedStore::new(db.clone(), KeyEncryptionKey::generate());
        for e in [
            two.material().await.err().unwrap(),
            two.initialize(&generated(), no_generate).await.unwrap_err(),
            two.stage_signing_key(NEXT_JOB_KEY, &SigningKey::generate())
                .await
                .err()
                .unwrap(),
        ] {
            let msg = e.to_string();
            assert!(
                msg.contains(one.kek_id()) && msg.contains(two.kek_id()),
                "{msg}"
            );
        }
        assert_eq!(read_rows(&db).await.unwrap(), before);
    }

    /// The same key twice (a `KeyEncryptionKey` is not `Clone`: each replica loads its file).
    fn kek(hex_digit: char) -> KeyEncryptionKey {
        let text: String = std::iter::repeat_n(hex_digit, 64).collect();
        KeyEncryptionKey::parse(std::path::Path::new("test.kek"), &text).unwrap()
    }

    #[tokio::test]
    async fn a_new_key_encryption_key_reseals_what_the_previous_one_sealed() {
        let (_dir, db) = db().await;
        let old = SealedStore::new(db.clone(), kek('1'));
        old.initialize(&generated(), no_generate).await.unwrap();
        old.stage_signing_key(NEXT_JOB_KEY, &SigningKey::generate())
            .await
            .unwrap();
        let before = old.material().await.unwrap();
        let (old_id, new_id) = (kek('1').key_id().to_string(), kek('2').key_id().to_string());

        // The new key alone cannot open the rows, and says which key it would need.
        let e = SealedStore::new(db.clone(), kek('2'))
            .material()
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&old_id) && e.contains(&new_id), "{e}");
        // The same key as both is refused (it would look like a finished change).
        let e = SealedStore::new(db.clone(), kek('2'))
            .with_previous(kek('2'))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("previous key-encryption key is the current one"),
            "{e}"
        );

        // With the old key as previous: it opens, and the rows move onto the new key.
        let both = SealedStore::new(db.clone(), kek('2'))
            .with_previous(kek('1'))
            .unwrap();
        assert_eq!(
            both.material().await.unwrap().job.key_id(),
            before.job.key_id()
        );
        assert_eq!(both.reseal_previous().await.unwrap(), 4);
        assert_eq!(both.reseal_previous().await.unwrap(), 0, "done once");
        let rows = read_rows(&db).await.unwrap();
        assert!(
            rows.values()
                .all(|(sealed, id)| id == &new_id && sealed.starts_with(&format!("v1:{new_id}:")))
        );

        // The new key alone opens everything now, the same keys as before; the old one is refused.
        let new = SealedStore::new(db.clone(), kek('2'));
        let after = new.material().await.unwrap();
        assert_eq!(after.job.key_id(), before.job.key_id());
        assert_eq!(
            after.next_job.map(|k| k.key_id().to_string()),
            before.next_job.map(|k| k.key_id().to_string())
        );
        assert_eq!(after.ca.fingerprint(), before.ca.fingerprint());
        assert_eq!(after.evidence.key_id(), before.evidence.key_id());
        assert!(old.material().await.is_err());

        // A third key with the wrong previous one is refused, naming all three, and writes nothing.
        let wrong = SealedStore::new(db.clone(), kek('3'))
            .with_previous(kek('1'))
            .unwrap();
        let e = wrong.reseal_previous().await.unwrap_err().to_string();
        assert!(
            e.contains(&new_id) && e.contains(&old_id) && e.contains(kek('3').key_id()),
            "{e}"
        );
        assert_eq!(read_rows(&db).await.unwrap(), rows);
    }
}
