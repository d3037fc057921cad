//! `JobVerifier::verify`, the agent's offline check of every job it is offered.
//!
//! 1. The raw input is offered as an envelope: the verifier must never panic, and whatever it
//!    accepts must satisfy every documented check (audience, capability, expiry, sequence,
//!    digest shape, the kind's parameters).
//! 2. The same input, read as a structured job plus mutations, is signed with the trusted key,
//!    damaged (byte flips, overwrites, truncation) and offered: the verifier accepts ONLY the
//!    untouched envelope, and for the untouched envelope it returns exactly the refusal (or the
//!    job) that the documented order of checks predicts.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use stella_fuzz::{
    AGENT_ID, CAPABILITIES, StructuredJobInput, is_sha256_digest, job_key, now, verifier,
};
use stella_pki::{
    JOB_PAYLOAD_TYPE, JobKind, JobRefusal, MAX_ENVELOPE_BYTES, STEP_CAPABILITIES, sign_job,
};

/// Last accepted sequence for the raw inputs (seeds carry sequence 5).
const RAW_LAST_SEQUENCE: u64 = 1;

fuzz_target!(|data: &[u8]| {
    raw(data);
    if let Ok(input) = StructuredJobInput::arbitrary_take_rest(Unstructured::new(data)) {
        structured(&input);
    }
});

fn raw(data: &[u8]) {
    if let Ok((job, envelope)) = verifier().verify(data, now(), RAW_LAST_SEQUENCE) {
        assert_eq!(job.agent_id, AGENT_ID);
        assert!(now() <= job.not_after);
        assert!(job.sequence > RAW_LAST_SEQUENCE);
        match &job.kind {
            JobKind::Deploy => {
                assert!(CAPABILITIES.contains(&job.target.kind.as_str()));
                assert!(!STEP_CAPABILITIES.contains(&job.target.kind.as_str()));
                assert!(!job.components.is_empty());
                assert!(job.components.iter().all(|c| is_sha256_digest(&c.digest)));
            }
            JobKind::HealthCheck(check) => {
                assert!(CAPABILITIES.contains(&"health-check"));
                assert!(job.components.is_empty());
                assert_eq!(check.problem(), None);
            }
            JobKind::Script(_) => panic!("the fuzzers' agent does not offer scripts"),
        }
        assert_eq!(envelope.payload_type, JOB_PAYLOAD_TYPE);
        // What was accepted verifies again on its own.
        let payload = verifier()
            .trusted
            .verify(&envelope, JOB_PAYLOAD_TYPE)
            .expect("an accepted envelope verifies again");
        assert_eq!(
            serde_json::from_slice::<stella_pki::JobPayload>(&payload).unwrap(),
            job
        );
    }
}

/// The refusal the documented order of checks predicts for an intact envelope.
fn expected(
    job: &stella_pki::JobPayload,
    envelope_len: usize,
    last_sequence: u64,
) -> Option<&'static str> {
    if envelope_len > MAX_ENVELOPE_BYTES {
        Some("oversized")
    } else if job.agent_id != AGENT_ID {
        Some("wrong_audience")
    } else if let Some(capability) = job.kind.step_capability() {
        if !CAPABILITIES.contains(&capability) {
            Some("unsupported_job_kind")
        } else {
            expected_after_capability(job, last_sequence)
        }
    } else if !CAPABILITIES.contains(&job.target.kind.as_str())
        || STEP_CAPABILITIES.contains(&job.target.kind.as_str())
    {
        Some("unsupported_target")
    } else {
        expected_after_capability(job, last_sequence)
    }
}

fn expected_after_capability(
    job: &stella_pki::JobPayload,
    last_sequence: u64,
) -> Option<&'static str> {
    if now() > job.not_after {
        Some("expired")
    } else if job.sequence <= last_sequence {
        Some("replayed_sequence")
    } else {
        match &job.kind {
            JobKind::Deploy if job.components.is_empty() => Some("invalid_job_parameters"),
            JobKind::Deploy if !job.components.iter().all(|c| is_sha256_digest(&c.digest)) => {
                Some("invalid_digest")
            }
            JobKind::Deploy => None,
            _ if !job.components.is_empty() => Some("invalid_job_parameters"),
            // The parameter rules themselves are unit-tested in pki/src/job.rs.
            JobKind::HealthCheck(check) => check.problem().map(|_| "invalid_job_parameters"),
            JobKind::Script(script) => script.problem().map(|_| "invalid_job_parameters"),
        }
    }
}

fn structured(input: &StructuredJobInput) {
    let job = input.job.to_payload();
    let envelope = sign_job(job_key(), &job).expect("a job serializes");
    let signed = serde_json::to_vec(&envelope).expect("an envelope serializes");

    // Intact: exactly the predicted outcome.
    let outcome = verifier().verify(&signed, now(), input.last_sequence);
    match (expected(&job, signed.len(), input.last_sequence), &outcome) {
        (None, Ok((got, got_env))) => {
            assert_eq!(got, &job, "the accepted job is the signed job");
            assert_eq!(got_env, &envelope);
        }
        (Some(code), Err(refusal)) => assert_eq!(
            refusal.reason_code(),
            code,
            "intact envelope refused for the wrong reason: {refusal}"
        ),
        (want, got) => panic!("intact envelope: expected {want:?}, got {got:?}"),
    }

    // Damaged: never accepted.
    let mut damaged = signed.clone();
    for m in input.all_mutations() {
        m.apply(&mut damaged);
    }
    if damaged == signed {
        return;
    }
    match verifier().verify(&damaged, now(), input.last_sequence) {
        Ok((got, _)) => panic!(
            "a modified envelope was accepted\noriginal: {}\nmodified: {}\njob: {got:?}",
            String::from_utf8_lossy(&signed),
            String::from_utf8_lossy(&damaged)
        ),
        Err(JobRefusal::Oversized { .. }) => unreachable!("damage never grows an envelope"),
        Err(_) => {}
    }
}
