//! The plane's key material on disk: CA(s), TLS server certificate and job-signing keys.
//!
//! Created on first start under `<data-dir>/pki/`; private keys are written mode 0600 and never
//! leave the plane. The server certificate is re-issued at every start (it is cheap and agents
//! trust the CA, not the leaf), so it never reaches its expiry while the plane is maintained.
//! During a rotation a second CA (`ca.next.*`) or job key (`job-signing.next.key`) is staged next
//! to the active one; both are read back at start, so a restart keeps the rotation going.
//!
//! With a key-encryption key (`stella serve --key-encryption-key-file`, [`PlaneKeys::load`]) the
//! CA(s), job-signing and evidence keys live sealed in the database instead
//! ([`crate::sealed_keys`]), shared by every replica of it; `pki/` then holds only this replica's
//! server certificate and key, the QUIC reset key and the active CA's certificate (`ca.pem`, for
//! the CLI). A data directory that has key files when the database has none is imported once
//! (and its private key files removed).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use stella_pki::{CertificateAuthority, KeyEncryptionKey, SigningKey, write_secret_file};

use crate::sealed_keys::{self, KeyMaterial, SealedKeysError, SealedStore};
use crate::store::Db;

const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const NEXT_CA_CERT_FILE: &str = "ca.next.pem";
pub const NEXT_CA_KEY_FILE: &str = "ca.next.key";
pub const JOB_KEY_FILE: &str = "job-signing.key";
pub const NEXT_JOB_KEY_FILE: &str = "job-signing.next.key";
/// Signs evidence packets; apart from the job key so that either can rotate alone.
pub const EVIDENCE_KEY_FILE: &str = "evidence.key";

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Pki {
        path: PathBuf,
        source: stella_pki::PkiError,
    },
    #[error(transparent)]
    Kek(#[from] stella_pki::SealError),
    #[error(transparent)]
    Sealed(#[from] SealedKeysError),
    #[error(
        "this database holds the plane's keys sealed with a key-encryption key; start with \
         --key-encryption-key-file (or STELLA_KEY_ENCRYPTION_KEY_FILE) like its other replicas"
    )]
    SealedWithoutKek,
    #[error(
        "--previous-key-encryption-key-file needs --key-encryption-key-file: the previous key \
         only opens, the current one seals"
    )]
    PreviousKekWithoutKek,
}

/// The key-encryption keys `stella serve` was given: the one that seals, and during a change of
/// key the previous one, which only opens.
pub struct SealingKeys {
    pub current: KeyEncryptionKey,
    pub previous: Option<KeyEncryptionKey>,
}

impl SealingKeys {
    /// Reads the key files (`None` without a current one). Done before the database is opened,
    /// so a bad key file stops `stella serve` before anything is migrated or written.
    pub fn load(
        current: Option<&Path>,
        previous: Option<&Path>,
    ) -> Result<Option<Self>, KeysError> {
        match (current, previous) {
            (Some(current), previous) => Ok(Some(Self {
                current: KeyEncryptionKey::load(current)?,
                previous: previous.map(KeyEncryptionKey::load).transpose()?,
            })),
            (None, Some(_)) => Err(KeysError::PreviousKekWithoutKek),
            (None, None) => Ok(None),
        }
    }
}

/// The key that signs jobs now, and the one being rolled out to agents during a rotation.
#[derive(Clone)]
pub struct JobKeys {
    pub active: SigningKey,
    pub next: Option<SigningKey>,
}

/// The CA that signed the server certificate, and the one being rolled out during a rotation.
#[derive(Clone)]
pub struct CaSet {
    pub active: Arc<CertificateAuthority>,
    pub next: Option<Arc<CertificateAuthority>>,
}

impl CaSet {
    /// New agent certificates come from the newest CA, so agents move over by renewing.
    pub fn issuing(&self) -> Arc<CertificateAuthority> {
        self.next.clone().unwrap_or_else(|| self.active.clone())
    }

    /// Every CA whose certificates are accepted, the active one first.
    pub fn trusted(&self) -> Vec<Arc<CertificateAuthority>> {
        let mut out = vec![self.active.clone()];
        out.extend(self.next.clone());
        out
    }

    pub fn trusted_pem(&self) -> String {
        self.trusted()
            .iter()
            .map(|ca| ca.cert_pem().to_string())
            .collect()
    }
}

