//! What crosses the proxy and how refusals read: the endpoints and headers passed each way,
//! the token a guest presents, and errors in each API's own format (agent CLIs show them).

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use torpor_api::ModelFlavour;

/// What kind of refusal, spelled in each API's own vocabulary.
#[derive(Clone, Copy)]
pub(super) enum Refusal {
    Unauthenticated,
    NotGranted,
    NotFound,
    BudgetSpent,
    /// The sandbox has `IN_FLIGHT` requests running, or the proxy holds all the bodies it may.
    Busy,
    TooLarge,
    Invalid,
    Upstream,
}

/// An error body the SDKs parse: agent CLIs show its message. `x-should-retry: false` tells the
/// official SDKs that retrying is pointless (a spent budget does not refill by waiting).
pub(super) fn refuse(flavour: ModelFlavour, why: Refusal, message: String) -> Response {
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
        Refusal::Busy => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "requests", "rate_limit_exceeded"),
        Refusal::TooLarge => {
            (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", "invalid_request_error", "request_too_large")
        }
        Refusal::Invalid => {
            (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request_error", "invalid_request")
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
    match why {
        Refusal::Upstream => {}
        Refusal::Busy => {
            response.headers_mut().insert("x-should-retry", HeaderValue::from_static("true"));
            response.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        }
        _ => {
            response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
    }
    response
}

/// Request headers passed upstream: what the APIs and their SDKs need, nothing that picks an
/// account (`openai-organization`, `openai-project`), authenticates, or concerns the hop.
/// `accept-encoding` is dropped too: answers must arrive uncompressed for their usage to be read.
pub(super) fn forward_request_header(name: &HeaderName) -> bool {
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
pub(super) fn endpoint_allowed(flavour: ModelFlavour, method: &Method, rest: &str) -> bool {
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

/// Response headers not passed back: the hop's own, cookies, and what names the shared
/// upstream account.
pub(super) fn strip_response_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "content-length"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "trailer"
            | "upgrade"
            | "set-cookie"
            | "openai-organization"
            | "openai-project"
            | "anthropic-organization-id"
    )
}

pub(super) fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key.trim());
    }
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok())?;
    auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer ")).map(str::trim)
}

/// OpenAI chat streams report usage only when asked to; metering needs it, so the proxy asks,
/// whatever the request said. The request's other fields are copied as they are, unparsed.
pub(super) fn ask_for_stream_usage(body: &[u8]) -> Option<Bytes> {
    let mut fields: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_slice(body).ok()?;
    let usage = serde_json::value::to_raw_value(&json!({"include_usage": true})).ok()?;
    fields.insert("stream_options".into(), usage);
    serde_json::to_vec(&fields).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

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
    fn usage_is_asked_for_and_the_rest_kept() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":false},"messages":[{"role":"user","content":"hi"}]}"#;
        let patched: Value = serde_json::from_slice(&ask_for_stream_usage(body).unwrap()).unwrap();
        assert_eq!(patched["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(patched["messages"][0]["content"], "hi");
        assert_eq!(patched["model"], "m");
        assert!(ask_for_stream_usage(b"[1, 2]").is_none(), "not an object");
    }
}
