//! Building packets (validation, chaining, resuming), exporting bundles, rendering packets for
//! people and the audit export.

mod fixture;

use fixture::{World, digest, release};
use stella_evidence::{
    AUDIT_COLUMNS, Bundle, ChainHead, EvidenceChain, EvidenceError, EvidenceKey, PacketKind,
    SignedPacket, audit_csv, audit_json, audit_rows, render_packet, required_agent_certificates,
    verify_bundle,
};
use stella_pki::SigningKey;

#[track_caller]
fn assert_refused(result: Result<SignedPacket, EvidenceError>, field: &str, reason: &str) {
    match result {
        Err(EvidenceError::InvalidContent {
            field: f,
            reason: r,
        }) => {
            assert_eq!(f, field, "reason: {r}");
            assert!(r.contains(reason), "{r:?} does not mention {reason:?}");
        }
        other => panic!("expected a refusal of {field}, got {other:?}"),
    }
}

#[test]
fn malformed_content_is_refused_and_the_chain_does_not_advance() {
    let world = World::new();
    let mut chain = EvidenceChain::new();
    let first = chain
        .append(world.contents()[0].clone(), &world.key)
        .unwrap();
    let head = chain.head().cloned();

    let base = || world.contents()[1].clone();
    let mut c = base();
    c.release.components[1].digest = "sha256:abc".into();
    assert_refused(
        chain.append(c, &world.key),
        "release.components[1].digest",
        "not sha256:",
    );
    let mut c = base();
    c.release.components[1].name = "web".into();
    assert_refused(
        chain.append(c, &world.key),
        "release.components[1].name",
        "twice",
    );
    let mut c = base();
    c.release.components.clear();
    assert_refused(
        chain.append(c, &world.key),
        "release.components",
        "at least one",
    );
    let mut c = base();
    c.environment = " ".into();
    assert_refused(chain.append(c, &world.key), "environment", "empty");
    let mut c = base();
    c.actors.requester = "mallory\n[ok] approved".into();
    assert_refused(chain.append(c, &world.key), "actors.requester", "control");
    let mut c = base();
    c.execution = None;
    assert_refused(chain.append(c, &world.key), "execution", "must have it");
    let mut c = base();
    c.decision = world.contents()[0].decision.clone();
    assert_refused(chain.append(c, &world.key), "decision", "must not have it");
    let mut c = base();
    c.execution.as_mut().unwrap().jobs[0].target = "elsewhere".into();
    assert_refused(
        chain.append(c, &world.key),
        "execution.jobs[0].target",
        "not one of the packet's targets",
    );
    let mut c = base();
    c.execution.as_mut().unwrap().jobs[0].agent_id = "agt_b".into();
    assert_refused(
        chain.append(c, &world.key),
        "execution.jobs[0].agent_id",
        "served by agent \"agt_a\"",
    );
    let mut c = base();
    c.execution.as_mut().unwrap().jobs[1].job_id = "job_other".into();
    assert_refused(
        chain.append(c, &world.key),
        "execution.jobs[1].receipt",
        "receipt is for job",
    );
    let mut c = base();
    c.execution.as_mut().unwrap().jobs[1].status = "failed".into();
    assert_refused(
        chain.append(c, &world.key),
        "execution.jobs[1].receipt",
        "attests status \"succeeded\"",
    );
    let mut c = base();
    c.execution.as_mut().unwrap().jobs[0].job_envelope_digest = Some(digest('9'));
    assert_refused(
        chain.append(c, &world.key),
        "execution.jobs[0].receipt",
        "receipt answers job envelope",
    );
    let mut c = base();
    c.execution.as_mut().unwrap().jobs[0].log_digests = vec!["md5:00".into()];
    assert_refused(
        chain.append(c, &world.key),
        "execution.jobs[0].log_digests[0]",
        "not sha256:",
    );
    let mut c = world.contents()[4].clone();
    c.previous_state.as_mut().unwrap().to = release("shop-9", '5', '6');
    assert_refused(chain.append(c, &world.key), "previous_state.to", "restored");
    let mut c = world.contents()[4].clone();
    c.previous_state = None;
    assert_refused(
        chain.append(c, &world.key),
        "previous_state",
        "must have it",
    );

    assert_eq!(chain.head().cloned(), head);
    let second = chain.append(base(), &world.key).unwrap();
    assert_eq!(second.sequence, 2);
    let statement = second.statement().unwrap();
    assert_eq!(
        statement.predicate.previous.as_deref(),
        Some(first.digest.as_str())
    );
}

