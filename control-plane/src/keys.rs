//! The plane's key material on disk: CA(s), TLS server certificate and job-signing keys.
//!
//! Created on first start under `<data-dir>/pki/`; private keys are written mode 0600 and never
//! leave the plane. The server certificate is re-issued at every start (it is cheap and agents
//! trust the CA, not the leaf), so it never reaches its expiry while the plane is maintained.
//! During a rotation a second CA (`ca.next.*`) or job key (`job-signing.next.key`) is staged next
//! to the active one; both are read back at start, so a restart keeps the rotation going.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use stella_pki::{CertificateAuthority, SigningKey, write_secret_file};

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

fn write_public(path: &Path, contents: &str) -> Result<(), KeysError> {
    std::fs::write(path, contents).map_err(|source| KeysError::Io {
        path: path.to_path_buf(),
        source,
    })
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
        })
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
