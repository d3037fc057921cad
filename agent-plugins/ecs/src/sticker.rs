//! The version sticker of an ecs target, kept as tags on the ECS service.
//!
//! An ECS service has no filesystem, and the agent host is not the target (another agent may
//! serve it later), so the sticker travels with the service itself. Tag values are limited to
//! 256 characters from a small alphabet (`letters digits space + - = . _ : / @`) that JSON's
//! braces and quotes are not part of, so the compact JSON is base64-encoded (whose alphabet fits)
//! and split:
//! - `stella.version` = `base64:<N>` — the header, naming the encoding and number of parts;
//! - `stella.version.1` … `stella.version.<N>` — the parts, in order.
//!
//! All of them are written by one `TagResource` call, so a reader sees the header with its own
//! parts; parts left over from a longer, older sticker are removed afterwards and ignored until
//! then, since the header says how many belong to it.

use aws_sdk_ecs::types::Tag;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use stella_plugin_sdk::{PluginError, STICKER_SCHEMA, VersionSticker};

pub const TAG_HEADER: &str = "stella.version";
const PART_PREFIX: &str = "stella.version.";
const ENCODING: &str = "base64";
const PART_LEN: usize = 256;
/// ECS allows 50 tags per resource; leave room for the operator's own.
pub const MAX_PARTS: usize = 40;

fn part_key(n: usize) -> String {
    format!("{PART_PREFIX}{n}")
}

/// The tags that carry `sticker`, header first.
pub(crate) fn encode(sticker: &VersionSticker) -> Result<Vec<Tag>, PluginError> {
    let json = serde_json::to_vec(sticker)
        .map_err(|e| PluginError::Sticker(format!("cannot encode sticker: {e}")))?;
    let text = STANDARD.encode(json);
    // base64 is ASCII, so byte chunks are character chunks.
    let parts: Vec<&str> = text
        .as_bytes()
        .chunks(PART_LEN)
        .map(|chunk| std::str::from_utf8(chunk).unwrap_or_default())
        .collect();
    if parts.len() > MAX_PARTS {
        return Err(PluginError::Sticker(format!(
            "the sticker needs {} tags of {PART_LEN} characters; at most {MAX_PARTS} are used \
             (too many components for a service-tag sticker)",
            parts.len()
        )));
    }
    let mut tags = vec![
        Tag::builder()
            .key(TAG_HEADER)
            .value(format!("{ENCODING}:{}", parts.len()))
            .build(),
    ];
    for (i, part) in parts.iter().enumerate() {
        tags.push(Tag::builder().key(part_key(i + 1)).value(*part).build());
    }
    Ok(tags)
}

/// Sticker tags present on the service that a sticker of `written` parts no longer uses.
pub(crate) fn stale_keys(existing: &[Tag], written: usize) -> Vec<String> {
    existing
        .iter()
        .filter_map(|t| t.key())
        .filter(|k| {
            k.strip_prefix(PART_PREFIX)
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n == 0 || n > written)
        })
        .map(str::to_string)
        .collect()
}

/// Any tag the sticker occupies (header or part), so that limits can be counted without them.
pub(crate) fn is_sticker_key(key: &str) -> bool {
    key == TAG_HEADER || key.starts_with(PART_PREFIX)
}

