//! The PowerShell Stella sends: quoting, `-EncodedCommand` encoding, the scripts for the
//! sticker and the release variables, and cleanup of the CLIXML that powershell.exe writes to
//! stderr when it runs non-interactively.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use stella_plugin_sdk::{DeploySpec, PluginError};

use crate::ntlm::utf16le;
use crate::xml;

/// Printed by the read script when there is no sticker (never valid base64 of JSON).
pub const NO_STICKER: &str = "STELLA:NO-STICKER";

/// Windows' CreateProcess limit is 32767 characters for the whole command line; stay below
/// with room for `powershell -NoProfile -NonInteractive -EncodedCommand `.
pub const MAX_ENCODED_COMMAND: usize = 32_000;

/// Every script starts like this: stop at the first error (so a failing cmdlet is a non-zero
/// exit), no progress records (they would arrive as CLIXML on stderr), UTF-8 output without a
/// byte-order mark.
pub const PREAMBLE: &str = "$ErrorActionPreference = 'Stop'\n\
$ProgressPreference = 'SilentlyContinue'\n\
[Console]::OutputEncoding = New-Object System.Text.UTF8Encoding $false\n";

/// PowerShell treats these as single quotes too, so each must be doubled inside a literal.
fn is_single_quote(c: char) -> bool {
    matches!(c, '\'' | '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}')
}

/// A single-quoted PowerShell literal: no expansion of `$`, backticks or anything else.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if is_single_quote(c) {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// `powershell` arguments for `script`, refusing a script too long for one command line.
pub fn command_args(script: &str, what: &str) -> Result<Vec<String>, String> {
    let encoded = B64.encode(utf16le(script));
    if encoded.len() > MAX_ENCODED_COMMAND {
        return Err(format!(
            "{what} is too long for a Windows command line once encoded \
             ({} characters, at most {MAX_ENCODED_COMMAND}); move the bulk into a script file \
             on the target and call it",
            encoded.len()
        ));
    }
    Ok(vec![
        "-NoProfile".to_string(),
        "-NonInteractive".to_string(),
        "-EncodedCommand".to_string(),
        encoded,
    ])
}

