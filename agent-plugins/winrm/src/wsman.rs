//! The WinRS remote shell over WS-Management (MS-WSMV 3.1.4.x): Create a `cmd` shell,
//! run a Command in it, Receive its streams until `CommandState/Done`, Signal terminate,
//! Delete the shell. SOAP 1.2 envelopes are written as text; answers are read with the tiny
//! DOM in `xml.rs`.
//!
//! Why not the `winrm-rs` crate: it is young, has a single author, and its newer releases need
//! a newer Rust than this workspace; the part of the protocol Stella needs is small.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::time::Instant;

use crate::transport::{Transport, TransportError};
use crate::xml::{self, Element, escape};

pub const SHELL_URI: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd";
const NS_SOAP: &str = "http://www.w3.org/2003/05/soap-envelope";
const NS_ADDRESSING: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing";
const NS_WSMAN: &str = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd";
const NS_MS_WSMAN: &str = "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd";
const NS_SHELL: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell";
const ANONYMOUS: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous";

pub const ACTION_CREATE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create";
pub const ACTION_DELETE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete";
pub const ACTION_COMMAND: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Command";
pub const ACTION_RECEIVE: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Receive";
pub const ACTION_SIGNAL: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Signal";
pub const SIGNAL_TERMINATE: &str =
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/terminate";
const STATE_DONE: &str =
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done";
/// `ERROR_WSMAN_OPERATION_TIMEDOUT`: a Receive long-poll ended without output.
const FAULT_OPERATION_TIMEOUT: u64 = 2_150_858_793;
/// How much longer than the WS-Man OperationTimeout we wait for the HTTP answer itself.
const HTTP_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WsmanError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("WS-Management fault{}: {message}", code.map(|c| format!(" {c:#x}")).unwrap_or_default())]
    Fault { code: Option<u64>, message: String },
    #[error("unexpected WS-Management answer: {0}")]
    Protocol(String),
}

impl WsmanError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, WsmanError::Transport(TransportError::TimedOut))
    }
}

/// One Receive answer.
#[derive(Debug, Default)]
pub struct Received {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Set once the command is Done.
    pub exit_code: Option<i64>,
}

pub struct Client {
    transport: Transport,
    to: String,
    operation_timeout: Duration,
}

fn fault_of(root: &Element) -> Option<WsmanError> {
    let fault = root.path(&["Body", "Fault"])?;
    let wsman_fault = fault.find("WSManFault");
    let code = wsman_fault
        .and_then(|f| f.attr("Code"))
        .and_then(|c| c.trim().parse::<u64>().ok());
    let reason = fault
        .path(&["Reason", "Text"])
        .map(|t| t.trimmed_text().to_string())
        .unwrap_or_default();
    let mut detail = String::new();
    if let Some(m) = wsman_fault.and_then(|f| f.child("Message")) {
        collect_text(m, &mut detail);
    }
    let subcode = fault
        .path(&["Code", "Subcode", "Value"])
        .map(|v| v.trimmed_text().to_string());
    let mut message = match (reason.is_empty(), detail.trim().is_empty()) {
        (false, false) if detail.trim() != reason => format!("{reason} ({})", detail.trim()),
        (false, _) => reason,
        (true, false) => detail.trim().to_string(),
        (true, true) => "no reason given".to_string(),
    };
    if let Some(s) = subcode {
        message = format!("{message} [{s}]");
    }
    Some(WsmanError::Fault { code, message })
}

fn collect_text(e: &Element, out: &mut String) {
    let t = e.trimmed_text();
    if !t.is_empty() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(t);
    }
    for c in &e.children {
        collect_text(c, out);
    }
}

impl Client {
    pub fn new(transport: Transport, to: String, operation_timeout: Duration) -> Self {
        Self {
            transport,
            to,
            operation_timeout,
        }
    }

