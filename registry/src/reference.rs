//! The Distribution spec's grammar for repository names and tags, and the shape of digests.
//! Checked before a name goes into a URL path, so input can never reach another endpoint.

use crate::RegistryError;

/// The longest repository name the spec allows.
const MAX_REPOSITORY_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`
pub fn validate_repository(name: &str) -> Result<(), RegistryError> {
    let bad = |why: &str| {
        RegistryError::InvalidInput(format!("repository name {name:?} is invalid: {why}"))
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_REPOSITORY_LEN {
        return Err(bad("longer than 255 characters"));
    }
    for component in name.split('/') {
        if !is_path_component(component) {
            return Err(bad(
                "each /-separated part must be lowercase letters and digits, joined by \
                 '.', '_', '__' or dashes (a registry host does not belong in it)",
            ));
        }
    }
    Ok(())
}

fn is_path_component(part: &str) -> bool {
    let bytes = part.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < bytes.len() {
        if expect_alnum {
            if !alnum(bytes[i]) {
                return false;
            }
            while i < bytes.len() && alnum(bytes[i]) {
                i += 1;
            }
            expect_alnum = false;
        } else {
            let sep_len = match bytes[i] {
                b'.' => 1,
                b'_' if bytes.get(i + 1) == Some(&b'_') => 2,
                b'_' => 1,
                b'-' => bytes[i..].iter().take_while(|b| **b == b'-').count(),
                _ => return false,
            };
            i += sep_len;
            expect_alnum = true;
        }
    }
    // Empty, or ending on a separator.
    !bytes.is_empty() && !expect_alnum
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`
pub fn validate_tag(tag: &str) -> Result<(), RegistryError> {
    if is_valid_tag(tag) {
        Ok(())
    } else {
        Err(RegistryError::InvalidInput(format!(
            "tag {tag:?} is invalid: up to 128 letters, digits, '_', '.' or '-', not starting \
             with '.' or '-'"
        )))
    }
}

pub(crate) fn is_valid_tag(tag: &str) -> bool {
    let mut bytes = tag.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    tag.len() <= MAX_TAG_LEN
        && (first.is_ascii_alphanumeric() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `sha256:<64 lowercase hex>`: the only digest Stella accepts.
pub fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_the_spec() {
        for ok in [
            "app", "demo/app", "a/b/c", "my-app", "my--app", "my_app", "my__app", "my.app", "0x/1",
        ] {
            assert!(validate_repository(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Demo/app",
            "demo//app",
            "/demo",
            "demo/",
            "demo/app:1",
            "127.0.0.1:5000/demo",
            "a___b",
            "a_-b",
            "-a",
            "a-",
            "a.",
            "demo/app?x",
            "../x",
        ] {
            assert!(validate_repository(bad).is_err(), "{bad}");
        }
        assert!(validate_repository(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags_follow_the_spec() {
        for ok in ["1.2.3", "v1", "latest", "_x", "A-b.c_d"] {
            assert!(validate_tag(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a b", "ä"] {
            assert!(validate_tag(bad).is_err(), "{bad}");
        }
        assert!(validate_tag(&"a".repeat(128)).is_ok());
        assert!(validate_tag(&"a".repeat(129)).is_err());
    }

    #[test]
    fn only_sha256_digests() {
        assert!(is_sha256_digest(&format!("sha256:{}", "0a".repeat(32))));
        assert!(!is_sha256_digest(&format!("sha256:{}", "0A".repeat(32))));
        assert!(!is_sha256_digest(&format!("sha512:{}", "0a".repeat(64))));
        assert!(!is_sha256_digest("sha256:abc"));
    }
}
