//! Names executors derive from user input (target and component names): container names and
//! path segments. Every executor that names containers `stella-<target>-<component>` uses these,
//! so one target's containers are named alike whichever executor made them.

/// Keeps `[a-zA-Z0-9_.-]`, replaces everything else with `_`: the characters container names
/// (and compose service names) accept.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `stella-<target>-<component>`, both sanitized.
pub fn container_name(target: &str, component: &str) -> String {
    format!("stella-{}-{}", sanitize(target), sanitize(component))
}

/// A single path segment for `target`. A leading dot is replaced so that names like `..` can
/// never climb out of the state directory, and the result is never empty.
pub fn path_segment(target: &str) -> String {
    let mut s = sanitize(target);
    if s.starts_with('.') {
        s.replace_range(0..1, "_");
    }
    if s.is_empty() {
        s.push('_');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitized() {
        assert_eq!(container_name("prod/eu 1", "web"), "stella-prod_eu_1-web");
        assert_eq!(sanitize("a.b-c_D9"), "a.b-c_D9");
        assert_eq!(sanitize("a/b c"), "a_b_c");
        assert_eq!(sanitize("web"), "web");
    }

    #[test]
    fn path_segments_stay_inside() {
        assert_eq!(path_segment(".."), "_.");
        assert_eq!(path_segment(""), "_");
        assert_eq!(path_segment("a/../b"), "a_.._b");
        assert_eq!(path_segment("prod-1"), "prod-1");
    }
}
