//! Token counts from model API answers, as they pass: a whole JSON body, or the events of a
//! server-sent event stream, read incrementally without holding the stream back.

use serde_json::Value;

/// Tokens one answer reported. Streams report running totals (Anthropic's `message_delta`
/// carries the output so far), so each field keeps the largest value seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Streamed pieces of output seen: each is at least one token, so a stream cut short
    /// before its usage event still counts at least this many.
    pub deltas: u64,
    /// The answer reported its usage (else the proxy books an estimate).
    pub usage_seen: bool,
}

fn field(v: &Value, name: &str) -> u64 {
    v.get(name).and_then(Value::as_u64).unwrap_or(0)
}

impl Tally {
    /// Folds in one JSON document: a whole answer or one streamed event, in Anthropic Messages,
    /// OpenAI chat completions or OpenAI responses format.
    pub fn observe(&mut self, v: &Value) {
        let kind = v.get("type").and_then(Value::as_str);
        let chat_delta = v
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| c.iter().any(|c| c["delta"]["content"].as_str().is_some_and(|t| !t.is_empty())));
        if matches!(kind, Some("content_block_delta" | "response.output_text.delta")) || chat_delta {
            self.deltas += 1;
        }
        let usage = match kind {
            Some("message_start") => v.get("message").and_then(|m| m.get("usage")),
            Some(t) if t.starts_with("response.") => v.get("response").and_then(|r| r.get("usage")),
            _ => v.get("usage"),
        };
        let Some(usage) = usage.filter(|u| u.is_object()) else { return };
        self.usage_seen = true;
        // Anthropic counts cached prompt tokens apart from `input_tokens`; OpenAI includes them.
        let input = field(usage, "input_tokens")
            + field(usage, "cache_creation_input_tokens")
            + field(usage, "cache_read_input_tokens")
            + field(usage, "prompt_tokens");
        let output = field(usage, "output_tokens") + field(usage, "completion_tokens");
        self.input_tokens = self.input_tokens.max(input);
        self.output_tokens = self.output_tokens.max(output);
    }
}

/// Largest non-streamed answer whose usage is read; a longer one is estimated from its size.
const MAX_BODY: usize = 16 << 20;
/// Longest SSE line kept while waiting for its end.
const MAX_LINE: usize = 4 << 20;

/// Watches the bytes of one answer go by.
pub enum Scanner {
    Sse {
        line: Vec<u8>,
        tally: Tally,
    },
    /// `total`: bytes seen, for the estimate when the body is too large to keep.
    Json {
        body: Vec<u8>,
        overflow: bool,
        total: u64,
    },
}

impl Scanner {
    pub fn new(content_type: &str) -> Self {
        if content_type.starts_with("text/event-stream") {
            Self::Sse { line: Vec::new(), tally: Tally::default() }
        } else {
            Self::Json { body: Vec::new(), overflow: false, total: 0 }
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            Self::Sse { line, tally } => {
                for &b in chunk {
                    if b == b'\n' {
                        sse_line(line, tally);
                        line.clear();
                    } else if line.len() < MAX_LINE {
                        line.push(b);
                    }
                }
            }
            Self::Json { body, overflow, total } => {
                *total += chunk.len() as u64;
                if body.len() + chunk.len() > MAX_BODY {
                    *overflow = true;
                    body.clear();
                } else if !*overflow {
                    body.extend_from_slice(chunk);
                }
            }
        }
    }

    /// What the whole answer reported (for a stream cut short, at least one output token per
    /// piece received).
    pub fn finish(self) -> Tally {
        match self {
            Self::Sse { mut line, mut tally } => {
                sse_line(&mut line, &mut tally);
                tally.output_tokens = tally.output_tokens.max(tally.deltas);
                tally
            }
            Self::Json { body, overflow, total } => {
                let mut tally = Tally::default();
                if overflow {
                    // Mostly text: about four bytes a token.
                    tally.output_tokens = total / 4;
                } else if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    tally.observe(&v);
                }
                tally
            }
        }
    }
}

fn sse_line(line: &mut Vec<u8>, tally: &mut Tally) {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    let Some(data) = line.strip_prefix(b"data:") else { return };
    if let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii_start()) {
        tally.observe(&v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(content_type: &str, chunks: &[&str]) -> Tally {
        let mut s = Scanner::new(content_type);
        for c in chunks {
            s.feed(c.as_bytes());
        }
        s.finish()
    }

    #[test]
    fn anthropic_answers_whole_and_streamed() {
        let whole = r#"{"type":"message","usage":{"input_tokens":12,"cache_read_input_tokens":3,"output_tokens":7}}"#;
        assert_eq!(
            scan("application/json", &[whole]),
            Tally { input_tokens: 15, output_tokens: 7, deltas: 0, usage_seen: true }
        );
        // Split mid-line and mid-event, as the network may deliver it.
        let stream = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\nevent: message_del",
            "ta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ];
        assert_eq!(
            scan("text/event-stream; charset=utf-8", &stream),
            Tally { input_tokens: 25, output_tokens: 15, deltas: 1, usage_seen: true }
        );
        // Cut short before the usage event: one token per piece received.
        assert_eq!(
            scan("text/event-stream", &stream[..2]),
            Tally { input_tokens: 25, output_tokens: 1, deltas: 1, usage_seen: true }
        );
    }

    #[test]
    fn openai_chat_and_responses() {
        let whole =
            r#"{"object":"chat.completion","usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}"#;
        assert_eq!(
            scan("application/json", &[whole]),
            Tally { input_tokens: 9, output_tokens: 4, deltas: 0, usage_seen: true }
        );
        let chat = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
        ];
        assert_eq!(
            scan("text/event-stream", &chat),
            Tally { input_tokens: 11, output_tokens: 2, deltas: 1, usage_seen: true }
        );
        let responses = ["event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":30,\"output_tokens\":8}}}"];
        assert_eq!(
            scan("text/event-stream", &responses),
            Tally { input_tokens: 30, output_tokens: 8, deltas: 0, usage_seen: true }
        );
    }

    #[test]
    fn answers_without_usage_are_estimated() {
        // An OpenAI chat stream cut before its usage event: its deltas, and no usage seen (the
        // proxy then books its estimate of the prompt).
        let cut = scan("text/event-stream", &["data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"]);
        assert_eq!(cut, Tally { input_tokens: 0, output_tokens: 1, deltas: 1, usage_seen: false });
        // A JSON answer past what is read: estimated from its size.
        let mut s = Scanner::new("application/json");
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..17 {
            s.feed(&chunk);
        }
        let big = s.finish();
        assert!(!big.usage_seen && big.output_tokens >= (17 << 20) / 4, "{big:?}");
    }

    #[test]
    fn garbage_counts_nothing() {
        assert_eq!(scan("application/json", &["{not json"]), Tally::default());
        assert_eq!(scan("text/event-stream", &["data: {\"usage\": 5}\n", ": comment\n"]), Tally::default());
    }
}
