//! HTTP channels of the relay: send a message, read the reply's server-sent events.

use std::time::Instant;

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::Daemon;

/// (event name, data, arrival) of each server-sent event of an HTTP channel reply.
pub async fn send(d: &Daemon, channel: &str, body: Value) -> (StatusCode, Vec<(String, Value, Instant)>) {
    let resp = d.request(Method::POST, &format!("/v1/channels/{channel}/messages")).json(&body).send().await.unwrap();
    let status = resp.status();
    if !status.is_success() {
        return (status, vec![(String::new(), resp.json().await.unwrap_or(Value::Null), Instant::now())]);
    }
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if !name.is_empty() {
                events.push((name, serde_json::from_str(&data).unwrap_or(Value::Null), Instant::now()));
            }
        }
    }
    (status, events)
}

pub fn done(events: &[(String, Value, Instant)]) -> Value {
    let last = events.last().expect("no events");
    assert_eq!(last.0, "done", "the reply did not finish: {:?}", events.iter().map(|e| &e.1).collect::<Vec<_>>());
    last.1.clone()
}

pub async fn create_channel(d: &Daemon, spec: Value) -> Value {
    let (status, body) = d.call(Method::POST, "/v1/channels", Some(spec)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

pub async fn pause(d: &Daemon, id: &str) {
    let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
