//! A stand-in for `powershell.exe` on this Linux host: the test server decodes
//! `-EncodedCommand` (base64 of UTF-16LE) and runs the script through this tiny interpreter.
//!
//! It understands exactly these statements, one per line (anything else fails the script with
//! exit code 1 and a message on stderr, so that a change in what the client sends shows up as
//! a test failure rather than being silently accepted):
//!
//! - `$env:NAME = '<literal>'` and `$name = '<literal>'` (single-quoted, quotes doubled, the
//!   typographic single quotes included, as PowerShell reads them);
//! - `[Console]::OutputEncoding = New-Object System.Text.UTF8Encoding $false` (a no-op);
//! - `[IO.Directory]::CreateDirectory(<arg>) | Out-Null`;
//! - `[IO.File]::WriteAllBytes(<arg>, [Convert]::FromBase64String(<arg>))`;
//! - `Move-Item -LiteralPath <arg> -Destination <arg> -Force`;
//! - `if ([IO.File]::Exists(<arg>)) { [Convert]::ToBase64String([IO.File]::ReadAllBytes(<arg>)) } else { Write-Output <arg> }`;
//! - `Write-Output <arg>` and `exit <n>`;
//! - the marker line `# stella-test: sh`: everything after it is run by `/bin/sh` with the
//!   environment variables set so far (this is how test deploy and inventory scripts run);
//! - empty lines and other `#` comments.
//!
//! `<arg>` is a literal or a `$variable`. Windows paths `X:\a\b` map to `<root>/X/a/b`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

pub const SH_MARKER: &str = "# stella-test: sh";

pub enum Plan {
    Done {
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        exit: i64,
    },
    Sh {
        script: String,
        env: Vec<(String, String)>,
    },
}

fn is_quote(c: char) -> bool {
    matches!(c, '\'' | '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}')
}

/// A single-quoted literal at the start of `s`, and what follows it.
fn literal(s: &str) -> Option<(String, &str)> {
    let mut chars = s.char_indices();
    let (_, first) = chars.next()?;
    if !is_quote(first) {
        return None;
    }
    let mut out = String::new();
    let mut iter = chars.peekable();
    while let Some((i, c)) = iter.next() {
        if is_quote(c) {
            match iter.peek() {
                Some((_, n)) if is_quote(*n) => {
                    out.push(c);
                    iter.next();
                }
                _ => return Some((out, &s[i + c.len_utf8()..])),
            }
        } else {
            out.push(c);
        }
    }
    None
}

fn arg<'a>(s: &'a str, vars: &HashMap<String, String>) -> Option<(String, &'a str)> {
    if let Some(rest) = s.strip_prefix('$') {
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let value = vars.get(&rest[..end].to_ascii_lowercase())?.clone();
        return Some((value, &rest[end..]));
    }
    literal(s)
}

fn windows_path(root: &Path, p: &str) -> Result<PathBuf, String> {
    let b = p.as_bytes();
    if b.len() < 3 || !b[0].is_ascii_alphabetic() || &b[1..3] != b":\\" {
        return Err(format!("not an absolute Windows path: {p}"));
    }
    let mut out = root.join(&p[..1]);
    for seg in p[3..].split('\\').filter(|s| !s.is_empty()) {
        if seg == ".." || seg == "." {
            return Err(format!("path with dot segments: {p}"));
        }
        out.push(seg);
    }
    Ok(out)
}

struct Interp<'r> {
    root: &'r Path,
    vars: HashMap<String, String>,
    env: Vec<(String, String)>,
    stdout: Vec<u8>,
}

enum Step {
    Next,
    Exit(i64),
}

