//! Names Stella derives from user input for script mode, and shell quoting for remote commands.
//! Container names and image-reference syntax are the SDK's ([`stella_plugin_sdk::naming`],
//! [`stella_plugin_sdk::digest`]), shared with the docker executor.

/// `STELLA_IMAGE_<NAME>`: the component name upper-cased, anything but `[A-Z0-9]` as `_`, so
/// that every component name gives a valid shell variable name.
pub(crate) fn image_env_name(component: &str) -> String {
    let mut name = String::from("STELLA_IMAGE_");
    name.extend(component.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    name
}

/// Quotes `s` as one word for a POSIX shell. The caller guarantees there is no NUL byte in it
/// (a command line cannot carry one); everything else, newlines included, survives verbatim.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            // Close the quote, emit an escaped quote, reopen.
            out.push_str(r"'\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitized() {
        assert_eq!(image_env_name("web-api.v2"), "STELLA_IMAGE_WEB_API_V2");
        assert_eq!(image_env_name("Worker"), "STELLA_IMAGE_WORKER");
    }

    #[test]
    fn quoting_survives_a_shell() {
        for s in [
            "plain",
            "it's",
            "a b\nc",
            "$(touch /x) `y` \"z\" \\",
            "",
            "'''",
        ] {
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("printf %s {}", quote(s)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), s);
        }
    }
}
