//! Invariant 3: every job is signed, bound and fresh. Jobs are tampered with where an attacker
//! with write access to the plane's database would (the `jobs.envelope` column), or signed with
//! the plane's real key but for the wrong agent / too late / replayed. The agent must refuse each
//! with a precise reason that reaches the deployment record, and execute nothing.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;
use stella_e2e::{Stack, TestImage, containers_of, sql_exec, sql_string, unique};
use stella_pki::{Envelope, JobPayload, SigningKey};

struct Case {
    stack: Stack,
    _image: TestImage,
}

/// Deploys with the agent offline, lets `tamper` rewrite the stored envelope, starts the agent
/// and returns the finished deployment.
fn run_case(
    prepare_previous: bool,
    tamper: impl FnOnce(&Stack, &str, &Envelope) -> String,
) -> (Case, Value) {
    let mut stack = Stack::new();
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/refusal"), "1");
    if prepare_previous {
        stack.plane.ok(&[
            "release",
            "create",
            "previous",
            "--component",
            &image.component("web"),
        ]);
        stack.plane.ok(&["deploy", "previous", "--env", "dev"]);
    }
    stack.agent.stop();
    let id = stack.agent.id.clone();
    stella_e2e::wait_until(
        std::time::Duration::from_secs(30),
        "the agent to disconnect",
        || (stack.plane.agent_status(&id) == "disconnected").then_some(()),
    );
    let dep = stack.deploy_no_wait("target-rel", &[image.component("web")]);
    let job_id = dep["jobs"][0]["id"].as_str().unwrap().to_string();
    let db = stack.plane.db();
    let envelope: Envelope = serde_json::from_str(&sql_string(
        &db,
        "SELECT envelope FROM jobs WHERE id = $1",
        &[&job_id],
    ))
    .unwrap();
    let tampered = tamper(&stack, &job_id, &envelope);
    assert_eq!(
        sql_exec(
            &db,
            "UPDATE jobs SET envelope = $1 WHERE id = $2",
            &[&tampered, &job_id]
        ),
        1
    );
    stack.agent.start();
    let finished = stack.plane.wait_deployment(dep["id"].as_str().unwrap());
    (
        Case {
            stack,
            _image: image,
        },
        finished,
    )
}

fn assert_refused(case: &Case, deployment: &Value, reason: &str) {
    assert_eq!(deployment["status"], "failed", "{deployment:#}");
    let job = &deployment["jobs"][0];
    assert_eq!(job["status"], "refused", "{job:#}");
    assert_eq!(job["reason_code"], reason, "{job:#}");
    assert!(!job["message"].as_str().unwrap().is_empty());
    assert!(
        deployment["message"].as_str().unwrap().contains(reason),
        "the reason reaches the deployment record"
    );
    let metrics = case.stack.plane.metrics();
    assert!(
        metrics.contains(&format!(
            "stella_agent_job_refusals_total{{reason=\"{reason}\"}} 1"
        )),
        "{metrics}"
    );
}

fn payload(env: &Envelope) -> JobPayload {
    serde_json::from_slice(&B64.decode(&env.payload).unwrap()).unwrap()
}

fn plane_key(stack: &Stack) -> SigningKey {
    SigningKey::from_pem(
        &std::fs::read_to_string(stack.plane.dir.join("pki/job-signing.key")).unwrap(),
    )
    .unwrap()
}

fn sign(key: &SigningKey, p: &JobPayload) -> String {
    serde_json::to_string(&stella_pki::sign_job(key, p).unwrap()).unwrap()
}

