//! Bearer tokens: one-time join tokens for enrollment and API tokens for operators. Only their
//! SHA-256 is stored, so a leaked database does not leak usable tokens.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// `"stj_"` + 256 random bits, URL-safe base64 without padding.
pub fn generate_join_token() -> String {
    random_token("stj_")
}

/// `"sta_"` + 256 random bits, URL-safe base64 without padding.
pub fn generate_api_token() -> String {
    random_token("sta_")
}

/// Lowercase hex SHA-256 of the token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `token` hashes to `stored_hash` (hex, any case). The comparison runs in constant time
/// over the digest bytes so response timing reveals nothing about how close a guess was.
pub fn token_matches(token: &str, stored_hash: &str) -> bool {
    let Ok(stored) = hex::decode(stored_hash) else {
        return false;
    };
    let computed = Sha256::digest(token.as_bytes());
    // ct_eq on slices of different lengths is false without looking at the contents.
    bool::from(computed[..].ct_eq(stored.as_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_prefix_and_256_bits() {
        let j = generate_join_token();
        let a = generate_api_token();
        assert!(j.starts_with("stj_") && a.starts_with("sta_"));
        let body = URL_SAFE_NO_PAD.decode(&j[4..]).unwrap();
        assert_eq!(body.len(), 32);
        assert_eq!(j.len(), 4 + 43);
        assert_ne!(generate_join_token(), j);
    }

    #[test]
    fn hash_is_lowercase_hex_sha256() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn token_matches_true_and_false() {
        let t = generate_join_token();
        let h = hash_token(&t);
        assert!(token_matches(&t, &h));
        assert!(token_matches(&t, &h.to_uppercase()));
        assert!(!token_matches(&generate_join_token(), &h));
        assert!(!token_matches(&t, &h[..62]));
        assert!(!token_matches(&t, "not hex"));
        assert!(!token_matches(&t, ""));
        assert!(!token_matches("", &h));
    }
}