#[derive(Clone)]
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct PlaneKeys {
    cas: RwLock<CaSet>,
    server: RwLock<ServerCert>,
    /// Job-signing keys change at run time (rotation), hence the lock.
    job_keys: RwLock<JobKeys>,
    evidence_key: SigningKey,
    pub trust_domain: String,
    pub pki_dir: PathBuf,
    hostnames: Vec<String>,
    /// Where the keys live when they are sealed in the database; `None`: files in `pki_dir`.
    sealed: Option<SealedStore>,
    /// Held by rotation steps and [`crate::trust::reload_shared_keys`], so that one process
    /// changes its keys one step at a time.
    changes: tokio::sync::Mutex<()>,
}

fn read(path: &Path) -> Result<String, KeysError> {
    std::fs::read_to_string(path).map_err(|source| KeysError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_secret(path: &Path, contents: &str) -> Result<(), KeysError> {
    write_secret_file(path, contents.as_bytes()).map_err(|source| KeysError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a public file whole or not at all (a temporary file renamed over it): the CLI may read
/// `ca.pem` at any moment, also while a CA rotation rewrites it.
fn write_public(path: &Path, contents: &str) -> Result<(), KeysError> {
    let io = |source| KeysError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn pki_err(path: &Path) -> impl FnOnce(stella_pki::PkiError) -> KeysError + '_ {
    move |source| KeysError::Pki {
        path: path.to_path_buf(),
        source,
    }
}

fn read_lock<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn write_lock<T>(lock: &RwLock<T>, value: T) {
    *lock.write().unwrap_or_else(|p| p.into_inner()) = value;
}

fn load_ca(dir: &Path, cert: &str, key: &str) -> Result<Option<CertificateAuthority>, KeysError> {
    let (cert, key) = (dir.join(cert), dir.join(key));
    if cert.exists() && key.exists() {
        Ok(Some(
            CertificateAuthority::from_pem(&read(&cert)?, &read(&key)?).map_err(pki_err(&cert))?,
        ))
    } else {
        Ok(None)
    }
}

/// Writes a CA's key, then its certificate: a crash between the two writes leaves no
/// certificate without its key.
pub fn store_ca(
    dir: &Path,
    ca: &CertificateAuthority,
    cert: &str,
    key: &str,
) -> Result<(), KeysError> {
    write_secret(&dir.join(key), &ca.key_pem())?;
    write_public(&dir.join(cert), ca.cert_pem())
}

fn load_or_create_signing_key(path: &Path, what: &str) -> Result<SigningKey, KeysError> {
    if path.exists() {
        return SigningKey::from_pem(&read(path)?).map_err(pki_err(path));
    }
    let key = SigningKey::generate();
    write_secret(path, &key.to_pem().map_err(pki_err(path))?)?;
    tracing::info!(key_id = key.key_id(), "created a new {what} key");
    Ok(key)
}

impl PlaneKeys {
    /// Loads the CA(s) and job-signing key(s) from `pki_dir`, creating them on first start, and
    /// issues a fresh server certificate for `hostnames` (plus localhost and loopback addresses).
    pub fn load_or_create(
        pki_dir: &Path,
        trust_domain: &str,
        hostnames: &[String],
    ) -> Result<Self, KeysError> {
        std::fs::create_dir_all(pki_dir).map_err(|source| KeysError::Io {
            path: pki_dir.to_path_buf(),
            source,
        })?;
        // A crash in the middle of finishing a CA rotation can leave the new key next to the old
        // certificate; the staged pair is still there, so finish the switch.
        if load_ca(pki_dir, CA_CERT_FILE, CA_KEY_FILE).is_err()
            && let Some(next) = load_ca(pki_dir, NEXT_CA_CERT_FILE, NEXT_CA_KEY_FILE)?
        {
            store_ca(pki_dir, &next, CA_CERT_FILE, CA_KEY_FILE)?;
            let _ = std::fs::remove_file(pki_dir.join(NEXT_CA_CERT_FILE));
            let _ = std::fs::remove_file(pki_dir.join(NEXT_CA_KEY_FILE));
        }
        let active = match load_ca(pki_dir, CA_CERT_FILE, CA_KEY_FILE)? {
            Some(ca) => ca,
            None => {
                let ca = CertificateAuthority::generate("Stella control plane CA")
                    .map_err(pki_err(&pki_dir.join(CA_CERT_FILE)))?;
                store_ca(pki_dir, &ca, CA_CERT_FILE, CA_KEY_FILE)?;
                tracing::info!(fingerprint = %ca.fingerprint(), "created a new certificate authority");
                ca
            }
        };
        let next = load_ca(pki_dir, NEXT_CA_CERT_FILE, NEXT_CA_KEY_FILE)?;

        let job_key = load_or_create_signing_key(&pki_dir.join(JOB_KEY_FILE), "job-signing")?;
        let evidence_key =
            load_or_create_signing_key(&pki_dir.join(EVIDENCE_KEY_FILE), "evidence")?;
        let next_job_key = match pki_dir.join(NEXT_JOB_KEY_FILE) {
            p if p.exists() => Some(SigningKey::from_pem(&read(&p)?).map_err(pki_err(&p))?),
            _ => None,
        };

        let server = issue_server(pki_dir, &active, hostnames)?;
        Ok(Self {
            cas: RwLock::new(CaSet {
                active: Arc::new(active),
                next: next.map(Arc::new),
            }),
            server: RwLock::new(server),
            job_keys: RwLock::new(JobKeys {
                active: job_key,
                next: next_job_key,
            }),
            evidence_key,
            trust_domain: trust_domain.to_string(),
            pki_dir: pki_dir.to_path_buf(),
            hostnames: hostnames.to_vec(),
            sealed: None,
            changes: tokio::sync::Mutex::new(()),
        })
    }

    /// The plane's keys as `stella serve` is configured: sealed in the database with the
    /// `sealing` keys, or (without them) files in `pki_dir` — refused when the database holds
    /// sealed keys, so that a replica started without its key-encryption key does not create a
    /// CA of its own.
    pub async fn load(
        pki_dir: &Path,
        trust_domain: &str,
        hostnames: &[String],
        db: &Db,
        sealing: Option<SealingKeys>,
    ) -> Result<Self, KeysError> {
        match sealing {
            Some(SealingKeys { current, previous }) => {
                let mut store = SealedStore::new(db.clone(), current);
                if let Some(previous) = previous {
                    store = store.with_previous(previous)?;
                    let resealed = store.reseal_previous().await?;
                    tracing::warn!(
                        resealed,
                        kek = store.kek_id(),
                        "sealed plane keys are on the new key-encryption key; once every replica \
                         runs with it, drop --previous-key-encryption-key-file"
                    );
                }
                Self::load_sealed(pki_dir, trust_domain, hostnames, store).await
            }
            None if sealed_keys::any_sealed(db).await => Err(KeysError::SealedWithoutKek),
            None => Self::load_or_create(pki_dir, trust_domain, hostnames),
        }
    }

    /// Loads the keys sealed in `db`; on a database that holds none yet, imports the key files
    /// of `pki_dir` (a single plane moving to sealed keys) or generates new keys. Replicas
    /// starting at once on an empty database all end up with the keys the first one stored. A
    /// database sealed with another key is refused before anything is written.
    pub async fn load_sealed(
        pki_dir: &Path,
        trust_domain: &str,
        hostnames: &[String],
        store: SealedStore,
    ) -> Result<Self, KeysError> {
        let rows = store.rows().await?;
        let material = match store.material_of(&rows)? {
            Some(material) => {
                warn_unused_key_files(pki_dir);
                material
            }
            None => {
                let imported = if rows.is_empty() {
                    read_key_files(pki_dir)?
                } else {
                    None
                };
                let candidates = match &imported {
                    Some(files) => files.plaintexts()?,
                    None => generated_plaintexts()?,
                };
                let stored_ours = store.initialize(&candidates, generate_plaintext).await?;
                let material = store.material().await?;
                match imported {
                    Some(files) if stored_ours => {
                        tracing::warn!(
                            ca = %material.ca.fingerprint(),
                            job_key = material.job.key_id(),
                            kek = store.kek_id(),
                            "imported the plane keys of {} into the database, sealed; removing \
                             their files",
                            pki_dir.display()
                        );
                        files.remove_private_files(pki_dir);
                    }
                    Some(_) => warn_unused_key_files(pki_dir),
                    None if stored_ours => tracing::info!(
                        ca = %material.ca.fingerprint(),
                        job_key = material.job.key_id(),
                        kek = store.kek_id(),
                        "created new plane keys, sealed in the database"
                    ),
                    None => {}
                }
                material
            }
        };
        std::fs::create_dir_all(pki_dir).map_err(|source| KeysError::Io {
            path: pki_dir.to_path_buf(),
            source,
        })?;
        write_public(&pki_dir.join(CA_CERT_FILE), material.ca.cert_pem())?;
        let server = issue_server(pki_dir, &material.ca, hostnames)?;
        tracing::info!(
            ca = %material.ca.fingerprint(),
            job_key = material.job.key_id(),
            kek = store.kek_id(),
            "plane keys loaded from the database"
        );
        Ok(Self {
            cas: RwLock::new(CaSet {
                active: material.ca,
                next: material.next_ca,
            }),
            server: RwLock::new(server),
            job_keys: RwLock::new(JobKeys {
                active: material.job,
                next: material.next_job,
            }),
            evidence_key: material.evidence,
            trust_domain: trust_domain.to_string(),
            pki_dir: pki_dir.to_path_buf(),
            hostnames: hostnames.to_vec(),
            sealed: Some(store),
            changes: tokio::sync::Mutex::new(()),
        })
    }

    /// The database store of the keys, when they are sealed there.
    pub fn sealed(&self) -> Option<&SealedStore> {
        self.sealed.as_ref()
    }

    /// Serialises changes of this process's keys (rotation steps, reloads).
    pub(crate) async fn lock_changes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.lock().await
    }

    /// Writes the active CA's certificate to `pki/ca.pem` (sealed mode: the CLI reads it there),
    /// followed by `also`'s when given (while the server certificate moves from one CA to the
    /// other, the file must trust both).
    pub fn write_ca_pem(&self, also: Option<&CertificateAuthority>) -> Result<(), KeysError> {
        let mut pem = self.ca().cert_pem().to_string();
        if let Some(also) = also {
            pem.push_str(also.cert_pem());
        }
        write_public(&self.pki_dir.join(CA_CERT_FILE), &pem)
    }

    pub fn evidence_key(&self) -> &SigningKey {
        &self.evidence_key
    }

    pub fn job_keys(&self) -> JobKeys {
        read_lock(&self.job_keys)
    }

    pub fn set_job_keys(&self, keys: JobKeys) {
        write_lock(&self.job_keys, keys);
    }

    pub fn cas(&self) -> CaSet {
        read_lock(&self.cas)
    }

    pub fn set_cas(&self, cas: CaSet) {
        write_lock(&self.cas, cas);
    }

    /// The CA that signs the server certificate; agents enrolling now pin this one.
    pub fn ca(&self) -> Arc<CertificateAuthority> {
        self.cas().active
    }

    pub fn server(&self) -> ServerCert {
        read_lock(&self.server)
    }

    /// Re-issues the server certificate from the active CA (after a CA rotation).
    pub fn reissue_server(&self) -> Result<(), KeysError> {
        let server = issue_server(&self.pki_dir, &self.ca(), &self.hostnames)?;
        write_lock(&self.server, server);
        Ok(())
    }

    /// The server certificate followed by its CA, as presented in TLS handshakes; agents that
    /// enroll by fingerprint find the CA in this chain.
    pub fn server_chain_pem(&self) -> String {
        format!("{}{}", self.server().cert_pem, self.ca().cert_pem())
    }
}

/// The key files of a data directory, read without writing anything (import into the database).
struct KeyFiles {
    material: KeyMaterial,
}

impl KeyFiles {
    fn plaintexts(&self) -> Result<std::collections::BTreeMap<&'static str, String>, KeysError> {
        let m = &self.material;
        let mut out = std::collections::BTreeMap::new();
        out.insert(
            sealed_keys::CA,
            sealed_keys::encode_ca(sealed_keys::CA, &m.ca)?,
        );
        if let Some(next) = &m.next_ca {
            out.insert(
                sealed_keys::NEXT_CA,
                sealed_keys::encode_ca(sealed_keys::NEXT_CA, next)?,
            );
        }
        out.insert(
            sealed_keys::JOB_KEY,
            sealed_keys::encode_signing_key(sealed_keys::JOB_KEY, &m.job)?,
        );
        if let Some(next) = &m.next_job {
            out.insert(
                sealed_keys::NEXT_JOB_KEY,
                sealed_keys::encode_signing_key(sealed_keys::NEXT_JOB_KEY, next)?,
            );
        }
        out.insert(
            sealed_keys::EVIDENCE_KEY,
            sealed_keys::encode_signing_key(sealed_keys::EVIDENCE_KEY, &m.evidence)?,
        );
        Ok(out)
    }

    /// Removes the private key files once the database holds them (and the staged CA's
    /// certificate, which only a file-mode plane reads back).
    fn remove_private_files(&self, pki_dir: &Path) {
        for file in PRIVATE_KEY_FILES.iter().chain([&NEXT_CA_CERT_FILE]) {
            let path = pki_dir.join(file);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an imported key file")
                }
            }
        }
    }
}