/// `STELLA_IMAGE_<NAME>`: the component name upper-cased, anything but `[A-Z0-9]` as `_`.
pub fn image_env_name(component: &str) -> String {
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

/// `demo/app:1` -> `demo/app`; `registry:5000/demo/app` stays (that colon is a port).
pub fn repository_of(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    match without_digest.rfind(':') {
        Some(i) if !without_digest[i + 1..].contains('/') => &without_digest[..i],
        _ => without_digest,
    }
}

fn env_line(out: &mut String, name: &str, value: &str) {
    out.push_str("$env:");
    out.push_str(name);
    out.push_str(" = ");
    out.push_str(&quote(value));
    out.push('\n');
}

/// The deploy script with the release set as environment variables at its top.
pub fn deploy_script(spec: &DeploySpec, user_script: &str) -> Result<String, PluginError> {
    let components = serde_json::to_string(&spec.components)
        .map_err(|e| PluginError::Backend(format!("cannot encode components: {e}")))?;
    let mut s = String::from(PREAMBLE);
    env_line(&mut s, "STELLA_TARGET", &spec.target.name);
    env_line(&mut s, "STELLA_JOB_ID", &spec.job_id);
    env_line(&mut s, "STELLA_RELEASE_ID", &spec.release_id);
    env_line(&mut s, "STELLA_RELEASE_NAME", &spec.release_name);
    env_line(&mut s, "STELLA_DEPLOYMENT_ID", &spec.deployment_id);
    env_line(&mut s, "STELLA_COMPONENTS", &components);
    for c in &spec.components {
        env_line(
            &mut s,
            &image_env_name(&c.name),
            &format!("{}@{}", repository_of(&c.image), c.digest),
        );
    }
    if s.contains('\0') || user_script.contains('\0') {
        return Err(PluginError::InvalidConfig(
            "the release and deploy_script must not contain NUL characters".to_string(),
        ));
    }
    s.push_str(user_script);
    s.push('\n');
    Ok(s)
}

pub fn inventory_script(target: &str, user_script: &str) -> String {
    let mut s = String::from(PREAMBLE);
    env_line(&mut s, "STELLA_TARGET", target);
    s.push_str(user_script);
    s.push('\n');
    s
}

/// The parent directory of a validated `X:\…\file` path.
fn parent_of(path: &str) -> &str {
    match path.rsplit_once('\\') {
        // `C:\file`: the parent is the drive root, which needs its backslash.
        Some((p, _)) if p.len() == 2 => &path[..3],
        Some((p, _)) => p,
        None => path,
    }
}

/// Writes `content` to a temporary name next to `path`, then moves it over `path`, so a reader
/// never sees half a sticker.
pub fn write_file_script(path: &str, content: &[u8]) -> String {
    format!(
        "{PREAMBLE}$path = {path_q}\n\
         $tmp = {tmp_q}\n\
         [IO.Directory]::CreateDirectory({dir_q}) | Out-Null\n\
         [IO.File]::WriteAllBytes($tmp, [Convert]::FromBase64String({data_q}))\n\
         Move-Item -LiteralPath $tmp -Destination $path -Force\n",
        path_q = quote(path),
        tmp_q = quote(&format!("{path}.stella-tmp")),
        dir_q = quote(parent_of(path)),
        data_q = quote(&B64.encode(content)),
    )
}

/// Prints the file as base64, or `NO_STICKER` when it does not exist.
pub fn read_file_script(path: &str) -> String {
    format!(
        "{PREAMBLE}$path = {path_q}\n\
         if ([IO.File]::Exists($path)) {{ [Convert]::ToBase64String([IO.File]::ReadAllBytes($path)) }} \
         else {{ Write-Output {marker} }}\n",
        path_q = quote(path),
        marker = quote(NO_STICKER),
    )
}

/// Decodes CLIXML's `_xHHHH_` escapes.
fn decode_clixml_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("_x") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let decoded = after
            .get(0..5)
            .filter(|h| h.ends_with('_'))
            .and_then(|h| u32::from_str_radix(&h[..4], 16).ok())
            .and_then(char::from_u32);
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &after[5..];
            }
            None => {
                out.push_str("_x");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Turns one stderr line into what a person should read: powershell.exe writes errors as
/// `#< CLIXML` followed by one `<Objs>` document per line when its stderr is not a console.
pub fn readable_stderr(line: &str) -> Vec<String> {
    let trimmed = line.trim();
    if trimmed == "#< CLIXML" {
        return Vec::new();
    }
    if !trimmed.starts_with("<Objs") {
        return vec![line.to_string()];
    }
    let Ok(doc) = xml::parse(trimmed) else {
        return vec![line.to_string()];
    };
    let mut strings = Vec::new();
    doc.find_all("S", &mut strings);
    let text: String = strings
        .iter()
        .filter(|s| s.attr("S") == Some("Error"))
        .map(|s| decode_clixml_escapes(&s.text))
        .collect();
    text.lines()
        .map(|l| l.trim_end().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use stella_plugin_sdk::{ComponentSpec, TargetRef};

    #[test]
    fn quotes_every_single_quote_kind() {
        assert_eq!(quote("plain"), "'plain'");
        assert_eq!(quote("it's $x `n"), "'it''s $x `n'");
        assert_eq!(quote("a\u{2019}b"), "'a\u{2019}\u{2019}b'");
    }

    #[test]
    fn encoded_command_is_utf16le_base64() {
        let args = command_args("Write-Output 'é'", "script").unwrap();
        assert_eq!(
            &args[..3],
            ["-NoProfile", "-NonInteractive", "-EncodedCommand"]
        );
        let raw = B64.decode(&args[3]).unwrap();
        let units: Vec<u16> = raw
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(String::from_utf16(&units).unwrap(), "Write-Output 'é'");
        let err = command_args(&"x".repeat(20_000), "deploy_script").unwrap_err();
        assert!(err.contains("deploy_script is too long"), "{err}");
    }

    #[test]
    fn deploy_script_sets_the_release_first() {
        let spec = DeploySpec {
            job_id: "job-1".into(),
            deployment_id: "dep-1".into(),
            release_id: "rel-1".into(),
            release_name: "Bob's release".into(),
            target: TargetRef {
                name: "win-1".into(),
                kind: "winrm".into(),
                config: serde_json::Value::Null,
            },
            components: vec![ComponentSpec {
                name: "web-api".into(),
                image: "registry:5000/demo/web:1".into(),
                digest: format!("sha256:{}", "a".repeat(64)),
            }],
            strategy: Default::default(),
        };
        let s = deploy_script(&spec, "Write-Output $env:STELLA_RELEASE_ID").unwrap();
        assert!(s.starts_with(PREAMBLE));
        assert!(
            s.contains("$env:STELLA_RELEASE_NAME = 'Bob''s release'\n"),
            "{s}"
        );
        assert!(s.contains(&format!(
            "$env:STELLA_IMAGE_WEB_API = 'registry:5000/demo/web@sha256:{}'\n",
            "a".repeat(64)
        )));
        assert!(s.ends_with("Write-Output $env:STELLA_RELEASE_ID\n"));
    }

    #[test]
    fn sticker_scripts_name_the_paths() {
        let w = write_file_script(r"C:\ProgramData\Stella\stella.version.json", b"{}");
        assert!(w.contains(r"[IO.Directory]::CreateDirectory('C:\ProgramData\Stella')"));
        assert!(w.contains(r"$tmp = 'C:\ProgramData\Stella\stella.version.json.stella-tmp'"));
        assert!(w.contains("FromBase64String('e30=')"));
        assert!(write_file_script(r"C:\s.json", b"").contains("CreateDirectory('C:\\')"));
        let r = read_file_script(r"C:\x.json");
        assert!(r.contains("'STELLA:NO-STICKER'"));
    }

    #[test]
    fn clixml_errors_become_lines() {
        assert!(readable_stderr("#< CLIXML").is_empty());
        let line = r#"<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04"><S S="Error">boom: it failed_x000D__x000A_</S><S S="Error">second_x000A_</S><S S="Verbose">x</S></Objs>"#;
        assert_eq!(readable_stderr(line), vec!["boom: it failed", "second"]);
        assert_eq!(readable_stderr("plain text"), vec!["plain text"]);
    }
}
