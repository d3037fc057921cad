//! Seed corpora for the fuzz targets: real, valid structure (signed job envelopes, receipts,
//! CSRs, protocol frames) and a few near-misses, so that the fuzzers start past the parsers'
//! front doors.
//!
//! `cargo run --example seeds -- CORPUS_DIR` writes `CORPUS_DIR/<target>/seed-*` (run.sh does
//! this). `cargo run --example seeds -- --regenerate-fixtures fixtures` replaces the checked-in
//! agent certificate and key that the `receipt` target verifies against.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use prost::Message;
use stella_fuzz::{
    AGENT_CERT_PEM, AGENT_ID, AGENT_KEY_PEM, TRUST_DOMAIN, agent_cert_der, job_key, sample_job,
    untrusted_key,
};
use stella_pki::{
    CertificateAuthority, Envelope, JOB_PAYLOAD_TYPE, ReceiptPayload, Signature, envelope_digest,
    generate_key_and_csr, result_digest, sign_job, sign_receipt,
};
use stella_proto::{
    AgentMessage, Drain, Heartbeat, Hello, InventoryReport, JobAccepted, JobOffer, JobProgress,
    JobResult, JobStatus, PlaneMessage, RenewRequest, RenewResponse, ResultAck, TargetInfo,
    TargetInventory, Welcome, Workload, agent_message, plane_message,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, dir] if flag == "--regenerate-fixtures" => regenerate_fixtures(Path::new(dir)),
        [dir] if !dir.starts_with('-') => write_seeds(Path::new(dir)),
        _ => Err("usage: seeds CORPUS_DIR | seeds --regenerate-fixtures FIXTURES_DIR".into()),
    }
}

fn regenerate_fixtures(dir: &Path) -> Result<()> {
    let ca = CertificateAuthority::generate("Stella fuzz fixture CA")?;
    let (key_pem, csr_pem) = generate_key_and_csr(AGENT_ID)?;
    // Long-lived: receipts are verified without looking at validity dates anyway.
    let issued = ca.sign_agent_csr(
        &csr_pem,
        TRUST_DOMAIN,
        AGENT_ID,
        std::time::Duration::from_secs(50 * 365 * 24 * 3600),
    )?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("agent.cert.pem"), issued.cert_pem)?;
    std::fs::write(dir.join("agent.key.pem"), key_pem)?;
    println!("wrote {}/agent.cert.pem and agent.key.pem", dir.display());
    Ok(())
}

struct Corpus {
    dir: PathBuf,
    count: usize,
}

impl Corpus {
    fn new(root: &Path, target: &str) -> Result<Self> {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, count: 0 })
    }

    fn add(&mut self, name: &str, bytes: impl AsRef<[u8]>) -> Result<()> {
        std::fs::write(self.dir.join(format!("seed-{name}")), bytes)?;
        self.count += 1;
        Ok(())
    }
}

fn json(env: &Envelope) -> Vec<u8> {
    serde_json::to_vec(env).expect("envelope serializes")
}

/// Named job envelopes: one accepted, one per refusal the verifier knows.
fn job_envelopes() -> Result<Vec<(&'static str, Vec<u8>)>> {
    let key = job_key();
    let mut out = Vec::new();
    let good = sign_job(key, &sample_job())?;
    out.push(("job-valid", json(&good)));
    out.push(("job-valid-pretty", serde_json::to_vec_pretty(&good)?));

    let mut j = sample_job();
    j.agent_id = "agent-other".into();
    out.push(("job-wrong-audience", json(&sign_job(key, &j)?)));
    let mut j = sample_job();
    j.target.kind = "ssh".into();
    out.push(("job-unsupported-target", json(&sign_job(key, &j)?)));
    let mut j = sample_job();
    j.not_after = stella_fuzz::now() - time::Duration::seconds(1);
    out.push(("job-expired", json(&sign_job(key, &j)?)));
    let mut j = sample_job();
    j.sequence = 1;
    out.push(("job-replayed", json(&sign_job(key, &j)?)));
    let mut j = sample_job();
    j.components[0].digest = "sha256:0123".into();
    out.push(("job-invalid-digest", json(&sign_job(key, &j)?)));
    out.push((
        "job-untrusted-key",
        json(&sign_job(untrusted_key(), &sample_job())?),
    ));
    out.push((
        "job-wrong-type",
        json(&key.sign("application/json", &serde_json::to_vec(&sample_job())?)),
    ));
    let mut tampered = good.clone();
    let mut j = sample_job();
    j.components[0].image = "evil.example/api".into();
    tampered.payload = STANDARD.encode(serde_json::to_vec(&j)?);
    out.push(("job-tampered-payload", json(&tampered)));
    // Two signatures: an unknown key first, then the trusted one.
    let mut two = good.clone();
    let other = sign_job(untrusted_key(), &sample_job())?;
    two.signatures.insert(0, other.signatures[0].clone());
    out.push(("job-two-signatures", json(&two)));
    let mut none = good.clone();
    none.signatures.clear();
    out.push(("job-no-signature", json(&none)));
    out.push((
        "job-health-check",
        json(&sign_job(key, &stella_fuzz::sample_health_check_job())?),
    ));
    out.push((
        "job-script-unsupported",
        json(&sign_job(key, &stella_fuzz::sample_script_job())?),
    ));
    let mut j = stella_fuzz::sample_health_check_job();
    j.components = sample_job().components;
    out.push((
        "job-health-check-with-components",
        json(&sign_job(key, &j)?),
    ));
    let mut j = sample_job();
    j.components.clear();
    out.push(("job-deploy-without-components", json(&sign_job(key, &j)?)));
    let mut short_sig = good;
    short_sig.signatures[0].sig = STANDARD.encode([0u8; 63]);
    out.push(("job-short-signature", json(&short_sig)));
    Ok(out)
}

