//! The model proxy: Anthropic- and OpenAI-compatible endpoints served to each sandbox inside
//! its own namespace, forwarded to the configured upstream with the real key. The guest holds
//! only a per-sandbox proxy token, accepted solely on that sandbox's own endpoint, so it is
//! worth nothing anywhere else: not upstream, not from another sandbox. Answers stream through
//! unbuffered while their usage fields are counted into the sandbox's metering, and a sandbox
//! past its token budget is refused in the upstream API's own error format.

mod inspect;
mod ledger;
mod usage;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use axum::routing::any;
use axum::Router;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use usage::{Scanner, Tally};
use wire::{
    ask_for_stream_usage, endpoint_allowed, forward_request_header, presented_token, refuse, strip_response_header,
    Refusal,
};

use crate::guest_api::FromSandbox;
use crate::manager::Manager;
use torpor_api::ModelFlavour;

const KEY_FILE: &str = "model-proxy-key";
/// Requests carry whole conversations, images included (the APIs' own limit is about this).
const MAX_REQUEST_BYTES: usize = 32 << 20;
/// From the request's headers to the end of its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
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
    ledger: ledger::Ledger,
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
        Ok(Self { key, http, ledger: Default::default() })
    }

    /// The token sandbox `id` presents: an HMAC of its id, so it needs no storage and cannot
    /// be guessed for another sandbox.
    pub fn token_for(&self, id: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        format!("{TOKEN_PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Sandbox `id` is gone: its share of the proxy goes too.
    pub fn forget(&self, id: &str) {
        self.ledger.forget(id);
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
    served(ModelFlavour::Anthropic).merge(served(ModelFlavour::Openai))
}

/// The request as it arrived, its body not read yet: everything that can be refused from the
/// headers and path is refused before a byte of it is buffered.
struct Incoming {
    sandbox: String,
    method: Method,
    rest: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Body,
}

async fn handle(
    State((manager, flavour)): State<(Arc<Manager>, ModelFlavour)>,
    Extension(FromSandbox(sandbox)): Extension<FromSandbox>,
    Path(rest): Path<String>,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let query = parts.uri.query().map(str::to_owned);
    let incoming = Incoming { sandbox, method: parts.method, rest, query, headers: parts.headers, body };
    forward(manager, flavour, incoming).await
}

/// Tokens assumed for a request's answer when it names no maximum.
const DEFAULT_OUTPUT_ESTIMATE: u64 = 4096;

async fn forward(manager: Arc<Manager>, flavour: ModelFlavour, req: Incoming) -> Response {
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
    let spent = rec.meter.model.tokens();
    if let Some(budget) = grant.budget().filter(|b| spent >= *b) {
        return refuse(
            flavour,
            Refusal::BudgetSpent,
            format!("sandbox {id} has spent its model token budget ({spent} of {budget} tokens)"),
        );
    }
    let Some(slot) = proxy.ledger.slot(&id) else {
        return refuse(
            flavour,
            Refusal::Busy,
            format!("sandbox {id} has {} model requests running already; retry when one ends", ledger::IN_FLIGHT),
        );
    };
    let mut buffer = proxy.ledger.buffer(&id);
    let body = match read_body(req.body, &req.headers, &mut buffer).await {
        Ok(body) => body,
        Err((why, message)) => return refuse(flavour, why, message),
    };
    let inspection = if body.is_empty() {
        inspect::Inspection::default()
    } else {
        // A large body takes a while to walk: not on a runtime thread.
        let walked = body.clone();
        match tokio::task::spawn_blocking(move || inspect::inspect(&walked)).await {
            Ok(Ok(inspection)) => inspection,
            Ok(Err(e)) => return refuse(flavour, Refusal::Invalid, format!("the request is not valid JSON: {e}")),
            Err(_) => return refuse(flavour, Refusal::Upstream, "the model proxy failed to read the request".into()),
        }
    };
    if let Some(why) = inspection.refused {
        return refuse(flavour, Refusal::NotGranted, format!("the Torpor model proxy does not forward {why}"));
    }
    // Reserved until the answer is booked, so requests in flight count against the budget.
    let estimate_input = body.len() as u64 / 4;
    let estimate = estimate_input.saturating_add(inspection.max_output_tokens.unwrap_or(DEFAULT_OUTPUT_ESTIMATE));
    if let Some(budget) = grant.budget() {
        // Read again: the body may have taken a while, and other requests were booked meanwhile.
        let spent = manager.model_access(&id).await.map(|r| r.meter.model.tokens()).unwrap_or(spent);
        if let Err(committed) = proxy.ledger.reserve(&id, spent, budget, estimate) {
            return refuse(
                flavour,
                Refusal::BudgetSpent,
                format!(
                    "sandbox {id} has spent or committed to requests in flight its model token budget ({committed} \
                     of {budget} tokens)"
                ),
            );
        }
    }
    let reservation = Reservation { proxy: proxy.clone(), id: id.clone(), tokens: grant.budget().map(|_| estimate) };
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
    let wants_usage = req.rest.ends_with("chat/completions") && inspection.stream && !inspection.includes_usage;
    let body = if wants_usage { ask_for_stream_usage(&body).unwrap_or(body) } else { body };
    let mut builder = proxy.http.request(req.method.clone(), &url);
    for (name, value) in req.headers.iter().filter(|(n, _)| forward_request_header(n)) {
        builder = builder.header(name, value);
    }
    builder = match flavour {
        ModelFlavour::Anthropic => builder.header("x-api-key", key),
        ModelFlavour::Openai => builder.bearer_auth(key),
    };
    let started = std::time::Instant::now();
    let builder = builder.header(axum::http::header::CONTENT_LENGTH, body.len()).body(held_body(body, buffer));
    let upstream_response = match builder.send().await {
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
        estimate_input,
        reservation: Some(reservation),
        _slot: slot,
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

/// The request body, read within `MAX_REQUEST_BYTES`, `BODY_TIMEOUT` and the buffer budgets
/// (room is taken for each piece as it arrives, before it is kept).
async fn read_body(body: Body, headers: &HeaderMap, buffer: &mut ledger::Buffer) -> Result<Bytes, (Refusal, String)> {
    tokio::time::timeout(BODY_TIMEOUT, read_body_now(body, headers, buffer)).await.unwrap_or_else(|_| {
        Err((Refusal::Invalid, format!("the request body did not arrive within {} s", BODY_TIMEOUT.as_secs())))
    })
}

async fn read_body_now(
    body: Body,
    headers: &HeaderMap,
    buffer: &mut ledger::Buffer,
) -> Result<Bytes, (Refusal, String)> {
    let too_large = || (Refusal::TooLarge, format!("requests are limited to {} MiB", MAX_REQUEST_BYTES >> 20));
    let busy = || (Refusal::Busy, "the model proxy holds all the requests it may; retry in a moment".to_owned());
    let declared = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BYTES) {
        return Err(too_large());
    }
    let mut data = bytes::BytesMut::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| (Refusal::Invalid, format!("the request body broke off: {e}")))?;
        let len = data.len() + chunk.len();
        if len > MAX_REQUEST_BYTES {
            return Err(too_large());
        }
        if !buffer.cover(len) {
            return Err(busy());
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data.freeze())
}

/// The body as the upstream request sends it: its room in the buffer budget is held until the
/// HTTP client takes it to send.
fn held_body(body: Bytes, buffer: ledger::Buffer) -> reqwest::Body {
    reqwest::Body::wrap_stream(futures::stream::once(async move {
        let _held = buffer;
        Ok::<_, std::io::Error>(body)
    }))
}

/// Tokens a request reserved against its sandbox's budget, given back when it is booked.
struct Reservation {
    proxy: Arc<ModelProxy>,
    id: String,
    tokens: Option<u64>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(tokens) = self.tokens {
            self.proxy.ledger.release(&self.id, tokens);
        }
    }
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
    /// Input tokens assumed when the answer reports none (a stream cut short, an answer too
    /// large to read, one in no known format).
    estimate_input: u64,
    /// Released once the usage is booked, not before: in between a budget check would see
    /// neither.
    reservation: Option<Reservation>,
    _slot: ledger::Slot,
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
        let mut tally = self.scanner.take().map(Scanner::finish).unwrap_or_default();
        // Answered but uncounted: what the request itself is likely to have cost.
        if (200..300).contains(&self.status) && !tally.usage_seen {
            tally.input_tokens = tally.input_tokens.max(self.estimate_input);
        }
        tracing::info!(
            id = %self.id,
            path = %self.path,
            status = self.status,
            input_tokens = tally.input_tokens,
            output_tokens = tally.output_tokens,
            ms = self.started.elapsed().as_millis() as u64,
            "model request"
        );
        let (manager, id, reservation) = (self.manager.clone(), self.id.clone(), self.reservation.take());
        tokio::spawn(async move {
            manager.record_model_usage(&id, tally).await;
            drop(reservation);
        });
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit {
    use super::*;

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
