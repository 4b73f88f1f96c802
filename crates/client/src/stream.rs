//! An HTTP channel's reply: server-sent events, one [`RelayEvent`] each.

use futures::StreamExt;
use torpor_api::RelayEvent;

use crate::{Error, Result};

/// Most bytes one event may take before the stream is refused: a reply's text comes in many
/// small events, so a block this large means something is wrong.
const MAX_EVENT_BYTES: usize = 4 << 20;

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
                return serde_json::from_str(data.trim())
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
