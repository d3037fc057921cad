//! A small client of the plane's REST API (HTTPS, CA pinned, admin bearer token).

use std::time::Duration;

use anyhow::{Context, anyhow};
use serde::de::DeserializeOwned;

pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, ca_pem: &str, token: &str) -> anyhow::Result<Self> {
        stella_pki::install_crypto_provider();
        let tls = stella_pki::client_config_ca(ca_pem).context("building the API TLS config")?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(300))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("stella-bench/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the API client")?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn healthy(&self) -> bool {
        match self.http.get(format!("{}/healthz", self.base)).send().await {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        }
    }

    /// One unlabelled sample of the plane's `/metrics` (Prometheus text); `None` when absent.
    pub async fn metric(&self, name: &str) -> anyhow::Result<Option<f64>> {
        let url = format!("{}/metrics", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            anyhow::bail!("GET /metrics: HTTP {status}");
        }
        Ok(text.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok())?
        }))
    }

    /// Every item of a paginated list, following the `Link: <…>; rel="next"` headers.
    pub async fn list<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Vec<T>> {
        let mut next = Some(format!("{path}?limit=1000"));
        let mut items = Vec::new();
        while let Some(path) = next.take() {
            let resp = self
                .http
                .get(format!("{}{path}", self.base))
                .bearer_auth(&self.token)
                .send()
                .await
                .with_context(|| format!("GET {}{path}", self.base))?;
            next = stella_control_plane::client::next_page(resp.headers());
            let status = resp.status();
            let body = resp.bytes().await?;
            if !status.is_success() {
                anyhow::bail!(
                    "GET {path}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            items.extend(serde_json::from_slice::<Vec<T>>(&body)?);
        }
        Ok(items)
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<T> {
        let req = self.http.post(format!("{}{path}", self.base)).json(body);
        self.send(req, "POST", path).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        method: &str,
        path: &str,
    ) -> anyhow::Result<T> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("{method} {}{path}", self.base))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v.pointer("/message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(anyhow!(
                "{method} {path}: HTTP {}: {message}",
                status.as_u16()
            ));
        }
        serde_json::from_slice(&body).with_context(|| format!("{method} {path}: unexpected answer"))
    }
}