impl Interp<'_> {
    fn statement(&mut self, t: &str) -> Result<Step, String> {
        let unsupported = || format!("unsupported statement: {t}");
        if let Some(rest) = t.strip_prefix("$env:") {
            let (name, value) = rest.split_once(" = ").ok_or_else(unsupported)?;
            let (value, tail) = literal(value).ok_or_else(unsupported)?;
            if !tail.trim().is_empty() {
                return Err(unsupported());
            }
            self.env.retain(|(n, _)| n != name);
            self.env.push((name.to_string(), value));
            return Ok(Step::Next);
        }
        if let Some(rest) = t.strip_prefix('$') {
            let (name, value) = rest.split_once(" = ").ok_or_else(unsupported)?;
            let (value, tail) = literal(value).ok_or_else(unsupported)?;
            if !tail.trim().is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(unsupported());
            }
            self.vars.insert(name.to_ascii_lowercase(), value);
            return Ok(Step::Next);
        }
        if t == "[Console]::OutputEncoding = New-Object System.Text.UTF8Encoding $false" {
            return Ok(Step::Next);
        }
        if let Some(r) = t.strip_prefix("[IO.Directory]::CreateDirectory(") {
            let (dir, tail) = arg(r, &self.vars).ok_or_else(unsupported)?;
            if tail != ") | Out-Null" {
                return Err(unsupported());
            }
            let dir = windows_path(self.root, &dir)?;
            std::fs::create_dir_all(&dir).map_err(|e| format!("CreateDirectory: {e}"))?;
            return Ok(Step::Next);
        }
        if let Some(r) = t.strip_prefix("[IO.File]::WriteAllBytes(") {
            let (path, r) = arg(r, &self.vars).ok_or_else(unsupported)?;
            let r = r
                .strip_prefix(", [Convert]::FromBase64String(")
                .ok_or_else(unsupported)?;
            let (data, tail) = arg(r, &self.vars).ok_or_else(unsupported)?;
            if tail != "))" {
                return Err(unsupported());
            }
            let bytes = B64
                .decode(data.as_bytes())
                .map_err(|e| format!("FromBase64String: {e}"))?;
            let path = windows_path(self.root, &path)?;
            std::fs::write(&path, bytes).map_err(|e| format!("WriteAllBytes: {e}"))?;
            return Ok(Step::Next);
        }
        if let Some(r) = t.strip_prefix("Move-Item -LiteralPath ") {
            let (from, r) = arg(r, &self.vars).ok_or_else(unsupported)?;
            let r = r.strip_prefix(" -Destination ").ok_or_else(unsupported)?;
            let (to, tail) = arg(r, &self.vars).ok_or_else(unsupported)?;
            if tail != " -Force" {
                return Err(unsupported());
            }
            let (from, to) = (
                windows_path(self.root, &from)?,
                windows_path(self.root, &to)?,
            );
            std::fs::rename(&from, &to).map_err(|e| format!("Move-Item: {e}"))?;
            return Ok(Step::Next);
        }
        if let Some(r) = t.strip_prefix("if ([IO.File]::Exists(") {
            let (p1, r) = arg(r, &self.vars).ok_or_else(unsupported)?;
            let r = r
                .strip_prefix(")) { [Convert]::ToBase64String([IO.File]::ReadAllBytes(")
                .ok_or_else(unsupported)?;
            let (p2, r) = arg(r, &self.vars).ok_or_else(unsupported)?;
            let r = r
                .strip_prefix(")) } else { Write-Output ")
                .ok_or_else(unsupported)?;
            let (otherwise, tail) = arg(r, &self.vars).ok_or_else(unsupported)?;
            if tail != " }" || p1 != p2 {
                return Err(unsupported());
            }
            let path = windows_path(self.root, &p1)?;
            let line = if path.is_file() {
                let bytes = std::fs::read(&path).map_err(|e| format!("ReadAllBytes: {e}"))?;
                B64.encode(bytes)
            } else {
                otherwise
            };
            self.stdout.extend_from_slice(line.as_bytes());
            self.stdout.extend_from_slice(b"\r\n");
            return Ok(Step::Next);
        }
        if let Some(r) = t.strip_prefix("Write-Output ") {
            let (value, tail) = arg(r, &self.vars).ok_or_else(unsupported)?;
            if !tail.trim().is_empty() {
                return Err(unsupported());
            }
            self.stdout.extend_from_slice(value.as_bytes());
            self.stdout.extend_from_slice(b"\r\n");
            return Ok(Step::Next);
        }
        if let Some(n) = t.strip_prefix("exit ") {
            return n.trim().parse().map(Step::Exit).map_err(|_| unsupported());
        }
        Err(unsupported())
    }
}

pub fn run(script: &str, root: &Path) -> Plan {
    let mut interp = Interp {
        root,
        vars: HashMap::new(),
        env: Vec::new(),
        stdout: Vec::new(),
    };
    let lines: Vec<&str> = script.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        if t == SH_MARKER {
            return Plan::Sh {
                script: lines[i + 1..].join("\n"),
                env: interp.env,
            };
        }
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        match interp.statement(t) {
            Ok(Step::Next) => {}
            Ok(Step::Exit(code)) => {
                return Plan::Done {
                    stdout: interp.stdout,
                    stderr: Vec::new(),
                    exit: code,
                };
            }
            Err(e) => {
                return Plan::Done {
                    stdout: interp.stdout,
                    stderr: format!("ps emulator: line {}: {e}\r\n", i + 1).into_bytes(),
                    exit: 1,
                };
            }
        }
    }
    Plan::Done {
        stdout: interp.stdout,
        stderr: Vec::new(),
        exit: 0,
    }
}

/// The script of `powershell … -EncodedCommand <b64>` (any case, `-enc`/`-e` abbreviations as
/// powershell.exe accepts them), if the command line is one.
pub fn encoded_script(words: &[&str]) -> Option<Result<String, String>> {
    let exe = words.first()?.to_ascii_lowercase();
    if exe != "powershell" && exe != "powershell.exe" {
        return None;
    }
    let i = words.iter().position(|w| {
        let w = w.to_ascii_lowercase();
        w.len() >= 2 && "-encodedcommand".starts_with(&w)
    })?;
    let Some(b64) = words.get(i + 1) else {
        return Some(Err("-EncodedCommand without a value".into()));
    };
    Some(
        B64.decode(b64.as_bytes())
            .map_err(|e| format!("-EncodedCommand is not base64: {e}"))
            .and_then(|raw| {
                if raw.len() % 2 != 0 {
                    return Err("-EncodedCommand is not UTF-16LE".into());
                }
                let units: Vec<u16> = raw
                    .chunks(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16(&units).map_err(|e| format!("-EncodedCommand: {e}"))
            }),
    )
}
