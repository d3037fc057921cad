//! The plane's key material on disk: CA, TLS server certificate and job-signing key.
//!
//! Created on first start under `<data-dir>/pki/`; private keys are written mode 0600 and never
//! leave the plane. The server certificate is re-issued at every start (it is cheap and agents
//! trust the CA, not the leaf), so it never reaches its expiry while the plane is maintained.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use stella_pki::{CertificateAuthority, SigningKey, write_secret_file};

const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

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

pub struct PlaneKeys {
    pub ca: CertificateAuthority,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    /// Job-signing keys change at run time (rotation), hence the lock.
    pub job_keys: std::sync::RwLock<JobKeys>,
    pub trust_domain: String,
    pub pki_dir: PathBuf,
}

/// The key that signs jobs now, and the one being rolled out to agents during a rotation.
#[derive(Clone)]
pub struct JobKeys {
    pub active: SigningKey,
    pub next: Option<SigningKey>,
}

pub const JOB_KEY_FILE: &str = "job-signing.key";
pub const NEXT_JOB_KEY_FILE: &str = "job-signing.next.key";

impl PlaneKeys {
    pub fn job_keys(&self) -> JobKeys {
        self.job_keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn set_job_keys(&self, keys: JobKeys) {
        *self
            .job_keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = keys;
    }
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

fn pki_err(path: &Path) -> impl FnOnce(stella_pki::PkiError) -> KeysError + '_ {
    move |source| KeysError::Pki {
        path: path.to_path_buf(),
        source,
    }
}

impl PlaneKeys {
    /// Loads the CA and job-signing key from `pki_dir`, creating them on first start, and issues
    /// a fresh server certificate for `hostnames` (plus localhost and the loopback addresses).
    pub fn load_or_create(
        pki_dir: &Path,
        trust_domain: &str,
        hostnames: &[String],
    ) -> Result<Self, KeysError> {
        std::fs::create_dir_all(pki_dir).map_err(|source| KeysError::Io {
            path: pki_dir.to_path_buf(),
            source,
        })?;
        let ca_cert = pki_dir.join("ca.pem");
        let ca_key = pki_dir.join("ca.key");
        let ca = if ca_cert.exists() && ca_key.exists() {
            CertificateAuthority::from_pem(&read(&ca_cert)?, &read(&ca_key)?)
                .map_err(pki_err(&ca_cert))?
        } else {
            let ca = CertificateAuthority::generate("Stella control plane CA")
                .map_err(pki_err(&ca_cert))?;
            // Key first: a crash between the two writes leaves no certificate without its key.
            write_secret(&ca_key, &ca.key_pem())?;
            std::fs::write(&ca_cert, ca.cert_pem()).map_err(|source| KeysError::Io {
                path: ca_cert.clone(),
                source,
            })?;
            tracing::info!(fingerprint = %ca.fingerprint(), "created a new certificate authority");
            ca
        };

        let job_key_path = pki_dir.join(JOB_KEY_FILE);
        let job_key = if job_key_path.exists() {
            SigningKey::from_pem(&read(&job_key_path)?).map_err(pki_err(&job_key_path))?
        } else {
            let key = SigningKey::generate();
            write_secret(
                &job_key_path,
                &key.to_pem().map_err(pki_err(&job_key_path))?,
            )?;
            tracing::info!(key_id = key.key_id(), "created a new job-signing key");
            key
        };

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
        std::fs::write(&server_cert_path, &issued.cert_pem).map_err(|source| KeysError::Io {
            path: server_cert_path.clone(),
            source,
        })?;

        Ok(Self {
            ca,
            server_cert_pem: issued.cert_pem,
            server_key_pem: issued.key_pem,
            job_keys: std::sync::RwLock::new(JobKeys {
                active: job_key,
                next: match pki_dir.join(NEXT_JOB_KEY_FILE) {
                    p if p.exists() => Some(SigningKey::from_pem(&read(&p)?).map_err(pki_err(&p))?),
                    _ => None,
                },
            }),
            trust_domain: trust_domain.to_string(),
            pki_dir: pki_dir.to_path_buf(),
        })
    }

    /// The server certificate followed by the CA, as presented in TLS handshakes; agents that
    /// enroll by fingerprint find the CA in this chain.
    pub fn server_chain_pem(&self) -> String {
        format!("{}{}", self.server_cert_pem, self.ca.cert_pem())
    }
}
