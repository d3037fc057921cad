//! Offline verification of exported bundles: an intact chain verifies, and every kind of damage
//! is detected and located at the packet (or job) where it happened.

mod fixture;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use fixture::{TRUST_DOMAIN, World, receipt_payload};
use stella_evidence::{
    Bundle, Check, EvidenceChain, EvidenceKey, Location, PACKET_PAYLOAD_TYPE, PREDICATE_TYPE,
    STATEMENT_TYPE, SignedPacket, VerificationReport, packet_digest, verify_bundle,
};
use stella_pki::{CertificateAuthority, SigningKey, sign_receipt};

/// Verifies the bundle after a round trip through its file format, as the CLI will.
fn verify(bundle: &Bundle) -> VerificationReport {
    let text = bundle.to_json().unwrap();
    verify_bundle(&Bundle::from_json(&text).unwrap())
}

#[track_caller]
fn assert_broken_at(report: &VerificationReport, index: usize) -> Check {
    assert!(!report.is_valid(), "damage went undetected");
    let first = report
        .first_broken_link()
        .unwrap_or_else(|| panic!("no broken link located:\n{report}"));
    let located = first
        .location
        .packet()
        .unwrap_or_else(|| panic!("not located at a packet: {first}\n{report}"));
    assert_eq!(
        located.index, index,
        "located at the wrong packet:\n{report}"
    );
    first.check
}

#[test]
fn a_six_packet_chain_verifies_offline() {
    let world = World::new();
    let packets = world.chain();
    let head = packets[5].digest.clone();
    let report = verify(&world.bundle(packets));
    assert!(report.is_valid(), "{report}");
    assert_eq!(report.packet_count, 6);
    assert_eq!(report.first_sequence, Some(1));
    assert_eq!(report.last_sequence, Some(6));
    assert_eq!(report.head_digest.as_deref(), Some(head.as_str()));
    assert_eq!(report.anchor, None);
    // Two jobs, each with a receipt, in each of the two deployments and the rollback.
    assert_eq!(report.receipts_verified, 6);
    assert_eq!(report.ca_fingerprints, vec![world.ca.fingerprint()]);
    assert!(report.evidence_keys[0].starts_with(world.key.key_id()));
    let text = report.to_string();
    assert!(text.contains("VERIFIED"), "{text}");
    assert!(text.contains("sequence 1 to 6"), "{text}");
}

#[test]
fn packets_are_in_toto_statements_chained_by_envelope_digest() {
    let world = World::new();
    let packets = world.chain();
    for (i, packet) in packets.iter().enumerate() {
        assert_eq!(packet.envelope.payload_type, PACKET_PAYLOAD_TYPE);
        let body = B64.decode(&packet.envelope.payload).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["_type"], STATEMENT_TYPE);
        assert_eq!(json["predicateType"], PREDICATE_TYPE);
        assert_eq!(json["predicate"]["sequence"], i as u64 + 1);
        assert_eq!(json["subject"].as_array().unwrap().len(), 2);
        // The digest is sha256 over the canonical JSON of the envelope, computed independently.
        let canonical = stella_pki::canonical_json(&packet.envelope).unwrap();
        assert_eq!(packet.digest, stella_pki::sha256_digest(&canonical));
        let previous = &json["predicate"]["previous"];
        if i == 0 {
            assert!(previous.is_null());
        } else {
            assert_eq!(previous, &serde_json::json!(packets[i - 1].digest));
        }
    }
}

/// Flips bit 0 of the byte at `pos`: inside base64, hex and decimal text this yields another
/// printable character that is never a quote or backslash, so the file stays valid JSON.
fn flip_char(text: &mut String, pos: usize) {
    let mut bytes = std::mem::take(text).into_bytes();
    bytes[pos] ^= 0x01;
    *text = String::from_utf8(bytes).unwrap();
}

/// Byte range of the `n`-th JSON string value of `key` in `text`.
fn string_value_span(text: &str, key: &str, n: usize) -> std::ops::Range<usize> {
    let needle = format!("\"{key}\": \"");
    let start = text
        .match_indices(&needle)
        .nth(n)
        .unwrap_or_else(|| panic!("no {n}th {key}"))
        .0
        + needle.len();
    let len = text[start..].find('"').unwrap();
    start..start + len
}