/// The files holding the plane's private keys in file mode.
const PRIVATE_KEY_FILES: [&str; 5] = [
    CA_KEY_FILE,
    NEXT_CA_KEY_FILE,
    JOB_KEY_FILE,
    NEXT_JOB_KEY_FILE,
    EVIDENCE_KEY_FILE,
];

fn warn_unused_key_files(pki_dir: &Path) {
    let present: Vec<&str> = PRIVATE_KEY_FILES
        .iter()
        .copied()
        .filter(|f| pki_dir.join(f).exists())
        .collect();
    if !present.is_empty() {
        tracing::warn!(
            dir = %pki_dir.display(),
            files = ?present,
            "these key files are not used: the plane's keys are sealed in the database"
        );
    }
}

/// Reads the key files of `pki_dir` when it has a CA or a job-signing key (a plane that ran
/// with files); a key it lacks is generated (in memory). Nothing is written.
fn read_key_files(pki_dir: &Path) -> Result<Option<KeyFiles>, KeysError> {
    if !pki_dir.join(CA_KEY_FILE).exists() && !pki_dir.join(JOB_KEY_FILE).exists() {
        return Ok(None);
    }
    let mut next_ca = load_ca(pki_dir, NEXT_CA_CERT_FILE, NEXT_CA_KEY_FILE)?;
    // As in file mode: a crash while finishing a CA rotation leaves the new key next to the old
    // certificate, and the staged pair says which CA is active now.
    let ca = match load_ca(pki_dir, CA_CERT_FILE, CA_KEY_FILE) {
        Ok(Some(ca)) => ca,
        Ok(None) => match next_ca.take() {
            Some(next) => next,
            None => CertificateAuthority::generate("Stella control plane CA")
                .map_err(pki_err(&pki_dir.join(CA_CERT_FILE)))?,
        },
        Err(e) => next_ca.take().ok_or(e)?,
    };
    let signing_key = |file: &str| -> Result<Option<SigningKey>, KeysError> {
        let path = pki_dir.join(file);
        if path.exists() {
            Ok(Some(
                SigningKey::from_pem(&read(&path)?).map_err(pki_err(&path))?,
            ))
        } else {
            Ok(None)
        }
    };
    Ok(Some(KeyFiles {
        material: KeyMaterial {
            ca: Arc::new(ca),
            next_ca: next_ca.map(Arc::new),
            job: signing_key(JOB_KEY_FILE)?.unwrap_or_else(SigningKey::generate),
            next_job: signing_key(NEXT_JOB_KEY_FILE)?,
            evidence: signing_key(EVIDENCE_KEY_FILE)?.unwrap_or_else(SigningKey::generate),
        },
    }))
}

