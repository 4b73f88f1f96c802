//! An HTTP channel's reply: server-sent events, one [`RelayEvent`] each.

use futures::StreamExt;
use torpor_api::RelayEvent;

use crate::{Error, Result};

/// Most bytes one event may take before the stream is refused. The daemon cuts an answer at
/// 1 MiB of text, which JSON escaping can grow up to six times; past this, something is wrong.
const MAX_EVENT_BYTES: usize = 8 << 20;

/// The event types this client knows; others (from a newer daemon) are skipped.
const KNOWN: [&str; 5] = ["waking", "text", "tool", "done", "error"];

pub struct RelayStream {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: Vec<u8>,
}

impl RelayStream {
    pub(crate) fn new(resp: reqwest::Response) -> Self {
        Self { body: resp.bytes_stream().boxed(), buffer: Vec::new() }
    }

    /// The next event; `None` when the daemon ended the stream.
    pub async fn next(&mut self) -> Result<Option<RelayEvent>> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8_lossy(&block);
                let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else { continue };
                let event: serde_json::Value = serde_json::from_str(data.trim())
                    .map_err(|e| Error::Protocol(format!("decoding a reply event: {e}")))?;
                if !event["type"].as_str().is_some_and(|t| KNOWN.contains(&t)) {
                    continue;
                }
                return serde_json::from_value(event)
                    .map(Some)
                    .map_err(|e| Error::Protocol(format!("decoding a reply event: {e}")));
            }
            if self.buffer.len() > MAX_EVENT_BYTES {
                return Err(Error::Protocol(format!("a reply event is over {MAX_EVENT_BYTES} bytes")));
            }
            match self.body.next().await {
                Some(chunk) => {
                    self.buffer.extend_from_slice(&chunk.map_err(|source| Error::Decode { what: "the reply", source })?)
                }
                None => return Ok(None),
            }
        }
    }

    /// Reads to the end: the final text, or the error the reply ended with.
    pub async fn text(mut self) -> Result<String> {
        let mut text = String::new();
        while let Some(event) = self.next().await? {
            match event {
                RelayEvent::Text { text: t } => text.push_str(&t),
                RelayEvent::Done { text: t, .. } => return Ok(if t.is_empty() { text } else { t }),
                RelayEvent::Error { message } => return Err(Error::Protocol(format!("the agent failed: {message}"))),
                RelayEvent::Waking { .. } | RelayEvent::Tool { .. } => {}
            }
        }
        Err(Error::Protocol("the reply ended without finishing".into()))
    }
}

#[cfg(test)]
mod tests {
    use torpor_api::RelayEvent;

    #[test]
    fn every_event_the_daemon_sends_is_known() {
        let events = [
            RelayEvent::Waking { sandbox: "sb".into() },
            RelayEvent::Text { text: "t".into() },
            RelayEvent::Tool { name: "n".into(), detail: "d".into() },
            RelayEvent::Done {
                text: String::new(),
                session: String::new(),
                turn: 0,
                sandbox: String::new(),
                woke: false,
                wake_ms: 0,
            },
            RelayEvent::Error { message: "m".into() },
        ];
        for event in events {
            // A new variant breaks this match, and so reminds whoever adds it to list it here.
            match event {
                RelayEvent::Waking { .. }
                | RelayEvent::Text { .. }
                | RelayEvent::Tool { .. }
                | RelayEvent::Done { .. }
                | RelayEvent::Error { .. } => {}
            }
            assert!(super::KNOWN.contains(&event.name()), "{}", event.name());
        }
    }
}