#[test]
fn flipping_a_byte_of_any_packet_in_the_file_is_detected_and_located() {
    let world = World::new();
    let text = world.bundle(world.chain()).to_json().unwrap();
    let mut cases = 0;
    for index in 0..6 {
        for key in ["payload", "sig", "keyid", "digest", "id", "payloadType"] {
            let span = string_value_span(&text, key, index);
            let len = span.len();
            for offset in [0, len / 3, len / 2, len - 1] {
                let mut damaged = text.clone();
                flip_char(&mut damaged, span.start + offset);
                let bundle = Bundle::from_json(&damaged).unwrap();
                let check = assert_broken_at(&verify_bundle(&bundle), index);
                if key == "digest" || key == "id" {
                    assert_eq!(check, Check::RecordedDigest);
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 6 * 6 * 4);

    // The stored sequence beside each envelope is checked against the signed one.
    for index in 0..6 {
        let needle = "\"sequence\": ";
        let at = text.match_indices(needle).nth(index).unwrap().0 + needle.len();
        let mut damaged = text.clone();
        flip_char(&mut damaged, at);
        let bundle = Bundle::from_json(&damaged).unwrap();
        let report = verify_bundle(&bundle);
        assert_eq!(
            assert_broken_at(&report, index),
            Check::RecordedDigest,
            "{report}"
        );
        assert_eq!(report.problems.len(), 1, "{report}");
    }
}

#[test]
fn flipping_a_byte_of_any_signed_payload_or_signature_is_detected_and_located() {
    let world = World::new();
    let bundle = world.bundle(world.chain());
    for index in 0..6 {
        let payload = B64.decode(&bundle.packets[index].envelope.payload).unwrap();
        for pos in [
            0,
            1,
            payload.len() / 2,
            payload.len() - 2,
            payload.len() - 1,
        ] {
            let mut damaged = bundle.clone();
            let mut bytes = payload.clone();
            bytes[pos] ^= 0x20;
            damaged.packets[index].envelope.payload = B64.encode(&bytes);
            let report = verify(&damaged);
            assert_broken_at(&report, index);
            assert!(
                report.problems.iter().any(|p| p.check == Check::Signature
                    && p.location.packet().is_some_and(|r| r.index == index)),
                "{report}"
            );
            // The damage also breaks the next packet's link to it.
            if index < 5 {
                assert!(
                    report.problems.iter().any(|p| p.check == Check::ChainLink
                        && p.location.packet().is_some_and(|r| r.index == index + 1)),
                    "{report}"
                );
            }
        }
        let sig = B64
            .decode(&bundle.packets[index].envelope.signatures[0].sig)
            .unwrap();
        for pos in [0, 31, 32, 63] {
            let mut damaged = bundle.clone();
            let mut bytes = sig.clone();
            bytes[pos] ^= 0x01;
            damaged.packets[index].envelope.signatures[0].sig = B64.encode(&bytes);
            let report = verify(&damaged);
            assert_eq!(
                assert_broken_at(&report, index),
                Check::Signature,
                "{report}"
            );
        }
    }
}

#[test]
fn dropping_any_packet_is_detected_and_located() {
    let world = World::new();
    let packets = world.chain();
    for dropped in 0..6 {
        let mut kept = packets.clone();
        kept.remove(dropped);
        let mut bundle = world.bundle(packets.clone());
        bundle.packets = kept;
        let report = verify(&bundle);
        assert!(!report.is_valid());
        let first = report.first_broken_link().unwrap();
        assert_eq!(first.check, Check::Sequence, "{report}");
        if dropped == 5 {
            // The last packet: only the signed manifest knows it existed.
            assert_eq!(
                first.location,
                Location::End {
                    after: Some(stella_evidence::PacketRef {
                        index: 4,
                        sequence: 5,
                        id: packets[4].id.clone()
                    }),
                    expected_sequence: Some(6)
                },
                "{report}"
            );
            assert!(first.detail.contains("packet 6 is missing"), "{first}");
        } else {
            let at = first.location.packet().unwrap();
            assert_eq!(at.index, dropped, "{report}");
            assert_eq!(at.sequence, dropped as u64 + 2);
            assert_eq!(at.id, packets[dropped + 1].id);
            let missing = format!("packet {} is missing", dropped + 1);
            assert!(first.detail.contains(&missing), "{first}");
        }
    }
    let mut bundle = world.bundle(packets.clone());
    bundle.packets.drain(2..4);
    let report = verify(&bundle);
    assert_eq!(assert_broken_at(&report, 2), Check::Sequence);
    let first = report.first_broken_link().unwrap();
    assert!(
        first.detail.contains("packets 3 to 4 are missing"),
        "{first}"
    );
}

#[test]
fn swapping_two_packets_is_detected_and_located() {
    let world = World::new();
    let packets = world.chain();
    for (a, b) in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (0, 5), (1, 4)] {
        let mut bundle = world.bundle(packets.clone());
        bundle.packets.swap(a, b);
        let report = verify(&bundle);
        assert_eq!(assert_broken_at(&report, a), Check::Sequence, "{report}");
        let first = report.first_broken_link().unwrap();
        assert_eq!(first.location.packet().unwrap().sequence, b as u64 + 1);
        // The link check agrees wherever a predecessor exists.
        if a > 0 {
            assert!(report.problems.iter().any(|p| p.check == Check::ChainLink
                && p.location.packet().is_some_and(|r| r.index == a)));
        }
    }
}

#[test]
fn a_receipt_signed_by_another_key_is_detected() {
    let world = World::new();
    let mut contents = world.contents();
    // Packet 4 (index 3): agent B's key signs a receipt that claims agent A's certificate.
    let execution = contents[3].execution.as_mut().unwrap();
    let job = &mut execution.jobs[0];
    job.receipt = sign_receipt(
        &world.agent_b.key_pem,
        &world.agent_a.cert_der,
        &receipt_payload(&job.job_id, &world.agent_a.id, "succeeded"),
    )
    .unwrap();
    let forged_job = job.job_id.clone();
    let mut chain = EvidenceChain::new();
    let packets: Vec<_> = contents
        .into_iter()
        .map(|c| chain.append(c, &world.key).unwrap())
        .collect();
    let report = verify(&world.bundle(packets));
    assert_eq!(assert_broken_at(&report, 3), Check::Receipt, "{report}");
    assert_eq!(report.problems.len(), 1, "{report}");
    match &report.problems[0].location {
        Location::Job {
            job_index, job_id, ..
        } => {
            assert_eq!(*job_index, 0);
            assert_eq!(job_id, &forged_job);
        }
        other => panic!("not located at the job: {other}"),
    }
    assert_eq!(report.receipts_verified, 5);
}

#[test]
fn a_receipt_by_another_agents_certificate_is_detected() {
    let world = World::new();
    let mut contents = world.contents();
    // A genuine receipt by agent B, recorded for a job that ran on agent A.
    let execution = contents[1].execution.as_mut().unwrap();
    let job = &mut execution.jobs[0];
    job.receipt = sign_receipt(
        &world.agent_b.key_pem,
        &world.agent_b.cert_der,
        &receipt_payload(&job.job_id, &world.agent_a.id, "succeeded"),
    )
    .unwrap();
    let mut chain = EvidenceChain::new();
    let packets: Vec<_> = contents
        .into_iter()
        .map(|c| chain.append(c, &world.key).unwrap())
        .collect();
    let report = verify(&world.bundle(packets));
    assert_eq!(
        assert_broken_at(&report, 1),
        Check::AgentCertificate,
        "{report}"
    );
    assert!(
        report.problems[0]
            .detail
            .contains("belongs to agent \"agt_b\"")
    );
}

#[test]
fn a_receipt_made_outside_its_certificates_validity_is_detected() {
    let world = World::new();
    let mut contents = world.contents();
    let job = &mut contents[3].execution.as_mut().unwrap().jobs[1];
    let mut payload = receipt_payload(&job.job_id, &world.agent_b.id, "succeeded");
    payload.finished_at_unix_ms = 1_000;
    job.receipt = sign_receipt(&world.agent_b.key_pem, &world.agent_b.cert_der, &payload).unwrap();
    let mut chain = EvidenceChain::new();
    let packets: Vec<_> = contents
        .into_iter()
        .map(|c| chain.append(c, &world.key).unwrap())
        .collect();
    let report = verify(&world.bundle(packets));
    assert_eq!(
        assert_broken_at(&report, 3),
        Check::AgentCertificate,
        "{report}"
    );
    assert!(
        report.problems[0].detail.contains("outside certificate"),
        "{report}"
    );
    assert_eq!(report.problems.len(), 1, "{report}");
}

#[test]
fn a_receipt_from_a_certificate_of_a_foreign_ca_is_detected() {
    let world = World::new();
    let rogue_ca = CertificateAuthority::generate("rogue").unwrap();
    let rogue = fixture::Agent::enroll(&rogue_ca, "agt_a");
    let mut contents = world.contents();
    let job = &mut contents[1].execution.as_mut().unwrap().jobs[0];
    job.receipt = rogue.receipt(&job.job_id, "succeeded");
    let mut chain = EvidenceChain::new();
    let packets: Vec<_> = contents
        .into_iter()
        .map(|c| chain.append(c, &world.key).unwrap())
        .collect();
    // The exporter refuses to vouch for it...
    let mut bundle_contents = world.bundle_contents(packets.clone());
    bundle_contents
        .agent_certificates
        .push(rogue.cert_pem.clone());
    let err = Bundle::export(bundle_contents, world.at(60), &world.key).unwrap_err();
    assert!(err.to_string().contains("not issued by any"), "{err}");
    // ...and a bundle that carries it anyway does not verify.
    let mut bundle = world.bundle(packets[..1].to_vec());
    bundle.packets = packets;
    bundle.agent_certificates.push(rogue.cert_pem.clone());
    let report = verify_bundle(&bundle);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.check == Check::AgentCertificate
                && p.detail.contains("not issued by any CA")
                && matches!(&p.location, Location::Job { packet, .. } if packet.index == 1))
    );
}