#[test]
fn a_chain_resumes_from_its_stored_head() {
    let world = World::new();
    let contents = world.contents();

    let mut chain = EvidenceChain::new();
    let first_three: Vec<_> = contents[..3]
        .iter()
        .map(|c| chain.append(c.clone(), &world.key).unwrap())
        .collect();
    // As the plane does: read the head back from storage and continue in a new transaction.
    let stored = SignedPacket::from_envelope(first_three[2].envelope.clone()).unwrap();
    assert_eq!(stored, first_three[2]);
    let mut resumed = EvidenceChain::after(&stored).unwrap();
    let mut from_head = EvidenceChain::resume(ChainHead {
        sequence: 3,
        digest: stored.digest.clone(),
    })
    .unwrap();
    let fourth = resumed.append(contents[3].clone(), &world.key).unwrap();
    let fourth_again = from_head.append(contents[3].clone(), &world.key).unwrap();
    assert_eq!(fourth.sequence, 4);
    // Ed25519 is deterministic: same content and position, same packet.
    assert_eq!(fourth, fourth_again);
    let predicate = fourth.statement().unwrap().predicate;
    assert_eq!(predicate.previous.as_deref(), Some(stored.digest.as_str()));
    assert_eq!(predicate.content, contents[3]);

    let mut packets = first_three;
    packets.push(fourth);
    for content in &contents[4..] {
        packets.push(resumed.append(content.clone(), &world.key).unwrap());
    }
    let report = verify_bundle(&world.bundle(packets));
    assert!(report.is_valid(), "{report}");

    assert!(matches!(
        EvidenceChain::resume(ChainHead {
            sequence: 0,
            digest: digest('a')
        }),
        Err(EvidenceError::InvalidContent { .. })
    ));
    assert!(matches!(
        EvidenceChain::resume(ChainHead {
            sequence: 2,
            digest: "sha256:short".into()
        }),
        Err(EvidenceError::InvalidContent { .. })
    ));
    let mut full = EvidenceChain::resume(ChainHead {
        sequence: u64::MAX,
        digest: digest('a'),
    })
    .unwrap();
    assert!(matches!(
        full.append(contents[0].clone(), &world.key),
        Err(EvidenceError::SequenceExhausted(u64::MAX))
    ));
}

#[test]
fn export_refuses_material_that_cannot_make_a_verifiable_bundle() {
    let world = World::new();
    let packets = world.chain();
    let needed = required_agent_certificates(&packets).unwrap();
    assert_eq!(needed.into_iter().collect::<Vec<_>>(), {
        let mut v = vec![
            stella_pki::fingerprint_der(&world.agent_a.cert_der),
            stella_pki::fingerprint_der(&world.agent_b.cert_der),
        ];
        v.sort();
        v
    });

    let mut contents = world.bundle_contents(packets.clone());
    contents.agent_certificates.remove(1);
    let err = Bundle::export(contents, world.at(60), &world.key).unwrap_err();
    assert!(
        err.to_string()
            .contains(&stella_pki::fingerprint_der(&world.agent_b.cert_der)),
        "{err}"
    );

    let other = SigningKey::generate();
    let contents = world.bundle_contents(packets.clone());
    let err = Bundle::export(contents, world.at(60), &other).unwrap_err();
    assert!(err.to_string().contains("exporting key"), "{err}");

    let mut contents = world.bundle_contents(packets.clone());
    contents.evidence_keys = vec![EvidenceKey::current(&other, world.epoch)];
    let err = Bundle::export(contents, world.at(60), &other).unwrap_err();
    assert!(err.to_string().contains(world.key.key_id()), "{err}");

    let mut contents = world.bundle_contents(packets.clone());
    contents.trust_domain = "Not A Domain".into();
    assert!(Bundle::export(contents, world.at(60), &world.key).is_err());

    // Extra certificates are left out: the bundle carries what its receipts need.
    let mut contents = world.bundle_contents(packets[..1].to_vec());
    contents
        .agent_certificates
        .push(world.agent_a.cert_pem.clone());
    let bundle = Bundle::export(contents, world.at(60), &world.key).unwrap();
    assert!(bundle.agent_certificates.is_empty());
    assert!(verify_bundle(&bundle).is_valid());

    // An empty run is a valid export.
    let bundle = Bundle::export(world.bundle_contents(vec![]), world.at(60), &world.key).unwrap();
    let report = verify_bundle(&bundle);
    assert!(report.is_valid(), "{report}");
    assert_eq!(report.packet_count, 0);
}

