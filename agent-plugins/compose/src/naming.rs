//! Compose project and service names Stella derives from target and component names (the
//! sanitizing itself is the SDK's, shared with the other executors).

/// Keeps `[a-zA-Z0-9_.-]`, replaces everything else with `_`: the characters compose accepts in
/// a service name.
pub(crate) fn service_name(component: &str) -> String {
    stella_plugin_sdk::naming::sanitize(component)
}

/// Whether `name` is a project name every compose flavour accepts as is: compose v2 refuses
/// anything else and v1 would silently rewrite it (so its labels would not match the name).
pub(crate) fn is_valid_project(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && name.len() <= 63
}

/// `stella-<target>`, made a valid project name. When the target name had to be rewritten
/// (upper case, `/`, spaces...) a short hash of the original is appended, so that targets
/// `a.b` and `a-b` can never share one project: a shared project would make each deployment
/// remove the other's services as orphans.
pub(crate) fn default_project(target: &str) -> String {
    let mut cleaned: String = target
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    let rewritten = cleaned != target;
    // Leave room for the prefix and the hash within the 63 characters.
    cleaned.truncate(40);
    if rewritten {
        format!("stella-{cleaned}-{:08x}", fnv1a32(target.as_bytes()))
    } else {
        format!("stella-{cleaned}")
    }
}

/// FNV-1a: stable across releases and platforms, which `std`'s hashers do not promise.
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        assert_eq!(service_name("web"), "web");
        assert_eq!(service_name("a/b c"), "a_b_c");
        assert_eq!(service_name("a.b-c_D9"), "a.b-c_D9");
    }

    #[test]
    fn project_names() {
        assert_eq!(default_project("prod-1"), "stella-prod-1");
        let rewritten = default_project("Prod/EU 1");
        assert!(rewritten.starts_with("stella-prod-eu-1-"), "{rewritten}");
        assert!(is_valid_project(&rewritten));
        // Names that clean up to the same string still get distinct projects.
        assert_ne!(default_project("a.b"), default_project("a-b"));
        assert_ne!(default_project("A.b"), default_project("a.B"));
        assert!(is_valid_project(&default_project(&"X".repeat(300))));
        assert!(is_valid_project("stella-x_1"));
        assert!(!is_valid_project("Stella"));
        assert!(!is_valid_project("-x"));
        assert!(!is_valid_project(""));
        assert!(!is_valid_project("a.b"));
        assert!(!is_valid_project(&"a".repeat(64)));
    }
}