/// A new secret of one of the required names, as stored (plaintext).
fn generate_plaintext(name: &str) -> Result<String, SealedKeysError> {
    let invalid = |reason: String| SealedKeysError::Invalid {
        name: name.to_string(),
        reason,
    };
    match name {
        sealed_keys::CA => CertificateAuthority::generate("Stella control plane CA")
            .map_err(|e| invalid(e.to_string()))
            .and_then(|ca| sealed_keys::encode_ca(name, &ca)),
        _ => sealed_keys::encode_signing_key(name, &SigningKey::generate()),
    }
}

fn generated_plaintexts() -> Result<std::collections::BTreeMap<&'static str, String>, KeysError> {
    let mut out = std::collections::BTreeMap::new();
    for name in sealed_keys::REQUIRED {
        out.insert(name, generate_plaintext(name)?);
    }
    Ok(out)
}

fn issue_server(
    pki_dir: &Path,
    ca: &CertificateAuthority,
    hostnames: &[String],
) -> Result<ServerCert, KeysError> {
    let mut dns: Vec<String> = vec!["localhost".to_string()];
    let mut ips: Vec<IpAddr> = vec![
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
    ];
    for name in hostnames {
        match name.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !dns.contains(name) => dns.push(name.clone()),
            Err(_) => {}
        }
    }
    let server_cert_path = pki_dir.join("server.pem");
    let issued = ca
        .issue_server_cert(&dns, &ips, SERVER_CERT_VALIDITY)
        .map_err(pki_err(&server_cert_path))?;
    write_secret(&pki_dir.join("server.key"), &issued.key_pem)?;
    write_public(&server_cert_path, &issued.cert_pem)?;
    Ok(ServerCert {
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
    })
}
