//! The model proxy: Anthropic- and OpenAI-compatible endpoints served to each sandbox inside
//! its own namespace, forwarded to the configured upstream with the real key. The guest holds
//! only a per-sandbox proxy token, accepted solely on that sandbox's own endpoint, so it is
//! worth nothing anywhere else: not upstream, not from another sandbox. Answers stream through
//! unbuffered while their usage fields are counted into the sandbox's metering, and a sandbox
//! past its token budget is refused in the upstream API's own error format.

mod usage;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

pub use usage::{Scanner, Tally};

use crate::config::ModelFlavour;
use crate::guest_api::FromSandbox;
use crate::manager::Manager;

const KEY_FILE: &str = "model-proxy-key";
/// Requests carry whole conversations, images included.
const MAX_REQUEST_BYTES: usize = 64 << 20;
const TOKEN_PREFIX: &str = "torpor-proxy-";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("model proxy key {path}: {message}")]
    Key { path: String, message: String },
    #[error("model proxy HTTP client: {0}")]
    Client(String),
}

/// Issues and checks proxy tokens and holds the connection pool to the upstreams.
pub struct ModelProxy {
    key: Vec<u8>,
    http: reqwest::Client,
}

impl ModelProxy {
    /// Loads the key proxy tokens derive from, creating it (0600) on first start.
    pub fn load_or_create(data_dir: &std::path::Path) -> Result<Self, ProxyError> {
        let path = data_dir.join(KEY_FILE);
        let key_err = |message: String| ProxyError::Key { path: path.display().to_string(), message };
        let key = match std::fs::read(&path) {
            Ok(key) if key.len() >= 32 => key,
            Ok(_) => return Err(key_err("shorter than 32 bytes; delete it to make a new one".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = vec![0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
                crate::files::write_private(&path, &key).map_err(|e| key_err(e.to_string()))?;
                key
            }
            Err(e) => return Err(key_err(e.to_string())),
        };
        // Answers may stream for many minutes: only connecting is bounded. Redirects are not
        // followed: the key goes to the configured upstream and nowhere else.
        let http = reqwest::Client::builder()
            .user_agent(concat!("torpor-model-proxy/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ProxyError::Client(e.to_string()))?;
        Ok(Self { key, http })
    }

    /// The token sandbox `id` presents: an HMAC of its id, so it needs no storage and cannot
    /// be guessed for another sandbox.
    pub fn token_for(&self, id: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        format!("{TOKEN_PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
    }

    fn token_ok(&self, id: &str, presented: &str) -> bool {
        let Some(hex_mac) = presented.strip_prefix(TOKEN_PREFIX) else { return false };
        let Ok(bytes) = hex::decode(hex_mac) else { return false };
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.verify_slice(&bytes).is_ok()
    }
}

/// Where the guest finds each flavour (what its SDK's base-URL variable must hold).
pub fn guest_base_url(flavour: ModelFlavour) -> String {
    let root = format!("http://{}:{}", torpor_proto::GUEST_GATEWAY, torpor_proto::GUEST_API_PORT);
    match flavour {
        // The Anthropic SDKs append `/v1/messages`, the OpenAI ones `/chat/completions`.
        ModelFlavour::Anthropic => format!("{root}/anthropic"),
        ModelFlavour::Openai => format!("{root}/openai/v1"),
    }
}

/// Routes served only inside sandboxes' namespaces, never on the daemon's own listener.
pub fn router(manager: Arc<Manager>) -> Router {
    // Each flavour under its own name: /anthropic/…, /openai/….
    let served = |flavour: ModelFlavour| {
        let path = format!("/{}/{{*rest}}", flavour.as_str());
        Router::new().route(&path, any(handle)).with_state((manager.clone(), flavour))
    };
    served(ModelFlavour::Anthropic).merge(served(ModelFlavour::Openai)).layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
}

struct Forward {
    sandbox: String,
    method: Method,
    rest: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

async fn handle(
    State((manager, flavour)): State<(Arc<Manager>, ModelFlavour)>,
    Extension(FromSandbox(sandbox)): Extension<FromSandbox>,
    Path(rest): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = uri.query().map(str::to_owned);
    forward(manager, flavour, Forward { sandbox, method, rest, query, headers, body }).await
}

/// What kind of refusal, spelled in each API's own vocabulary.
#[derive(Clone, Copy)]
enum Refusal {
    Unauthenticated,
    NotGranted,
    NotFound,
    BudgetSpent,
    Upstream,
}

/// An error body the SDKs parse: agent CLIs show its message. `x-should-retry: false` tells the
/// official SDKs that retrying is pointless (a spent budget does not refill by waiting).
fn refuse(flavour: ModelFlavour, why: Refusal, message: String) -> Response {
    let (status, anthropic_type, openai_type, openai_code) = match why {
        Refusal::Unauthenticated => {
            (StatusCode::UNAUTHORIZED, "authentication_error", "invalid_request_error", "invalid_api_key")
        }
        Refusal::NotGranted => {
            (StatusCode::FORBIDDEN, "permission_error", "invalid_request_error", "permission_denied")
        }
        Refusal::NotFound => (StatusCode::NOT_FOUND, "not_found_error", "invalid_request_error", "unknown_url"),
        Refusal::BudgetSpent => {
            (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "insufficient_quota", "insufficient_quota")
        }
        Refusal::Upstream => (StatusCode::BAD_GATEWAY, "api_error", "server_error", "upstream_unreachable"),
    };
    let body = match flavour {
        ModelFlavour::Anthropic => json!({"type": "error", "error": {"type": anthropic_type, "message": message}}),
        ModelFlavour::Openai => {
            json!({"error": {"message": message, "type": openai_type, "param": null, "code": openai_code}})
        }
    };
    let mut response = (status, axum::Json(body)).into_response();
    if !matches!(why, Refusal::Upstream) {
        response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
    }
    response
}

/// Request headers passed upstream: what the APIs and their SDKs need, nothing that picks an
/// account (`openai-organization`, `openai-project`), authenticates, or concerns the hop.
/// `accept-encoding` is dropped too: answers must arrive uncompressed for their usage to be read.
fn forward_request_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    matches!(
        name,
        "content-type"
            | "accept"
            | "user-agent"
            | "anthropic-version"
            | "anthropic-beta"
            | "openai-beta"
            | "idempotency-key"
    ) || name.starts_with("x-stainless-")
}

/// The endpoints a sandbox may call. Everything the agents need (completions, token counts,
/// model lists), and nothing that reads what the shared upstream account stores (files,
/// batches, fine-tunes, stored responses), which would let one sandbox see another's data.
fn endpoint_allowed(flavour: ModelFlavour, method: &Method, rest: &str) -> bool {
    let segments: Vec<&str> = rest.split('/').collect();
    if segments.iter().any(|s| s.is_empty() || *s == "." || *s == ".." || s.contains('\\')) {
        return false;
    }
    let post = method == Method::POST;
    let get = method == Method::GET;
    match (flavour, segments.as_slice()) {
        (ModelFlavour::Anthropic, ["v1", "messages"] | ["v1", "messages", "count_tokens"]) => post,
        (ModelFlavour::Openai, ["v1", "chat", "completions"] | ["v1", "responses"] | ["v1", "completions"]) => post,
        (ModelFlavour::Openai, ["v1", "embeddings"]) => post,
        (_, ["v1", "models"] | ["v1", "models", _]) => get,
        _ => false,
    }
}

fn strip_response_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "content-length" | "connection" | "keep-alive" | "transfer-encoding" | "trailer" | "upgrade" | "set-cookie"
    )
}

fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key.trim());
    }
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok())?;
    auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer ")).map(str::trim)
}

