//! A thin client for the REST API, shared by every CLI command.

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use torpor_control::model::{ExecEvent, ExecRequest, Sandbox};

pub struct Client {
    pub base: String,
    pub api_key: String,
    http: reqwest::Client,
}

/// An API error, as the server explained it.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub message: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status.as_u16())
    }
}
impl std::error::Error for ApiFailure {}

impl Client {
    pub fn new(base: &str, api_key: Option<String>) -> Result<Self> {
        let api_key = match api_key {
            Some(k) => k,
            None => {
                let path = torpor_control::config::default_data_dir().join("api-key");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "no API key: set TORPOR_API_KEY or --api-key-file, or run as a user who can read {} (it is created when `torpor server` first starts)",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Ok(Self { base: base.trim_end_matches('/').to_owned(), api_key, http: reqwest::Client::new() })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.api_key)
    }

    pub async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!("cannot reach the Torpor daemon at {}: is `torpor server` running? ({e})", self.base)
            } else {
                anyhow!("request to {} failed: {e}", self.base)
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or(text);
        Err(ApiFailure { status, message }.into())
    }

    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = self.send(req).await?;
        resp.json().await.context("decoding the daemon's answer")
    }

    pub async fn sandbox(&self, id: &str) -> Result<Sandbox> {
        self.json(Method::GET, &format!("/v1/sandboxes/{id}"), None::<&()>).await
    }

    /// Runs a command to completion over the POST endpoint; returns (stdout, stderr, exit event).
    pub async fn exec_collect(&self, id: &str, req: &ExecRequest) -> Result<(Vec<u8>, Vec<u8>, ExecEvent)> {
        use base64::Engine as _;
        use futures::StreamExt;
        let resp = self.send(self.request(Method::POST, &format!("/v1/sandboxes/{id}/exec")).json(req)).await?;
        let mut stream = resp.bytes_stream();
        let (mut out, mut err, mut buf) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.context("reading exec output")?);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let ev: ExecEvent = serde_json::from_slice(&line).context("decoding an exec event")?;
                let b64 = base64::engine::general_purpose::STANDARD;
                match ev {
                    ExecEvent::Stdout { data } => out.extend(b64.decode(data)?),
                    ExecEvent::Stderr { data } => err.extend(b64.decode(data)?),
                    ExecEvent::Started { .. } => {}
                    ExecEvent::Exit { .. } => return Ok((out, err, ev)),
                    ExecEvent::Error { message } => bail!("exec failed: {message}"),
                }
            }
        }
        bail!("the exec stream ended without an exit status")
    }
}