    fn envelope(
        &self,
        action: &str,
        message_id: &str,
        shell_id: Option<&str>,
        options: &[(&str, &str)],
        body: &str,
    ) -> String {
        let mut s = String::with_capacity(2048 + body.len());
        s.push_str(&format!(
            "<s:Envelope xmlns:s=\"{NS_SOAP}\" xmlns:a=\"{NS_ADDRESSING}\" xmlns:w=\"{NS_WSMAN}\" \
             xmlns:p=\"{NS_MS_WSMAN}\" xmlns:rsp=\"{NS_SHELL}\"><s:Header>\
             <a:To>{to}</a:To>\
             <w:ResourceURI s:mustUnderstand=\"true\">{SHELL_URI}</w:ResourceURI>\
             <a:ReplyTo><a:Address s:mustUnderstand=\"true\">{ANONYMOUS}</a:Address></a:ReplyTo>\
             <a:Action s:mustUnderstand=\"true\">{action}</a:Action>\
             <w:MaxEnvelopeSize s:mustUnderstand=\"true\">153600</w:MaxEnvelopeSize>\
             <a:MessageID>{message_id}</a:MessageID>\
             <w:Locale xml:lang=\"en-US\" s:mustUnderstand=\"false\"/>\
             <p:DataLocale xml:lang=\"en-US\" s:mustUnderstand=\"false\"/>\
             <w:OperationTimeout>PT{secs}S</w:OperationTimeout>",
            to = escape(&self.to),
            secs = self.operation_timeout.as_secs().max(1),
        ));
        if let Some(id) = shell_id {
            s.push_str(&format!(
                "<w:SelectorSet><w:Selector Name=\"ShellId\">{}</w:Selector></w:SelectorSet>",
                escape(id)
            ));
        }
        if !options.is_empty() {
            s.push_str("<w:OptionSet>");
            for (name, value) in options {
                s.push_str(&format!(
                    "<w:Option Name=\"{}\">{}</w:Option>",
                    escape(name),
                    escape(value)
                ));
            }
            s.push_str("</w:OptionSet>");
        }
        s.push_str("</s:Header><s:Body>");
        s.push_str(body);
        s.push_str("</s:Body></s:Envelope>");
        s
    }