stella_e2e::both_transports! {
#[test]
fn tampered_payload_is_refused() {
    let (case, dep) = run_case(false, |_, _, env| {
        let mut p = payload(env);
        p.components[0].image = "evil/image".to_string();
        let mut forged = env.clone();
        forged.payload = B64.encode(serde_json::to_vec(&p).unwrap());
        serde_json::to_string(&forged).unwrap()
    });
    assert_refused(&case, &dep, "bad_signature");
    assert!(
        containers_of(&case.stack.target).is_empty(),
        "nothing executed"
    );
}

#[test]
fn tampered_signature_is_refused() {
    let (case, dep) = run_case(false, |_, _, env| {
        let mut forged = env.clone();
        let mut sig = B64.decode(&forged.signatures[0].sig).unwrap();
        sig[0] ^= 0x01;
        forged.signatures[0].sig = B64.encode(sig);
        serde_json::to_string(&forged).unwrap()
    });
    assert_refused(&case, &dep, "bad_signature");
    assert!(
        containers_of(&case.stack.target).is_empty(),
        "nothing executed"
    );
}

#[test]
fn job_signed_by_another_key_is_refused() {
    let (case, dep) = run_case(false, |_, _, env| {
        sign(&SigningKey::generate(), &payload(env))
    });
    assert_refused(&case, &dep, "unknown_key_id");
    assert!(
        containers_of(&case.stack.target).is_empty(),
        "nothing executed"
    );
}

#[test]
fn expired_job_is_refused() {
    let (case, dep) = run_case(false, |stack, _, env| {
        let mut p = payload(env);
        p.not_after = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
        sign(&plane_key(stack), &p)
    });
    assert_refused(&case, &dep, "expired");
    assert!(
        containers_of(&case.stack.target).is_empty(),
        "nothing executed"
    );
}

#[test]
fn job_for_another_agent_is_refused() {
    let (case, dep) = run_case(false, |stack, _, env| {
        let mut p = payload(env);
        p.agent_id = "agt_someone_else".to_string();
        sign(&plane_key(stack), &p)
    });
    assert_refused(&case, &dep, "wrong_audience");
    assert!(
        containers_of(&case.stack.target).is_empty(),
        "nothing executed"
    );
}

#[test]
fn replayed_envelope_is_refused_and_changes_nothing() {
    let mut before = Vec::new();
    let (case, dep) = run_case(true, |stack, job_id, _| {
        before = containers_of(&stack.target);
        // Replay the envelope of the job that already ran (sequence 1) under the new job's id.
        let db = stack.plane.db();
        sql_string(
            &db,
            "SELECT envelope FROM jobs WHERE id != $1 ORDER BY sequence LIMIT 1",
            &[job_id],
        )
    });
    assert_refused(&case, &dep, "replayed_sequence");
    assert_eq!(before.len(), 1);
    assert_eq!(
        containers_of(&case.stack.target),
        before,
        "the running container was not touched"
    );
}

#[test]
fn digest_mismatch_is_refused_before_anything_changes() {
    let stack = Stack::new();
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/mismatch"), "1");
    let wrong = format!("sha256:{}", "0".repeat(64));
    let component = format!("web={}:{}@{wrong}", image.repo, image.tag);
    let dep = stack.deploy_no_wait("mismatch", &[component]);
    let dep = stack.plane.wait_deployment(dep["id"].as_str().unwrap());
    assert_eq!(dep["status"], "failed");
    assert_eq!(dep["jobs"][0]["status"], "refused");
    assert_eq!(dep["jobs"][0]["reason_code"], "digest_mismatch");
    assert!(containers_of(&stack.target).is_empty(), "nothing executed");
}

#[test]
fn job_for_a_target_kind_the_agent_lacks_is_refused() {
    let (case, dep) = run_case(false, |stack, _, env| {
        let mut p = payload(env);
        p.target.kind = "mainframe".to_string();
        sign(&plane_key(stack), &p)
    });
    assert_refused(&case, &dep, "unsupported_target");
    assert!(
        containers_of(&case.stack.target).is_empty(),
        "nothing executed"
    );
}

#[test]
fn oversized_envelope_is_refused() {
    let (case, dep) = run_case(false, |stack, _, env| {
        let mut p = payload(env);
        p.target.config =
            serde_json::json!({ "padding": "x".repeat(stella_pki::MAX_ENVELOPE_BYTES) });
        sign(&plane_key(stack), &p)
    });
    assert_refused(&case, &dep, "oversized");
    assert!(
        containers_of(&case.stack.target).is_empty(),
        "nothing executed"
    );
}
}