/// The sticker carried by a service's tags; `None` when it has none.
pub(crate) fn decode(tags: &[Tag]) -> Result<Option<VersionSticker>, PluginError> {
    let find = |key: &str| {
        tags.iter()
            .find(|t| t.key() == Some(key))
            .map(|t| t.value())
    };
    let Some(header) = find(TAG_HEADER) else {
        return Ok(None);
    };
    let header = header.unwrap_or_default();
    let count: usize = header
        .strip_prefix(ENCODING)
        .and_then(|rest| rest.strip_prefix(':'))
        .and_then(|n| n.parse().ok())
        .filter(|n| (1..=MAX_PARTS).contains(n))
        .ok_or_else(|| {
            PluginError::Sticker(format!(
                "service tag {TAG_HEADER} is {header:?}, expected \"{ENCODING}:<1..{MAX_PARTS}>\""
            ))
        })?;
    let mut text = String::new();
    for n in 1..=count {
        let key = part_key(n);
        let part = find(&key).flatten().ok_or_else(|| {
            PluginError::Sticker(format!(
                "service tag {key} is missing ({TAG_HEADER} announces {count} parts)"
            ))
        })?;
        text.push_str(part);
    }
    let json = STANDARD
        .decode(text.as_bytes())
        .map_err(|e| PluginError::Sticker(format!("sticker tags are not valid base64: {e}")))?;
    let sticker: VersionSticker = serde_json::from_slice(&json)
        .map_err(|e| PluginError::Sticker(format!("sticker tags hold no valid sticker: {e}")))?;
    if sticker.schema != STICKER_SCHEMA {
        return Err(PluginError::Sticker(format!(
            "sticker has schema {:?}, expected {STICKER_SCHEMA:?}",
            sticker.schema
        )));
    }
    Ok(Some(sticker))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stella_plugin_sdk::ComponentSpec;

    fn sticker(components: usize) -> VersionSticker {
        VersionSticker {
            schema: STICKER_SCHEMA.to_string(),
            target: "ecs-prod".to_string(),
            release_id: "rel-1".to_string(),
            release_name: "Release \"1\" {with} braces, commas".to_string(),
            deployment_id: "dep-1".to_string(),
            job_id: "job-1".to_string(),
            components: (0..components)
                .map(|i| ComponentSpec {
                    name: format!("component-{i}"),
                    image: format!("registry.example:5000/demo/c{i}:1"),
                    digest: format!("sha256:{}", "a".repeat(64)),
                })
                .collect(),
            written_at: "2025-01-01T00:00:00Z".to_string(),
        }
    }

    fn allowed(s: &str) -> bool {
        s.chars().all(|c| {
            c.is_alphanumeric()
                || c == ' '
                || matches!(c, '+' | '-' | '=' | '.' | '_' | ':' | '/' | '@')
        })
    }

    #[test]
    fn round_trip_in_tag_sized_parts() {
        let s = sticker(3);
        let tags = encode(&s).unwrap();
        assert!(tags.len() > 2, "a 3-component sticker spans several tags");
        assert_eq!(tags[0].key(), Some(TAG_HEADER));
        assert_eq!(
            tags[0].value(),
            Some(format!("base64:{}", tags.len() - 1).as_str())
        );
        for t in &tags {
            let v = t.value().unwrap();
            assert!(v.len() <= 256, "{v}");
            assert!(allowed(v), "{v}");
            assert!(allowed(t.key().unwrap()));
        }
        // Order of tags as the API returns them does not matter.
        let mut shuffled = tags.clone();
        shuffled.reverse();
        shuffled.push(Tag::builder().key("team").value("web").build());
        assert_eq!(decode(&shuffled).unwrap(), Some(s));
    }

    #[test]
    fn absent_stale_and_broken_stickers() {
        assert_eq!(decode(&[]).unwrap(), None);
        let big = encode(&sticker(5)).unwrap();
        let small = encode(&sticker(1)).unwrap();
        let mut existing = big.clone();
        // A shorter sticker over a longer one: its header wins, the extra parts are stale.
        for t in &small {
            existing.retain(|e| e.key() != t.key());
            existing.push(t.clone());
        }
        assert_eq!(decode(&existing).unwrap(), Some(sticker(1)));
        let stale = stale_keys(&existing, small.len() - 1);
        assert_eq!(stale.len(), big.len() - small.len());
        assert!(stale.iter().all(|k| is_sticker_key(k) && k != TAG_HEADER));

        let mut missing = small.clone();
        missing.pop();
        assert!(matches!(decode(&missing), Err(PluginError::Sticker(_))));
        let bad_header = vec![Tag::builder().key(TAG_HEADER).value("{json}").build()];
        assert!(matches!(decode(&bad_header), Err(PluginError::Sticker(_))));
        let mut wrong = sticker(1);
        wrong.schema = "other/v9".to_string();
        assert!(matches!(
            decode(&encode(&wrong).unwrap()),
            Err(PluginError::Sticker(_))
        ));
        assert!(matches!(
            encode(&sticker(200)),
            Err(PluginError::Sticker(_))
        ));
    }
}
