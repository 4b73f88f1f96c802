//! A typed client for Torpor's REST API, used by the CLI, the benchmarks and the tests; outside
//! programs can use it the same way.
//!
//! ```no_run
//! # async fn f() -> Result<(), torpor_client::Error> {
//! let client = torpor_client::Client::new("http://127.0.0.1:7070", "API-KEY");
//! let sandbox = client.create_sandbox(&Default::default()).await?;
//! let out = client.exec(&sandbox.id, &torpor_api::ExecRequest { argv: vec!["uname".into()], ..Default::default() }).await?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! # Ok(()) }
//! ```

mod error;
mod exec;
mod stream;

use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use torpor_api::{
    AgentStatus, Channel, ChannelList, CreateChannel, CreateSandbox, CreateTemplate, GuestInfo, Health, NetworkPolicy,
    NetworkStatus, Sandbox, SandboxList, Template, TemplateList, Usage,
};

pub use error::Error;
pub use exec::{ExecOutput, ExecSession};
pub use stream::RelayStream;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone)]
pub struct Client {
    base: String,
    api_key: String,
    http: reqwest::Client,
}

impl Client {
    /// `base` is the daemon's root URL (`http://127.0.0.1:7070`).
    pub fn new(base: &str, api_key: impl Into<String>) -> Self {
        Self { base: base.trim_end_matches('/').to_owned(), api_key: api_key.into(), http: reqwest::Client::new() }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// A request to a path of the API with the key attached, for what has no method here.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.api_key)
    }

    /// Sends a request; an answer other than 2xx becomes [`Error::Api`] with the daemon's
    /// explanation.
    pub async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().await.map_err(|source| Error::transport(&self.base, source))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(Error::from_answer(resp.status().as_u16(), &resp.text().await.unwrap_or_default()))
    }

    /// Sends `body` (if any) as JSON and decodes the JSON answer.
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
        resp.json().await.map_err(|source| Error::Decode { what: "the daemon's answer", source })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(Method::GET, path, None::<&()>).await
    }

    async fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(Method::POST, path, None::<&()>).await
    }

    async fn delete(&self, path: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, path)).await.map(drop)
    }

    pub async fn health(&self) -> Result<Health> {
        self.get("/v1/health").await
    }

    /// Creates a sandbox; answers once its supervisor does.
    pub async fn create_sandbox(&self, req: &CreateSandbox) -> Result<Sandbox> {
        self.json(Method::POST, "/v1/sandboxes", Some(req)).await
    }

    pub async fn sandboxes(&self) -> Result<Vec<Sandbox>> {
        Ok(self.get::<SandboxList>("/v1/sandboxes").await?.sandboxes)
    }

    pub async fn sandbox(&self, id: &str) -> Result<Sandbox> {
        self.get(&format!("/v1/sandboxes/{id}")).await
    }

    pub async fn pause(&self, id: &str) -> Result<Sandbox> {
        self.post(&format!("/v1/sandboxes/{id}/pause")).await
    }

    pub async fn resume(&self, id: &str) -> Result<Sandbox> {
        self.post(&format!("/v1/sandboxes/{id}/resume")).await
    }

    /// Resumes the sandbox if it is paused; a running one is returned as it is.
    pub async fn connect(&self, id: &str) -> Result<Sandbox> {
        self.post(&format!("/v1/sandboxes/{id}/connect")).await
    }

    pub async fn stop(&self, id: &str) -> Result<Sandbox> {
        self.post(&format!("/v1/sandboxes/{id}/stop")).await
    }

    pub async fn start(&self, id: &str) -> Result<Sandbox> {
        self.post(&format!("/v1/sandboxes/{id}/start")).await
    }

    pub async fn delete_sandbox(&self, id: &str) -> Result<()> {
        self.delete(&format!("/v1/sandboxes/{id}")).await
    }

    pub async fn usage(&self, id: &str) -> Result<Usage> {
        self.get(&format!("/v1/sandboxes/{id}/usage")).await
    }

    pub async fn info(&self, id: &str) -> Result<GuestInfo> {
        self.get(&format!("/v1/sandboxes/{id}/info")).await
    }

    pub async fn network(&self, id: &str) -> Result<NetworkStatus> {
        self.get(&format!("/v1/sandboxes/{id}/network")).await
    }

    pub async fn set_network(&self, id: &str, policy: &NetworkPolicy) -> Result<NetworkStatus> {
        self.json(Method::PUT, &format!("/v1/sandboxes/{id}/network"), Some(policy)).await
    }

    pub async fn agent(&self, id: &str) -> Result<AgentStatus> {
        self.get(&format!("/v1/sandboxes/{id}/agent")).await
    }

    pub async fn templates(&self) -> Result<Vec<Template>> {
        Ok(self.get::<TemplateList>("/v1/templates").await?.templates)
    }

    /// Captures a running sandbox as a template (the sandbox is consumed).
    pub async fn create_template(&self, req: &CreateTemplate) -> Result<Template> {
        self.json(Method::POST, "/v1/templates", Some(req)).await
    }

    /// Whether a capture would accept these defaults, before anything is built.
    pub async fn check_template(&self, req: &CreateTemplate) -> Result<()> {
        self.send(self.request(Method::POST, "/v1/templates/check").json(req)).await.map(drop)
    }

    pub async fn delete_template(&self, name: &str) -> Result<()> {
        self.delete(&format!("/v1/templates/{name}")).await
    }

    pub async fn create_channel(&self, req: &CreateChannel) -> Result<Channel> {
        self.json(Method::POST, "/v1/channels", Some(req)).await
    }

    pub async fn channels(&self) -> Result<Vec<Channel>> {
        Ok(self.get::<ChannelList>("/v1/channels").await?.channels)
    }

    pub async fn delete_channel(&self, name: &str) -> Result<()> {
        self.delete(&format!("/v1/channels/{name}")).await
    }

    /// Sends a message to an HTTP channel; the reply arrives as a stream of events.
    pub async fn send_message(&self, channel: &str, msg: &torpor_api::ChannelMessage) -> Result<RelayStream> {
        let resp = self.send(self.request(Method::POST, &format!("/v1/channels/{channel}/messages")).json(msg)).await?;
        Ok(RelayStream::new(resp))
    }
}

/// Where the daemon keeps its API key: `$TORPOR_HOME/api-key`, by default
/// `/var/lib/torpor/api-key` (readable by root only).
pub fn default_api_key_file() -> std::path::PathBuf {
    std::env::var_os("TORPOR_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/lib/torpor".into())
        .join("api-key")
}

/// The API key the way every Torpor command finds it: from `file` if one is given, else
/// `$TORPOR_API_KEY`, else [`default_api_key_file`].
pub fn find_api_key(file: Option<&std::path::Path>) -> Result<String> {
    if let Some(path) = file {
        return std::fs::read_to_string(path)
            .map(|key| key.trim().to_owned())
            .map_err(|source| Error::ApiKeyFile { path: path.to_owned(), source });
    }
    match std::env::var("TORPOR_API_KEY").ok().filter(|k| !k.trim().is_empty()) {
        Some(key) => Ok(key),
        None => read_default_api_key(),
    }
}

/// The key in [`default_api_key_file`].
pub fn read_default_api_key() -> Result<String> {
    let path = default_api_key_file();
    match std::fs::read_to_string(&path) {
        Ok(key) => Ok(key.trim().to_owned()),
        Err(e) => Err(Error::NoApiKey { path, source: e }),
    }
}