fn receipt_payload(status: &str, reason: &str) -> ReceiptPayload {
    ReceiptPayload {
        job_id: "job-1".into(),
        agent_id: AGENT_ID.into(),
        envelope_digest: envelope_digest(b"{}"),
        status: status.into(),
        reason_code: reason.into(),
        result_digest: result_digest("deployed", "{\"containers\":1}"),
        finished_at_unix_ms: 1_893_499_200_000,
    }
}

fn receipts() -> Result<Vec<(&'static str, Vec<u8>)>> {
    let cert = agent_cert_der();
    let mut out = Vec::new();
    let ok = sign_receipt(AGENT_KEY_PEM, cert, &receipt_payload("succeeded", ""))?;
    out.push(("receipt-succeeded", json(&ok)));
    out.push((
        "receipt-refused",
        json(&sign_receipt(
            AGENT_KEY_PEM,
            cert,
            &receipt_payload("refused", "bad_signature"),
        )?),
    ));
    let (other_key, _) = generate_key_and_csr("agent-other")?;
    out.push((
        "receipt-other-key",
        json(&sign_receipt(
            &other_key,
            cert,
            &receipt_payload("failed", "x"),
        )?),
    ));
    let mut wrong_type = ok.clone();
    wrong_type.payload_type = JOB_PAYLOAD_TYPE.into();
    out.push(("receipt-wrong-type", json(&wrong_type)));
    let mut wrong_keyid = ok.clone();
    wrong_keyid.signatures[0].keyid = "sha256:00".into();
    out.push(("receipt-wrong-keyid", json(&wrong_keyid)));
    let mut no_sig = ok;
    no_sig.signatures.clear();
    out.push(("receipt-no-signature", json(&no_sig)));
    Ok(out)
}

/// CSRs as PEM text and as raw DER (the `csr` target armours raw bytes itself).
fn csrs() -> Result<Vec<(String, Vec<u8>)>> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let mut out = Vec::new();
    let mut add = |name: &str, params: CertificateParams, key: &KeyPair| -> Result<()> {
        let csr = params.serialize_request(key)?;
        out.push((format!("csr-{name}.pem"), csr.pem()?.into_bytes()));
        out.push((format!("csr-{name}.der"), csr.der().to_vec()));
        Ok(())
    };
    let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let plain = CertificateParams::new(Vec::<String>::new())?;
    add("plain", plain, &p256)?;

    // Asks for another agent's identity, server use and CA rights: all must be ignored.
    let mut greedy = CertificateParams::new(vec!["plane.example".to_string()])?;
    greedy
        .distinguished_name
        .push(DnType::CommonName, "agent-victim");
    greedy.subject_alt_names.push(SanType::URI(
        format!("spiffe://{TRUST_DOMAIN}/agent/agent-victim").try_into()?,
    ));
    greedy.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    greedy.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    greedy.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    add("greedy", greedy, &p256)?;

    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?;
    add("p384", CertificateParams::new(Vec::<String>::new())?, &p384)?;
    let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    add(
        "ed25519",
        CertificateParams::new(Vec::<String>::new())?,
        &ed,
    )?;

    let (_, agent_csr) = generate_key_and_csr("agent-other")?;
    out.push(("csr-agent.pem".into(), agent_csr.clone().into_bytes()));
    out.push((
        "csr-agent-with-junk.pem".into(),
        format!("junk before\n{agent_csr}junk after\n{agent_csr}").into_bytes(),
    ));
    // A CSR whose self-signature does not verify: one signature byte flipped.
    let mut bad = out
        .iter()
        .find(|(name, _)| name == "csr-plain.der")
        .map(|(_, der)| der.clone())
        .expect("the plain CSR was added");
    let at = bad.len() - 2;
    bad[at] ^= 0x01;
    out.push(("csr-bad-signature.der".into(), bad));
    Ok(out)
}

