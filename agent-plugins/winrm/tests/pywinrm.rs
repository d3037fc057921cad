//! Keeps the test server honest: the real pywinrm client (with requests-ntlm/pyspnego for
//! NTLM) must get the right output and exit codes from it, over Basic, NTLM with message
//! encryption (pywinrm's default on http), and NTLM over https with channel bindings.
//!
//! Needs a virtualenv with `pywinrm` and `requests-ntlm` at `$STELLA_PY_VENV` (default
//! `/opt/stella-test-venv`); fails with a message naming it when absent.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Options, PASSWORD, USER, WinrmServer};
use serde_json::Value;

const SCRIPT: &str = r#"
import json, sys
import winrm

url, user, password, transport, ca = sys.argv[1:6]
kwargs = dict(transport=transport, operation_timeout_sec=1, read_timeout_sec=10)
if url.startswith("https"):
    kwargs["ca_trust_path"] = ca
s = winrm.Session(url, auth=(user, password), **kwargs)
out = {}
def keep(name, r):
    out[name] = {"out": r.std_out.decode(), "err": r.std_err.decode(), "code": r.status_code}
keep("echo", s.run_cmd("echo", ["hello", "from", "pywinrm"]))
keep("fail", s.run_cmd("echo to-stderr >&2; exit 7"))
# Longer than the operation timeout: pywinrm must see (and retry after) the WS-Man timeout fault.
keep("slow", s.run_cmd("sleep 2.5; echo late"))
keep("ps", s.run_ps("Write-Output 'from powershell'"))
try:
    winrm.Session(url, auth=(user, "wrong"), **kwargs).run_cmd("echo", ["x"])
    out["wrong"] = "accepted"
except winrm.exceptions.InvalidCredentialsError as e:
    out["wrong"] = "rejected"
print(json.dumps(out))
"#;

fn python() -> PathBuf {
    let venv = std::env::var("STELLA_PY_VENV").unwrap_or_else(|_| "/opt/stella-test-venv".into());
    let python = PathBuf::from(&venv).join("bin/python");
    assert!(
        python.exists(),
        "{} missing: create the test venv with `python3 -m venv {venv} && {venv}/bin/pip install \
         pywinrm==0.5.0 requests-ntlm==1.3.0` (or point STELLA_PY_VENV at one)",
        python.display()
    );
    let check = Command::new(&python)
        .args(["-c", "import winrm, requests_ntlm"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "pywinrm/requests-ntlm missing in {venv}: `{venv}/bin/pip install pywinrm==0.5.0 requests-ntlm==1.3.0`: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    python
}

fn run_pywinrm(server: &WinrmServer, transport: &str) -> Value {
    let ca = server
        .ca_file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let out = Command::new(python())
        .args(["-c", SCRIPT, &server.url(), USER, PASSWORD, transport, &ca])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pywinrm failed: {}\n{}\nserver events: {:#?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.events()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check(result: &Value, server: &WinrmServer, auth: &str, encrypted: bool) {
    assert_eq!(result["echo"]["out"], "hello from pywinrm\n", "{result}");
    assert_eq!(result["echo"]["code"], 0, "{result}");
    assert_eq!(result["fail"]["code"], 7, "{result}");
    assert_eq!(result["fail"]["err"], "to-stderr\n", "{result}");
    assert_eq!(result["slow"]["out"], "late\n", "{result}");
    assert_eq!(result["slow"]["code"], 0, "{result}");
    assert_eq!(result["ps"]["out"], "from powershell\r\n", "{result}");
    assert_eq!(result["ps"]["code"], 0, "{result}");
    assert_eq!(result["wrong"], "rejected", "{result}");

    let events = server.events();
    let ok: Vec<_> = events
        .iter()
        .filter(|e| e.action != "auth-failed")
        .collect();
    assert!(
        ok.iter()
            .all(|e| e.auth == auth && e.encrypted == encrypted),
        "{events:#?}"
    );
    for action in ["Create", "Command", "Receive", "Signal", "Delete"] {
        assert!(
            ok.iter().any(|e| e.action == action),
            "no {action}: {events:#?}"
        );
    }
    assert!(events.iter().any(|e| e.action == "auth-failed"));
    assert_eq!(server.open_shells(), 0);
}

#[test]
fn pywinrm_over_basic() {
    let server = WinrmServer::start(Options::default());
    let result = run_pywinrm(&server, "basic");
    check(&result, &server, "basic", false);
}

#[test]
fn pywinrm_over_ntlm_with_message_encryption() {
    // Refusing plain messages proves pywinrm's encryption was accepted, not skipped.
    let server = WinrmServer::start(Options {
        allow_unencrypted: false,
        ..Options::default()
    });
    let result = run_pywinrm(&server, "ntlm");
    check(&result, &server, "ntlm", true);
}

#[test]
fn pywinrm_over_ntlm_on_https() {
    let server = WinrmServer::start(Options {
        tls: true,
        allow_unencrypted: false,
    });
    let result = run_pywinrm(&server, "ntlm");
    check(&result, &server, "ntlm", false);
    // requests-ntlm sends the TLS channel binding; it must match the server's own computation
    // (which is the crate's `tls_channel_bindings`).
    assert!(server.channel_bound_logins() > 0);
}
