//! Canonical JSON for hashing: one byte sequence per value, whatever the field order or
//! formatting it arrived in. Decision records hash their inputs with it and evidence packets
//! chain on it, so two parties that hold equal documents compute equal digests.
//!
//! The form: objects with keys sorted by their UTF-8 bytes (recursively), no insignificant
//! whitespace, strings escaped as `serde_json` does, numbers as `serde_json` prints them. Inputs
//! are expected to carry integers, strings, booleans, arrays and objects; floats are printed
//! in their shortest round-trip form, which is stable for a given value.

use serde::Serialize;
use sha2::{Digest, Sha256};

/// The canonical JSON bytes of `value`.
pub fn canonical_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let value = serde_json::to_value(value)?;
    let mut out = Vec::new();
    write_canonical(&value, &mut out)?;
    Ok(out)
}

// Keys are sorted here rather than by relying on `serde_json::Map` being a BTreeMap: any crate
// in the build can turn on serde_json's `preserve_order` feature, and features unify.
fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_canonical(item, out)?;
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar)?,
    }
    Ok(())
}

/// `"sha256:<hex>"` of the canonical JSON of `value`.
pub fn canonical_digest<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_json::Error> {
    Ok(sha256_digest(&canonical_json(value)?))
}

/// `"sha256:<hex>"` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_order_and_whitespace_do_not_change_the_bytes() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b": [1, {"y": 2, "x": 1}], "a": "é"}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":"é","b":[1,{"x":1,"y":2}]}"#).unwrap();
        assert_eq!(canonical_json(&a).unwrap(), canonical_json(&b).unwrap());
        assert_eq!(
            String::from_utf8(canonical_json(&a).unwrap()).unwrap(),
            r#"{"a":"é","b":[1,{"x":1,"y":2}]}"#
        );
    }

    #[test]
    fn different_values_have_different_digests() {
        let a = serde_json::json!({"a": 1});
        let b = serde_json::json!({"a": 2});
        assert_ne!(canonical_digest(&a).unwrap(), canonical_digest(&b).unwrap());
        assert!(canonical_digest(&a).unwrap().starts_with("sha256:"));
    }
}