    /// Sends one request and returns the answer's root, or its fault as an error.
    async fn call(
        &mut self,
        action: &str,
        shell_id: Option<&str>,
        options: &[(&str, &str)],
        body: &str,
        deadline: Instant,
    ) -> Result<Element, WsmanError> {
        let message_id = format!(
            "uuid:{}",
            uuid::Uuid::new_v4().hyphenated().to_string().to_uppercase()
        );
        let soap = self.envelope(action, &message_id, shell_id, options, body);
        let http_deadline = deadline.min(Instant::now() + self.operation_timeout + HTTP_GRACE);
        let reply = match self.transport.post(&soap, http_deadline).await {
            Ok(r) => r,
            // The server's own limit passed, not ours: it stalls rather than we ran out.
            Err(TransportError::TimedOut) if http_deadline < deadline => {
                let name = action.rsplit('/').next().unwrap_or(action);
                return Err(WsmanError::Protocol(format!(
                    "no answer to {name} within {}s",
                    (self.operation_timeout + HTTP_GRACE).as_secs()
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let root = xml::parse(&reply.body)
            .map_err(|e| WsmanError::Protocol(format!("HTTP {}: not XML: {e}", reply.status)))?;
        if let Some(fault) = fault_of(&root) {
            return Err(fault);
        }
        if !(200..300).contains(&reply.status) {
            return Err(WsmanError::Protocol(format!(
                "HTTP {} without a SOAP fault",
                reply.status
            )));
        }
        if let Some(relates) = root.path(&["Header", "RelatesTo"])
            && !relates.trimmed_text().eq_ignore_ascii_case(&message_id)
        {
            return Err(WsmanError::Protocol(format!(
                "answer relates to {} instead of {message_id}",
                relates.trimmed_text()
            )));
        }
        Ok(root)
    }

    pub async fn create_shell(&mut self, deadline: Instant) -> Result<String, WsmanError> {
        let body = "<rsp:Shell><rsp:InputStreams>stdin</rsp:InputStreams>\
                    <rsp:OutputStreams>stdout stderr</rsp:OutputStreams></rsp:Shell>";
        // UTF-8 code page, so that output is not mangled through the OEM code page.
        let options = [("WINRS_NOPROFILE", "TRUE"), ("WINRS_CODEPAGE", "65001")];
        let root = self
            .call(ACTION_CREATE, None, &options, body, deadline)
            .await?;
        let mut selectors = Vec::new();
        root.find_all("Selector", &mut selectors);
        let from_selector = selectors
            .iter()
            .find(|s| s.attr("Name") == Some("ShellId"))
            .map(|s| s.trimmed_text().to_string());
        let from_shell = root
            .find("Shell")
            .and_then(|s| s.child("ShellId"))
            .map(|s| s.trimmed_text().to_string());
        from_selector
            .or(from_shell)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| WsmanError::Protocol("Create answer carries no ShellId".into()))
    }

    /// Starts `command args…` directly (no cmd.exe in between) and returns its CommandId.
    pub async fn command(
        &mut self,
        shell_id: &str,
        command: &str,
        args: &[String],
        deadline: Instant,
    ) -> Result<String, WsmanError> {
        let mut body = format!(
            "<rsp:CommandLine><rsp:Command>{}</rsp:Command>",
            escape(command)
        );
        for a in args {
            body.push_str(&format!("<rsp:Arguments>{}</rsp:Arguments>", escape(a)));
        }
        body.push_str("</rsp:CommandLine>");
        let options = [
            ("WINRS_CONSOLEMODE_STDIN", "TRUE"),
            ("WINRS_SKIP_CMD_SHELL", "TRUE"),
        ];
        let root = self
            .call(ACTION_COMMAND, Some(shell_id), &options, &body, deadline)
            .await?;
        root.find("CommandId")
            .map(|c| c.trimmed_text().to_string())
            .filter(|id| !id.is_empty())
            .ok_or_else(|| WsmanError::Protocol("Command answer carries no CommandId".into()))
    }

    /// One Receive long-poll. A poll that ends without output (the server's OperationTimeout
    /// fault) is an empty answer, not an error.
    pub async fn receive(
        &mut self,
        shell_id: &str,
        command_id: &str,
        deadline: Instant,
    ) -> Result<Received, WsmanError> {
        let body = format!(
            "<rsp:Receive><rsp:DesiredStream CommandId=\"{}\">stdout stderr</rsp:DesiredStream></rsp:Receive>",
            escape(command_id)
        );
        let root = match self
            .call(ACTION_RECEIVE, Some(shell_id), &[], &body, deadline)
            .await
        {
            Ok(root) => root,
            Err(WsmanError::Fault { code, message })
                if code == Some(FAULT_OPERATION_TIMEOUT) || message.contains("TimedOut") =>
            {
                return Ok(Received::default());
            }
            Err(e) => return Err(e),
        };
        let resp = root
            .path(&["Body", "ReceiveResponse"])
            .ok_or_else(|| WsmanError::Protocol("Receive answer has no ReceiveResponse".into()))?;
        let mut out = Received::default();
        for stream in resp.children_named("Stream") {
            if stream
                .attr("CommandId")
                .is_some_and(|c| !c.eq_ignore_ascii_case(command_id))
            {
                continue;
            }
            let text: String = stream.text.split_whitespace().collect();
            if text.is_empty() {
                continue;
            }
            let data = B64.decode(text.as_bytes()).map_err(|_| {
                WsmanError::Protocol("Receive answer carries a stream that is not base64".into())
            })?;
            match stream.attr("Name") {
                Some("stdout") => out.stdout.extend_from_slice(&data),
                Some("stderr") => out.stderr.extend_from_slice(&data),
                _ => {}
            }
        }
        if let Some(state) = resp.child("CommandState")
            && state.attr("State") == Some(STATE_DONE)
        {
            let code = state
                .child("ExitCode")
                .map(|e| e.trimmed_text())
                .and_then(|t| t.parse::<i64>().ok())
                .ok_or_else(|| {
                    WsmanError::Protocol("command is Done but has no ExitCode".into())
                })?;
            out.exit_code = Some(code);
        }
        Ok(out)
    }

    pub async fn signal_terminate(
        &mut self,
        shell_id: &str,
        command_id: &str,
        deadline: Instant,
    ) -> Result<(), WsmanError> {
        let body = format!(
            "<rsp:Signal CommandId=\"{}\"><rsp:Code>{SIGNAL_TERMINATE}</rsp:Code></rsp:Signal>",
            escape(command_id)
        );
        self.call(ACTION_SIGNAL, Some(shell_id), &[], &body, deadline)
            .await
            .map(|_| ())
    }

    pub async fn delete_shell(
        &mut self,
        shell_id: &str,
        deadline: Instant,
    ) -> Result<(), WsmanError> {
        self.call(ACTION_DELETE, Some(shell_id), &[], "", deadline)
            .await
            .map(|_| ())
    }
}