#[test]
fn a_bundle_missing_the_evidence_key_says_which_key_is_missing() {
    let world = World::new();
    let mut bundle = world.bundle(world.chain());
    bundle.evidence_keys.clear();
    let report = verify(&bundle);
    assert_eq!(assert_broken_at(&report, 0), Check::UnknownKey);
    let unknown: Vec<_> = report
        .problems
        .iter()
        .filter(|p| p.check == Check::UnknownKey)
        .collect();
    // The manifest and all six packets name the key they need.
    assert_eq!(unknown.len(), 7, "{report}");
    assert!(
        unknown
            .iter()
            .all(|p| p.detail.contains(world.key.key_id()))
    );
    let text = report.to_string();
    assert!(text.contains("FAILED"), "{text}");
    assert!(text.contains("no evidence keys"), "{text}");
    assert!(
        text.contains(&format!(
            "First broken link: packet at position 1 (sequence 1, id {})",
            bundle.packets[0].id
        )),
        "{text}"
    );
    assert!(text.contains("which the bundle does not carry"), "{text}");
}

#[test]
fn a_bundle_missing_an_agent_certificate_names_the_job() {
    let world = World::new();
    let mut bundle = world.bundle(world.chain());
    let b_fingerprint = stella_pki::fingerprint_der(&world.agent_b.cert_der);
    bundle
        .agent_certificates
        .retain(|pem| stella_pki::fingerprint_pem(pem).unwrap() != b_fingerprint);
    let report = verify(&bundle);
    assert_eq!(assert_broken_at(&report, 1), Check::MissingAgentCertificate);
    let missing: Vec<_> = report
        .problems
        .iter()
        .filter(|p| p.check == Check::MissingAgentCertificate)
        .collect();
    assert_eq!(missing.len(), 3, "{report}");
    assert!(missing.iter().all(|p| p.detail.contains(&b_fingerprint)));
    assert_eq!(report.receipts_verified, 3);
}

