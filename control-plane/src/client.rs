//! The CLI's HTTP client for the REST API: server URL, admin token and CA come from flags,
//! environment variables, or the data directory a local plane writes them to.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::server::{ADMIN_TOKEN_FILE, API_URL_FILE, CA_FILE};

pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

#[derive(Debug, Clone, Default)]
pub struct ConnectionArgs {
    pub server: Option<String>,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub data_dir: PathBuf,
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl ApiClient {
    pub fn connect(args: &ConnectionArgs) -> anyhow::Result<Self> {
        stella_pki::install_crypto_provider();
        let base = match &args.server {
            Some(s) => s.trim_end_matches('/').to_string(),
            None => read_trimmed(&args.data_dir.join(API_URL_FILE)).ok_or_else(|| {
                anyhow!(
                    "no control plane given: pass --server URL (or STELLA_SERVER), or run next to a \
                     data directory of `stella dev` / `stella serve` (looked in {})",
                    args.data_dir.display()
                )
            })?,
        };
        let token = match &args.token {
            Some(t) => Some(t.clone()),
            None => read_trimmed(&args.data_dir.join(ADMIN_TOKEN_FILE)),
        };
        let mut builder = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("stella-cli/", env!("CARGO_PKG_VERSION")));
        if base.starts_with("https://") {
            let ca_path = args
                .ca_file
                .clone()
                .unwrap_or_else(|| args.data_dir.join(CA_FILE));
            let ca_pem = std::fs::read_to_string(&ca_path).with_context(|| {
                format!(
                    "reading the plane's CA certificate {} (pass --ca-file or STELLA_CA_FILE)",
                    ca_path.display()
                )
            })?;
            let tls = stella_pki::client_config_ca(&ca_pem)?;
            builder = builder.use_preconfigured_tls(tls);
        } else if !base.starts_with("http://") {
            bail!("server URL {base:?} must start with https:// or http://");
        }
        Ok(Self {
            base,
            token,
            http: builder.build()?,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let token = self.token.as_ref().ok_or_else(|| {
            anyhow!("no API token: pass --token (or STELLA_TOKEN), or run next to the plane's data directory")
        })?;
        Ok(self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self
            .request(reqwest::Method::GET, path)?
            .send()
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        decode(resp).await
    }

    /// A GET whose answer is text (CSV), not JSON.
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let resp = self
            .request(reqwest::Method::GET, path)?
            .send()
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp.text().await?);
        }
        Err(refusal(resp).await)
    }

    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let resp = self
            .request(reqwest::Method::PATCH, path)?
            .json(body)
            .send()
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        decode(resp).await
    }

    /// Subscribes to `/api/v1/events` (server-sent events) with the given query.
    pub async fn events(
        &self,
        query: &str,
        for_at_most: std::time::Duration,
    ) -> anyhow::Result<EventStream> {
        let resp = self
            .request(reqwest::Method::GET, &format!("/api/v1/events?{query}"))?
            .timeout(for_at_most)
            .send()
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        Ok(EventStream {
            resp,
            buf: Vec::new(),
        })
    }

    /// Every item of a paginated list, following the `Link: <…>; rel="next"` headers.
    pub async fn list<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Vec<T>> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut next = Some(format!("{path}{sep}limit={}", crate::api::MAX_PAGE));
        let mut items = Vec::new();
        while let Some(path) = next.take() {
            let resp = self
                .request(reqwest::Method::GET, &path)?
                .send()
                .await
                .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
            next = next_page(resp.headers());
            let page: Vec<T> = decode(resp).await?;
            items.extend(page);
        }
        Ok(items)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let resp = self
            .request(reqwest::Method::POST, path)?
            .json(body)
            .send()
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        decode(resp).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let resp = self
            .request(reqwest::Method::PUT, path)?
            .json(body)
            .send()
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        decode(resp).await
    }

    /// A DELETE answered with no body (204).
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let resp = self
            .request(reqwest::Method::DELETE, path)?
            .send()
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(refusal(resp).await)
    }
}

/// Server-sent events as they arrive: each `next` is one event's name and data.
pub struct EventStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next event (`(event name, data)`), or `None` when the stream ended.
    pub async fn next(&mut self) -> anyhow::Result<Option<(String, String)>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block);
                let mut name = String::from("message");
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() && name == "message" {
                    continue; // a keep-alive comment
                }
                return Ok(Some((name, data)));
            }
            match self.resp.chunk().await? {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => return Ok(None),
            }
        }
    }
}

/// The path of the next page announced by a list answer's `Link` header, if any.
pub fn next_page(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"")
            .then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

/// The error of an answer that was not a success, in the plane's words.
async fn refusal(resp: reqwest::Response) -> anyhow::Error {
    decode::<serde_json::Value>(resp)
        .await
        .err()
        .unwrap_or_else(|| anyhow!("the control plane refused the request"))
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> anyhow::Result<T> {
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if status.is_success() {
        return serde_json::from_slice(&bytes)
            .context("the control plane sent an unreadable response");
    }
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.pointer("/message"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    bail!("{message} (HTTP {})", status.as_u16())
}
