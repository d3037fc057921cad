//! A packet for a person (`stella evidence show ID`): who, what, why, how, when.

use std::fmt::Write as _;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::packet::SignedPacket;
use crate::predicate::{Component, Release};

/// Renders `packet` as text. The signature is not checked here (that needs the bundle's keys:
/// `verify_bundle`), and the text says so. Every value coming from the packet is escaped, so a
/// hostile comment cannot drive the terminal.
pub fn render_packet(packet: &SignedPacket) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_packet(&mut out, packet);
    out
}

fn write_packet(out: &mut String, packet: &SignedPacket) -> std::fmt::Result {
    let statement = match packet.statement() {
        Ok(statement) => statement,
        Err(e) => {
            writeln!(out, "Evidence packet {}", clean(&packet.id))?;
            writeln!(out, "  digest:    {}", clean(&packet.digest))?;
            writeln!(out, "  UNREADABLE: {}", clean(&e.to_string()))?;
            return Ok(());
        }
    };
    let predicate = &statement.predicate;
    let content = &predicate.content;
    writeln!(
        out,
        "Evidence packet {} - {}, sequence {}",
        clean(&packet.id),
        content.kind,
        predicate.sequence
    )?;
    writeln!(out, "  digest:    {}", clean(&packet.digest))?;
    match &predicate.previous {
        Some(previous) => writeln!(out, "  previous:  {}", clean(previous))?,
        None => writeln!(out, "  previous:  none (first packet of the chain)")?,
    }
    let signers: Vec<String> = packet.signer_key_ids().into_iter().map(clean).collect();
    writeln!(
        out,
        "  signed by: {} (not checked here; `stella evidence verify` checks signatures)",
        signers.join(", ")
    )?;

    writeln!(out, "When: recorded {}", time_text(content.recorded_at))?;

    write!(
        out,
        "What: release {} in environment {}",
        clean(&content.release.name),
        clean(&content.environment)
    )?;
    let mut refs = Vec::new();
    if let Some(id) = &content.promotion_id {
        refs.push(format!("promotion {}", clean(id)));
    }
    if let Some(id) = &content.deployment_id {
        refs.push(format!("deployment {}", clean(id)));
    }
    if refs.is_empty() {
        writeln!(out)?;
    } else {
        writeln!(out, " ({})", refs.join(", "))?;
    }
    write_components(out, &content.release.components)?;
    for target in &content.targets {
        writeln!(
            out,
            "  target    {} ({}) served by agent {}",
            clean(&target.name),
            clean(&target.kind),
            clean(&target.agent_id)
        )?;
    }

    writeln!(
        out,
        "Who:  requested by {}",
        clean(&content.actors.requester)
    )?;
    if content.actors.approvers.is_empty() {
        writeln!(out, "  no approvals recorded")?;
    }
    for approval in &content.actors.approvers {
        write!(
            out,
            "  approved by {} at {}",
            clean(&approval.user),
            time_text(approval.at)
        )?;
        if approval.comment.is_empty() {
            writeln!(out)?;
        } else {
            writeln!(out, ": \"{}\"", clean(&approval.comment))?;
        }
    }

    if let Some(decision) = &content.decision {
        writeln!(out, "Why:  decision {}", clean(&decision.outcome))?;
        for gate in &decision.gates {
            write!(out, "  gate {}: {}", clean(&gate.gate), clean(&gate.status))?;
            if gate.reason.is_empty() {
                writeln!(out)?;
            } else {
                writeln!(out, " ({})", clean(&gate.reason))?;
            }
        }
        if let Some(policy) = &decision.policy_digest {
            writeln!(out, "  policy    {}", clean(policy))?;
        }
        if let Some(input) = &decision.input_hash {
            writeln!(out, "  input     {}", clean(input))?;
        }
    }

    if let Some(execution) = &content.execution {
        writeln!(
            out,
            "How:  workflow run {}, outcome {}",
            clean(&execution.workflow_run),
            clean(&execution.outcome)
        )?;
        for job in &execution.jobs {
            let receipt_key = job
                .receipt
                .signatures
                .first()
                .map_or_else(|| "unsigned".to_string(), |s| clean(&s.keyid));
            writeln!(
                out,
                "  job {} on {} by agent {}: {} (receipt signed by certificate {})",
                clean(&job.job_id),
                clean(&job.target),
                clean(&job.agent_id),
                clean(&job.status),
                receipt_key
            )?;
            for log in &job.log_digests {
                writeln!(out, "    log {}", clean(log))?;
            }
        }
    }

    if let Some(state) = &content.previous_state {
        writeln!(
            out,
            "Rollback: from release {} to release {}",
            clean(&state.from.name),
            clean(&state.to.name)
        )?;
        write_release_change(out, &state.from, &state.to)?;
    }
    Ok(())
}

fn write_components(out: &mut String, components: &[Component]) -> std::fmt::Result {
    for c in components {
        writeln!(
            out,
            "  component {}  {}@{}",
            clean(&c.name),
            clean(&c.image),
            clean(&c.digest)
        )?;
    }
    Ok(())
}

fn write_release_change(out: &mut String, from: &Release, to: &Release) -> std::fmt::Result {
    for c in &from.components {
        let restored = to
            .components
            .iter()
            .find(|t| t.name == c.name)
            .map_or_else(|| "removed".to_string(), |t| clean(&t.digest));
        writeln!(
            out,
            "  component {}  {} -> {}",
            clean(&c.name),
            clean(&c.digest),
            restored
        )?;
    }
    for t in &to.components {
        if !from.components.iter().any(|c| c.name == t.name) {
            writeln!(
                out,
                "  component {}  absent -> {}",
                clean(&t.name),
                clean(&t.digest)
            )?;
        }
    }
    Ok(())
}

fn time_text(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// Escapes control characters (newlines, escape sequences) and leaves everything else as is.
pub(crate) fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(clean("a\nb\u{1b}[31mc"), "a\\nb\\u{1b}[31mc");
        assert_eq!(clean("é ok"), "é ok");
    }
}