#[test]
fn a_partial_export_verifies_and_shows_where_it_attaches() {
    let world = World::new();
    let packets = world.chain();
    let report = verify(&world.bundle(packets[2..].to_vec()));
    assert!(report.is_valid(), "{report}");
    assert_eq!(report.first_sequence, Some(3));
    assert_eq!(report.anchor.as_deref(), Some(packets[1].digest.as_str()));
    assert!(report.to_string().contains(&packets[1].digest));
}

#[test]
fn rotated_evidence_keys_verify_within_their_periods_only() {
    let world = World::new();
    let next = SigningKey::generate();
    let contents = world.contents();
    let mut chain = EvidenceChain::new();
    let mut packets = Vec::new();
    for (i, content) in contents.into_iter().enumerate() {
        let key = if i < 3 { &world.key } else { &next };
        packets.push(chain.append(content, key).unwrap());
    }
    // Packet 3 was recorded at minute 20, packet 4 at minute 21: the rotation is at minute 21.
    let rotation = world.at(21);
    let keys = vec![
        EvidenceKey {
            key: world.key.public_key(),
            valid_from: world.epoch,
            valid_until: Some(rotation),
        },
        EvidenceKey::current(&next, rotation),
    ];
    let mut contents = world.bundle_contents(packets.clone());
    contents.evidence_keys = keys.clone();
    let bundle = Bundle::export(contents, world.at(60), &next).unwrap();
    let report = verify(&bundle);
    assert!(report.is_valid(), "{report}");
    assert_eq!(report.evidence_keys.len(), 2);

    // The old key's period ending earlier makes packet 3 (index 2) a signature out of period.
    let mut early = bundle.clone();
    early.evidence_keys[0].valid_until = Some(world.at(15));
    let report = verify(&early);
    assert_eq!(assert_broken_at(&report, 2), Check::KeyValidity, "{report}");
    // Besides the packet, the signed manifest notices that the key periods were edited.
    assert_eq!(report.problems.len(), 2, "{report}");
    assert_eq!(report.problems[0].location, Location::Bundle);
    assert_eq!(report.problems[0].check, Check::Manifest);

    // An exporter whose key period really ended early signs that into the manifest.
    let mut contents = world.bundle_contents(packets.clone());
    contents.evidence_keys = early.evidence_keys.clone();
    let honest = Bundle::export(contents, world.at(60), &next).unwrap();
    let report = verify(&honest);
    assert_eq!(assert_broken_at(&report, 2), Check::KeyValidity, "{report}");
    assert_eq!(report.problems.len(), 1, "{report}");
}

