//! A real OpenSSH server per test (the testkit's [`Sshd`]) and the ssh executor's target configs
//! for it. Tests run as root (as CI does), so they log in as `root` with a key.

#![allow(dead_code)]

use serde_json::{Value, json};
use stella_plugin_sdk::{ExecutorContext, TargetRef};
use stella_plugin_ssh::SshExecutor;
use stella_plugin_testkit::sshd::Sshd;

/// Target configs of the ssh executor pointing at a test server.
pub trait SshTargets {
    fn sticker_path(&self) -> String;
    /// A script-mode target config; `extra` keys override (null removes).
    fn config(&self, extra: Value) -> Value;
    fn target(&self, name: &str, extra: Value) -> TargetRef;
}

impl SshTargets for Sshd {
    fn sticker_path(&self) -> String {
        self.path("state/nested/stella.version.json")
            .display()
            .to_string()
    }

    fn config(&self, extra: Value) -> Value {
        let mut v = json!({
            "host": "127.0.0.1",
            "port": self.port,
            "user": "root",
            "private_key_file": self.client_key.display().to_string(),
            "host_key": self.host_pub,
            "sticker_path": self.sticker_path(),
            "connect_timeout_secs": 5,
            "timeout_secs": 60,
        });
        for (k, val) in extra.as_object().unwrap() {
            if val.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = val.clone();
            }
        }
        v
    }

    fn target(&self, name: &str, extra: Value) -> TargetRef {
        TargetRef {
            name: name.to_string(),
            kind: "ssh".to_string(),
            config: self.config(extra),
        }
    }
}

pub fn executor(sshd: &Sshd) -> SshExecutor {
    SshExecutor::new(ExecutorContext {
        state_dir: sshd.path("agent-state"),
    })
}