fn agent_frames(envelope: &[u8], receipt: &[u8], csr_pem: &str) -> Vec<(&'static str, Vec<u8>)> {
    use agent_message::Body as A;
    use plane_message::Body as P;
    let agent = |body| AgentMessage { body: Some(body) }.encode_to_vec();
    let plane = |body| PlaneMessage { body: Some(body) }.encode_to_vec();
    vec![
        (
            "hello",
            agent(A::Hello(Hello {
                agent_version: "0.1.0".into(),
                capabilities: vec!["docker".into(), "compose".into()],
                labels: [("region".to_string(), "eu".to_string())].into(),
                in_flight_job_ids: vec!["job-1".into()],
                last_sequence: 4,
                hostname: "host-1".into(),
                ..Default::default()
            })),
        ),
        (
            "heartbeat",
            agent(A::Heartbeat(Heartbeat {
                sent_at_unix_ms: 1_893_499_200_000,
            })),
        ),
        (
            "accepted",
            agent(A::Accepted(JobAccepted {
                job_id: "job-1".into(),
            })),
        ),
        (
            "progress",
            agent(A::Progress(JobProgress {
                job_id: "job-1".into(),
                message: "pulling".into(),
                at_unix_ms: -1,
            })),
        ),
        (
            "result",
            agent(A::Result(JobResult {
                job_id: "job-1".into(),
                status: JobStatus::Succeeded as i32,
                reason_code: String::new(),
                message: "deployed".into(),
                outcome_json: "{\"containers\":1}".into(),
                envelope_digest: envelope_digest(envelope),
                started_at_unix_ms: 1,
                finished_at_unix_ms: 2,
                receipt: receipt.to_vec(),
            })),
        ),
        (
            "inventory",
            agent(A::Inventory(InventoryReport {
                observed_at_unix_ms: 3,
                targets: vec![TargetInventory {
                    target: "web".into(),
                    kind: "docker".into(),
                    workloads: vec![Workload {
                        component: "api".into(),
                        digest: stella_fuzz::VALID_DIGEST.into(),
                        state: "running".into(),
                        health: "healthy".into(),
                        workload_id: "c0ffee".into(),
                        release_id: "rel-1".into(),
                        deployment_id: "dep-1".into(),
                        ..Default::default()
                    }],
                    sticker_json: "{}".into(),
                    error: String::new(),
                }],
            })),
        ),
        (
            "renew",
            agent(A::Renew(RenewRequest {
                csr_pem: csr_pem.into(),
            })),
        ),
        (
            "welcome",
            plane(P::Welcome(Welcome {
                agent_id: AGENT_ID.into(),
                heartbeat_interval_ms: 15_000,
                server_time_unix_ms: 1_893_499_200_000,
                targets: vec![TargetInfo {
                    name: "web".into(),
                    kind: "docker".into(),
                    config_json: "{\"network\":\"bridge\"}".into(),
                }],
                ..Default::default()
            })),
        ),
        (
            "offer",
            plane(P::Offer(JobOffer {
                job_id: "job-1".into(),
                envelope: envelope.to_vec(),
            })),
        ),
        (
            "result-ack",
            plane(P::ResultAck(ResultAck {
                job_id: "job-1".into(),
            })),
        ),
        (
            "drain",
            plane(P::Drain(Drain {
                reconnect_after_ms: 5_000,
                reason: "shutdown".into(),
            })),
        ),
        (
            "renewed",
            plane(P::Renewed(RenewResponse {
                cert_pem: AGENT_CERT_PEM.into(),
                error: String::new(),
            })),
        ),
        ("empty", Vec::new()),
    ]
}

fn write_seeds(root: &Path) -> Result<()> {
    let jobs = job_envelopes()?;
    let receipts = receipts()?;
    let csrs = csrs()?;

    let mut job = Corpus::new(root, "job_envelope")?;
    let mut dsse = Corpus::new(root, "dsse_envelope")?;
    for (name, bytes) in &jobs {
        job.add(name, bytes)?;
        dsse.add(name, bytes)?;
    }
    for (name, bytes) in &receipts {
        dsse.add(name, bytes)?;
    }
    // A minimal envelope with an unknown signature and an extra field.
    let minimal = Envelope {
        payload: String::new(),
        payload_type: String::new(),
        signatures: vec![Signature {
            keyid: "k".into(),
            sig: String::new(),
        }],
    };
    let mut value = serde_json::to_value(&minimal)?;
    value["extra"] = serde_json::json!(1);
    dsse.add("minimal", serde_json::to_vec(&value)?)?;

    let mut receipt = Corpus::new(root, "receipt")?;
    for (name, bytes) in &receipts {
        receipt.add(name, bytes)?;
    }
    receipt.add("agent-cert.der", agent_cert_der())?;

    let mut csr = Corpus::new(root, "csr")?;
    for (name, bytes) in &csrs {
        csr.add(name, bytes)?;
    }

    let csr_pem = String::from_utf8(csrs[0].1.clone())?;
    let mut frames = Corpus::new(root, "agent_frames")?;
    for (name, bytes) in agent_frames(&jobs[0].1, &receipts[0].1, &csr_pem) {
        frames.add(name, bytes)?;
    }

    for c in [&job, &dsse, &frames, &csr, &receipt] {
        println!("{}: {} seeds", c.dir.display(), c.count);
    }
    Ok(())
}
