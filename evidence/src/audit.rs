//! The audit export: one row per packet, for auditors who want a table of what was promoted,
//! deployed and rolled back, with the evidence id to look each one up.

use serde::Serialize;
use time::format_description::well_known::Rfc3339;

use crate::EvidenceError;
use crate::packet::SignedPacket;
use crate::predicate::PacketKind;

/// One audited decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRow {
    pub evidence_id: String,
    pub sequence: u64,
    pub kind: PacketKind,
    pub promotion_id: Option<String>,
    pub deployment_id: Option<String>,
    pub environment: String,
    pub release: String,
    /// The decision's outcome for promotion decisions, the execution's otherwise.
    pub outcome: String,
    pub requester: String,
    /// RFC 3339.
    pub recorded_at: String,
}

/// Column names, in the order [`audit_csv`] writes them.
pub const AUDIT_COLUMNS: [&str; 10] = [
    "evidence_id",
    "sequence",
    "kind",
    "promotion_id",
    "deployment_id",
    "environment",
    "release",
    "outcome",
    "requester",
    "recorded_at",
];

/// Rows for `packets`, in the order given. Payloads are read, not verified: export from the
/// plane's own store or from a bundle that [`crate::verify_bundle`] accepted.
pub fn audit_rows(packets: &[SignedPacket]) -> Result<Vec<AuditRow>, EvidenceError> {
    packets
        .iter()
        .map(|packet| {
            let statement = packet.statement()?;
            let content = statement.predicate.content;
            let outcome = match (&content.decision, &content.execution) {
                (Some(decision), _) => decision.outcome.clone(),
                (None, Some(execution)) => execution.outcome.clone(),
                (None, None) => String::new(),
            };
            let recorded_at = content
                .recorded_at
                .format(&Rfc3339)
                .map_err(|e| EvidenceError::Decode(format!("recorded_at: {e}")))?;
            Ok(AuditRow {
                evidence_id: packet.id.clone(),
                sequence: statement.predicate.sequence,
                kind: content.kind,
                promotion_id: content.promotion_id,
                deployment_id: content.deployment_id,
                environment: content.environment,
                release: content.release.name,
                outcome,
                requester: content.actors.requester,
                recorded_at,
            })
        })
        .collect()
}

/// JSON array of the rows (missing ids are `null`).
pub fn audit_json(rows: &[AuditRow]) -> Result<String, EvidenceError> {
    Ok(serde_json::to_string_pretty(rows)?)
}

/// RFC 4180 CSV with a header line and CRLF line ends. A field is quoted when it holds a comma,
/// a quote, CR or LF, or leading/trailing spaces; quotes inside are doubled. A field that a
/// spreadsheet would run as a formula (starting with `=`, `+`, `-`, `@`, tab or CR) is prefixed
/// with `'` (OWASP CSV injection guidance); the JSON export keeps such values untouched.
pub fn audit_csv(rows: &[AuditRow]) -> String {
    let mut out = String::new();
    push_record(&mut out, AUDIT_COLUMNS.iter().map(|c| c.to_string()));
    for row in rows {
        push_record(
            &mut out,
            [
                row.evidence_id.clone(),
                row.sequence.to_string(),
                row.kind.as_str().to_string(),
                row.promotion_id.clone().unwrap_or_default(),
                row.deployment_id.clone().unwrap_or_default(),
                row.environment.clone(),
                row.release.clone(),
                row.outcome.clone(),
                row.requester.clone(),
                row.recorded_at.clone(),
            ],
        );
    }
    out
}

fn push_record(out: &mut String, fields: impl IntoIterator<Item = String>) {
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&csv_field(&field));
    }
    out.push_str("\r\n");
}

fn csv_field(value: &str) -> String {
    let neutralised;
    let value = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        neutralised = format!("'{value}");
        neutralised.as_str()
    } else {
        value
    };
    let needs_quotes =
        value.contains([',', '"', '\r', '\n']) || value.starts_with(' ') || value.ends_with(' ');
    if needs_quotes {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_fields_stay_bare() {
        assert_eq!(csv_field("prod"), "prod");
        assert_eq!(csv_field(""), "");
    }

    #[test]
    fn separators_quotes_and_line_breaks_are_quoted() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field("cr\rhere"), "\"cr\rhere\"");
        assert_eq!(csv_field(" padded "), "\" padded \"");
    }

    #[test]
    fn formula_starts_are_neutralised() {
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("+1"), "'+1");
        assert_eq!(csv_field("-rc"), "'-rc");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("\tx"), "'\tx");
    }
}