/// Signs whatever statement JSON it is given, as a buggy or hostile writer holding the key could.
fn sign_raw(key: &SigningKey, statement: &serde_json::Value) -> SignedPacket {
    let payload = stella_pki::canonical_json(statement).unwrap();
    let envelope = key.sign(PACKET_PAYLOAD_TYPE, &payload);
    let digest = packet_digest(&envelope).unwrap();
    SignedPacket {
        id: stella_evidence::packet_id(&digest),
        sequence: statement["predicate"]["sequence"].as_u64().unwrap(),
        digest,
        envelope,
    }
}

fn statement_of(packet: &SignedPacket) -> serde_json::Value {
    serde_json::from_slice(&B64.decode(&packet.envelope.payload).unwrap()).unwrap()
}

/// Replaces packet `index` with a re-signed variant and re-links the packets after it, so only
/// the content check can object.
fn resign_from(
    world: &World,
    packets: &[SignedPacket],
    index: usize,
    change: impl FnOnce(&mut serde_json::Value),
) -> Vec<SignedPacket> {
    let mut out = packets[..index].to_vec();
    let mut statement = statement_of(&packets[index]);
    change(&mut statement);
    out.push(sign_raw(&world.key, &statement));
    for packet in &packets[index + 1..] {
        let mut statement = statement_of(packet);
        statement["predicate"]["previous"] = serde_json::json!(out.last().unwrap().digest);
        out.push(sign_raw(&world.key, &statement));
    }
    out
}