#[test]
fn render_says_who_what_why_how_and_when() {
    let world = World::new();
    let packets = world.chain();

    let decision = render_packet(&packets[2]);
    for expected in [
        packets[2].id.as_str(),
        "promotion_decision, sequence 3",
        &format!("previous:  {}", packets[1].digest),
        world.key.key_id(),
        "not checked here",
        "When: recorded",
        "What: release shop-1.1 in environment prod (promotion prm_prod_shop-1.1)",
        &format!("component web  demo/web@{}", digest('1')),
        "target    prod-web (docker) served by agent agt_a",
        "Who:  requested by alice",
        "approved by bob at",
        "\"checked the changelog, ship it\"",
        "Why:  decision approved",
        "gate freeze_window: passed (no freeze window is active)",
        &format!("policy    {}", digest('c')),
        &format!("input     {}", digest('d')),
    ] {
        assert!(
            decision.contains(expected),
            "missing {expected:?} in\n{decision}"
        );
    }
    assert!(!decision.contains("How:"));

    let first = render_packet(&packets[0]);
    assert!(
        first.contains("previous:  none (first packet of the chain)"),
        "{first}"
    );

    let rollback = render_packet(&packets[4]);
    for expected in [
        "rollback, sequence 5",
        "(deployment dep_run3)",
        "How:  workflow run run3, outcome succeeded",
        &format!(
            "job job_run3_a on prod-web by agent agt_a: succeeded (receipt signed by certificate {})",
            stella_pki::fingerprint_der(&world.agent_a.cert_der)
        ),
        &format!("log {}", digest('e')),
        "Rollback: from release shop-1.1 to release shop-1.0",
        &format!("component web  {} -> {}", digest('1'), digest('a')),
        "no approvals recorded",
    ] {
        assert!(
            rollback.contains(expected),
            "missing {expected:?} in\n{rollback}"
        );
    }

    let mut unreadable = packets[0].clone();
    unreadable.envelope.payload = "%%%".into();
    let text = render_packet(&unreadable);
    assert!(text.contains("UNREADABLE"), "{text}");
}

#[test]
fn render_escapes_what_could_drive_a_terminal() {
    let world = World::new();
    let mut content = world.contents()[0].clone();
    content.actors.approvers[0].comment = "fine\n\u{1b}[2KApproved by: the CEO".into();
    let packet = EvidenceChain::new().append(content, &world.key).unwrap();
    let text = render_packet(&packet);
    assert!(!text.contains('\u{1b}'));
    assert!(
        text.contains("\"fine\\n\\u{1b}[2KApproved by: the CEO\""),
        "{text}"
    );
}

#[test]
fn audit_export_lists_every_decision_with_its_evidence_id() {
    let world = World::new();
    let mut contents = world.contents();
    contents[5].environment = "prod, \"eu\"".into();
    contents[5].actors.requester = "=cmd|' /C calc'!A0".into();
    let mut chain = EvidenceChain::new();
    let packets: Vec<_> = contents
        .into_iter()
        .map(|c| chain.append(c, &world.key).unwrap())
        .collect();
    let rows = audit_rows(&packets).unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[1].kind, PacketKind::Deployment);
    assert_eq!(rows[1].deployment_id.as_deref(), Some("dep_run1"));
    assert_eq!(rows[1].outcome, "succeeded");
    assert_eq!(rows[5].outcome, "rejected");
    assert_eq!(rows[4].promotion_id, None);
    for (row, packet) in rows.iter().zip(&packets) {
        assert_eq!(row.evidence_id, packet.id);
        assert_eq!(row.sequence, packet.sequence);
    }

    let csv = audit_csv(&rows);
    let lines: Vec<&str> = csv.split("\r\n").collect();
    assert_eq!(
        lines.len(),
        8,
        "header, six rows, and the empty rest after the last CRLF"
    );
    assert_eq!(lines[0], AUDIT_COLUMNS.join(","));
    assert_eq!(lines[7], "");
    assert_eq!(
        lines[2],
        format!(
            "{},2,deployment,prm_dev_shop-1.1,dep_run1,dev,shop-1.1,succeeded,alice,{}",
            packets[1].id, rows[1].recorded_at
        )
    );
    assert_eq!(
        lines[6],
        format!(
            "{},6,promotion_decision,prm_prod_shop-1.2,,\"prod, \"\"eu\"\"\",shop-1.2,rejected,'=cmd|' /C calc'!A0,{}",
            packets[5].id, rows[5].recorded_at
        )
    );

    let json: serde_json::Value = serde_json::from_str(&audit_json(&rows).unwrap()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 6);
    assert_eq!(json[4]["promotion_id"], serde_json::Value::Null);
    assert_eq!(json[4]["kind"], "rollback");
    // JSON keeps values exactly; only the CSV neutralises formulas.
    assert_eq!(json[5]["requester"], "=cmd|' /C calc'!A0");
    assert_eq!(json[5]["environment"], "prod, \"eu\"");
}