/// OpenAI chat streams report usage only when asked to; metering needs it, so the proxy asks,
/// whatever the request said.
fn ask_for_stream_usage(rest: &str, body: &Bytes) -> Option<Bytes> {
    if !rest.ends_with("chat/completions") {
        return None;
    }
    let mut v: Value = serde_json::from_slice(body).ok()?;
    if v.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    let options = v.as_object_mut()?.entry("stream_options").or_insert_with(|| json!({}));
    let options = options.as_object_mut()?;
    if options.get("include_usage") == Some(&Value::Bool(true)) {
        return None;
    }
    options.insert("include_usage".into(), Value::Bool(true));
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

async fn forward(manager: Arc<Manager>, flavour: ModelFlavour, req: Forward) -> Response {
    let id = req.sandbox.clone();
    let proxy = manager.proxy.clone();
    if !presented_token(&req.headers).is_some_and(|t| proxy.token_ok(&id, t)) {
        return refuse(
            flavour,
            Refusal::Unauthenticated,
            "invalid proxy token: use the API key Torpor put in this sandbox's environment".into(),
        );
    }
    if !endpoint_allowed(flavour, &req.method, &req.rest) {
        return refuse(
            flavour,
            Refusal::NotFound,
            format!("{} /{} is not served by the Torpor model proxy", req.method, req.rest),
        );
    }
    let Some(upstream) = manager.cfg.models.get(&flavour).cloned() else {
        return refuse(flavour, Refusal::NotGranted, format!("no {} upstream is configured", flavour.as_str()));
    };
    let rec = match manager.model_access(&id).await {
        Ok(rec) => rec,
        Err(e) => return refuse(flavour, Refusal::NotGranted, e.message),
    };
    let grant = rec.models.clone().unwrap_or_default();
    if !grant.allows(flavour) {
        return refuse(
            flavour,
            Refusal::NotGranted,
            format!("sandbox {id} was not given access to the {} API", flavour.as_str()),
        );
    }
    if let Some(budget) = grant.budget() {
        let spent = rec.meter.model.tokens();
        if spent >= budget {
            return refuse(
                flavour,
                Refusal::BudgetSpent,
                format!("sandbox {id} has spent its model token budget ({spent} of {budget} tokens)"),
            );
        }
    }
    let key = match crate::config::read_private(&format!("models.{}.key_file", flavour.as_str()), &upstream.key_file) {
        Ok(key) => key,
        Err(e) => {
            tracing::error!(%id, error = %e, "model proxy: the upstream key cannot be read");
            return refuse(flavour, Refusal::Upstream, "the model proxy is misconfigured on the host".into());
        }
    };
    let busy = manager.busy(&id);

    let mut url = format!("{}/{}", upstream.base_url.trim_end_matches('/'), req.rest);
    if let Some(q) = &req.query {
        url.push('?');
        url.push_str(q);
    }
    let body = ask_for_stream_usage(&req.rest, &req.body).unwrap_or(req.body);
    let mut builder = proxy.http.request(req.method.clone(), &url);
    for (name, value) in req.headers.iter().filter(|(n, _)| forward_request_header(n)) {
        builder = builder.header(name, value);
    }
    builder = match flavour {
        ModelFlavour::Anthropic => builder.header("x-api-key", key),
        ModelFlavour::Openai => builder.bearer_auth(key),
    };
    let started = std::time::Instant::now();
    let upstream_response = match builder.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            // reqwest's error names the URL, never the headers.
            tracing::warn!(%id, error = %e, "model proxy: upstream unreachable");
            return refuse(flavour, Refusal::Upstream, format!("the {} upstream is unreachable", flavour.as_str()));
        }
    };
    let status = upstream_response.status();
    let content_type =
        upstream_response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let mut headers = HeaderMap::new();
    for (name, value) in upstream_response.headers().iter().filter(|(n, _)| !strip_response_header(n)) {
        headers.append(name.clone(), value.clone());
    }
    let mut meter = Meter {
        manager: manager.clone(),
        id: id.clone(),
        scanner: Some(Scanner::new(&content_type)),
        started,
        path: req.rest,
        status: status.as_u16(),
        _busy: busy,
    };
    let stream = upstream_response.bytes_stream().map(move |chunk| {
        if let Ok(bytes) = &chunk {
            meter.feed(bytes);
        }
        chunk
    });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Counts an answer as it streams by and books it when the stream ends or is dropped (a
/// client that hangs up mid-answer still pays for what the upstream produced).
struct Meter {
    manager: Arc<Manager>,
    id: String,
    scanner: Option<Scanner>,
    started: std::time::Instant,
    path: String,
    status: u16,
    _busy: Option<crate::manager::Busy>,
}

impl Meter {
    fn feed(&mut self, bytes: &[u8]) {
        if let Some(scanner) = &mut self.scanner {
            scanner.feed(bytes);
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let tally = self.scanner.take().map(Scanner::finish).unwrap_or_default();
        tracing::info!(
            id = %self.id,
            path = %self.path,
            status = self.status,
            input_tokens = tally.input_tokens,
            output_tokens = tally.output_tokens,
            ms = self.started.elapsed().as_millis() as u64,
            "model request"
        );
        let (manager, id) = (self.manager.clone(), self.id.clone());
        tokio::spawn(async move { manager.record_model_usage(&id, tally).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_completion_endpoints_are_served() {
        let (a, o) = (ModelFlavour::Anthropic, ModelFlavour::Openai);
        assert!(endpoint_allowed(a, &Method::POST, "v1/messages"));
        assert!(endpoint_allowed(a, &Method::POST, "v1/messages/count_tokens"));
        assert!(endpoint_allowed(o, &Method::POST, "v1/chat/completions"));
        assert!(endpoint_allowed(o, &Method::POST, "v1/responses"));
        assert!(endpoint_allowed(o, &Method::GET, "v1/models/gpt-x"));
        assert!(!endpoint_allowed(a, &Method::GET, "v1/messages"));
        assert!(!endpoint_allowed(o, &Method::GET, "v1/files"));
        assert!(!endpoint_allowed(o, &Method::POST, "v1/batches"));
        assert!(!endpoint_allowed(o, &Method::GET, "v1/responses/resp_1"));
        assert!(!endpoint_allowed(a, &Method::POST, "v1/messages/../../admin"));
        assert!(!endpoint_allowed(a, &Method::POST, "v1//messages"));
        assert!(!endpoint_allowed(o, &Method::POST, "v1/chat/completions/"));
    }

    #[test]
    fn usage_is_asked_for_in_chat_streams_whatever_the_request_said() {
        let asked = |body: &str| {
            ask_for_stream_usage("v1/chat/completions", &Bytes::from(body.to_owned()))
                .map(|b| serde_json::from_slice::<Value>(&b).unwrap()["stream_options"]["include_usage"].clone())
        };
        assert_eq!(asked(r#"{"stream":true}"#), Some(Value::Bool(true)));
        assert_eq!(asked(r#"{"stream":true,"stream_options":{"include_usage":false}}"#), Some(Value::Bool(true)));
        assert_eq!(asked(r#"{"stream":true,"stream_options":{"include_usage":true}}"#), None);
        assert_eq!(asked(r#"{"stream":false}"#), None);
    }

    #[test]
    fn tokens_are_bound_to_their_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let proxy = ModelProxy::load_or_create(dir.path()).unwrap();
        let token = proxy.token_for("sb-a");
        assert!(proxy.token_ok("sb-a", &token));
        assert!(!proxy.token_ok("sb-b", &token));
        assert!(!proxy.token_ok("sb-a", "torpor-proxy-00"));
        let again = ModelProxy::load_or_create(dir.path()).unwrap();
        assert_eq!(again.token_for("sb-a"), token, "tokens survive a restart");
    }
}