#[test]
fn validly_signed_but_inconsistent_packets_are_reported() {
    let world = World::new();
    let packets = world.chain();

    // Subjects that are not the release's components.
    let changed = resign_from(&world, &packets, 2, |s| {
        s["subject"][0]["digest"]["sha256"] = serde_json::json!("f".repeat(64));
    });
    let report = verify(&world.bundle(changed));
    assert_eq!(assert_broken_at(&report, 2), Check::Subjects, "{report}");
    assert_eq!(report.problems.len(), 1, "{report}");

    // A genuine receipt recorded for another job.
    let changed = resign_from(&world, &packets, 3, |s| {
        s["predicate"]["execution"]["jobs"][1]["job_id"] = serde_json::json!("job_other");
    });
    let report = verify(&world.bundle(changed));
    assert!(report.problems.iter().any(|p| p.check == Check::Receipt
        && p.detail.contains("receipt is for job \"job_run2_b\", not \"job_other\"")
        && matches!(&p.location, Location::Job { packet, job_index: 1, .. } if packet.index == 3)),
        "{report}");

    // A genuine receipt answering another job envelope than the one recorded.
    let changed = resign_from(&world, &packets, 1, |s| {
        s["predicate"]["execution"]["jobs"][0]["job_envelope_digest"] =
            serde_json::json!(fixture::digest('9'));
    });
    let report = verify(&world.bundle(changed));
    assert!(
        report.problems.iter().any(|p| p.check == Check::Receipt
            && p.detail.contains("receipt answers job envelope")
            && matches!(&p.location, Location::Job { packet, job_index: 0, .. } if packet.index == 1)),
        "{report}"
    );

    // Not an in-toto statement.
    let changed = resign_from(&world, &packets, 4, |s| {
        s["_type"] = serde_json::json!("https://in-toto.io/Statement/v0.1");
    });
    let report = verify(&world.bundle(changed));
    assert_eq!(assert_broken_at(&report, 4), Check::Statement, "{report}");

    // Another predicate type.
    let changed = resign_from(&world, &packets, 0, |s| {
        s["predicateType"] = serde_json::json!("https://slsa.dev/provenance/v1");
    });
    let report = verify(&world.bundle(changed));
    assert_eq!(assert_broken_at(&report, 0), Check::Statement, "{report}");

    // A deployment without its execution.
    let changed = resign_from(&world, &packets, 1, |s| {
        s["predicate"].as_object_mut().unwrap().remove("execution");
    });
    let report = verify(&world.bundle(changed));
    assert_eq!(assert_broken_at(&report, 1), Check::Predicate, "{report}");
}

#[test]
fn swapped_ca_certificates_are_reported_against_the_manifest() {
    let world = World::new();
    let mut bundle = world.bundle(world.chain());
    let other = CertificateAuthority::generate("other").unwrap();
    bundle.ca_certificates.push(other.cert_pem().to_string());
    let report = verify(&bundle);
    assert!(report.first_broken_link().is_none(), "{report}");
    assert_eq!(report.problems.len(), 1, "{report}");
    assert_eq!(report.problems[0].check, Check::Manifest);
    assert!(report.problems[0].detail.contains("CA certificates differ"));
}

#[test]
fn a_tampered_manifest_is_reported_and_the_chain_still_checked() {
    let world = World::new();
    let mut bundle = world.bundle(world.chain());
    let mut raw = B64.decode(&bundle.manifest.payload).unwrap();
    raw[5] ^= 0x01;
    bundle.manifest.payload = B64.encode(&raw);
    let report = verify(&bundle);
    assert!(!report.is_valid());
    assert!(report.first_broken_link().is_none(), "{report}");
    assert!(
        report
            .problems
            .iter()
            .all(|p| p.location == Location::Bundle)
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.check == Check::Manifest && p.detail.contains("cannot be checked"))
    );
}

#[test]
fn bundle_files_of_other_formats_are_refused_by_name() {
    let world = World::new();
    let bundle = world.bundle(world.chain());
    let mut json: serde_json::Value = serde_json::from_str(&bundle.to_json().unwrap()).unwrap();
    json["version"] = serde_json::json!(2);
    let err = Bundle::from_json(&json.to_string()).unwrap_err();
    assert!(err.to_string().contains("bundle version 2"), "{err}");
    json["format"] = serde_json::json!("something-else");
    let err = Bundle::from_json(&json.to_string()).unwrap_err();
    assert!(err.to_string().contains("something-else"), "{err}");
    let err = Bundle::from_json("{\"format\":").unwrap_err();
    assert!(err.to_string().contains("not JSON"), "{err}");

    let mut json: serde_json::Value = serde_json::from_str(&bundle.to_json().unwrap()).unwrap();
    json["packets"][2]["sequencf"] = serde_json::json!(3);
    let err = Bundle::from_json(&json.to_string()).unwrap_err();
    assert!(err.to_string().contains("packet at position 3"), "{err}");
    assert!(
        err.to_string().contains("unknown field `sequencf`"),
        "{err}"
    );

    let mut json: serde_json::Value = serde_json::from_str(&bundle.to_json().unwrap()).unwrap();
    json["packets"][3]["sequence"] = serde_json::json!("four");
    let err = Bundle::from_json(&json.to_string()).unwrap_err();
    assert!(err.to_string().contains("packet at position 4"), "{err}");
}

#[test]
fn the_report_serialises_for_programs() {
    let world = World::new();
    let mut bundle = world.bundle(world.chain());
    bundle.packets.swap(2, 3);
    let report = verify(&bundle);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["trust_domain"], TRUST_DOMAIN);
    let first = &json["problems"][0];
    assert_eq!(first["check"], "sequence");
    assert_eq!(first["location"]["at"], "packet");
    assert_eq!(first["location"]["index"], 2);
    assert_eq!(first["location"]["sequence"], 4);
    assert_eq!(
        packet_digest(&bundle.packets[0].envelope).unwrap(),
        bundle.packets[0].digest
    );
}

#[test]
fn pinned_keys_catch_a_bundle_re_signed_by_someone_else() {
    let world = World::new();
    let genuine = world.bundle(world.chain());
    let report = stella_evidence::verify_bundle_pinned(&genuine, &[world.key.public_key()]);
    assert!(report.is_valid(), "{report}");
    assert!(report.keys_pinned);
    assert!(report.to_string().contains("Evidence keys are pinned"));

    // Someone who can rewrite the file builds a whole new chain under a key of their own.
    let forger = SigningKey::generate();
    let mut chain = EvidenceChain::new();
    let forged: Vec<_> = world
        .contents()
        .into_iter()
        .map(|c| chain.append(c, &forger).unwrap())
        .collect();
    let mut contents = world.bundle_contents(forged);
    contents.evidence_keys = vec![EvidenceKey::current(&forger, world.epoch)];
    let forged = Bundle::export(contents, world.at(60), &forger).unwrap();
    // Internally consistent, so only a pin can tell...
    assert!(verify(&forged).is_valid());
    // ...and a pin does, at the first packet.
    let report = stella_evidence::verify_bundle_pinned(&forged, &[world.key.public_key()]);
    assert_eq!(
        assert_broken_at(&report, 0),
        Check::UntrustedKey,
        "{report}"
    );
    let untrusted = report
        .problems
        .iter()
        .filter(|p| p.check == Check::UntrustedKey)
        .count();
    // The key record itself, the manifest and six packets.
    assert_eq!(untrusted, 8, "{report}");
}

#[test]
fn an_evidence_key_with_an_empty_period_is_reported() {
    let world = World::new();
    let mut bundle = world.bundle(world.chain());
    bundle.evidence_keys[0].valid_until = Some(world.epoch);
    let report = verify(&bundle);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.location == Location::Bundle
                && p.check == Check::EvidenceKey
                && p.detail.contains("empty validity period"))
    );
    assert_eq!(assert_broken_at(&report, 0), Check::Signature, "{report}");
    assert!(
        report.problems[1..]
            .iter()
            .any(|p| p.detail.contains("record in the bundle is unusable"))
    );
}
