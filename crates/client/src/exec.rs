//! Running programs: to completion over NDJSON, or interactively over a WebSocket.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use torpor_api::{ExecClientMessage, ExecEvent, ExecRequest};

use crate::{Client, Error, Result};

/// A finished exec: its output and how it ended (an [`ExecEvent::Exit`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: ExecEvent,
}

impl ExecOutput {
    /// The exit code, if the program exited (rather than being killed by a signal).
    pub fn code(&self) -> Option<i32> {
        match self.exit {
            ExecEvent::Exit { code, .. } => code,
            _ => None,
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// An interactive exec: send stdin and signals with [`ExecInput`], read events from [`ExecEvents`].
pub struct ExecSession {
    pub input: ExecInput,
    pub events: ExecEvents,
}

pub struct ExecInput(SplitSink<Ws, Message>);
pub struct ExecEvents(SplitStream<Ws>);

impl ExecInput {
    async fn send(&mut self, msg: &ExecClientMessage) -> Result<()> {
        let text = serde_json::to_string(msg).expect("client messages serialise");
        self.0.send(Message::Text(text.into())).await.map_err(|e| Error::Protocol(format!("exec session: {e}")))
    }

    pub async fn stdin(&mut self, data: &[u8]) -> Result<()> {
        self.send(&ExecClientMessage::Stdin { data: B64.encode(data) }).await
    }

    pub async fn close_stdin(&mut self) -> Result<()> {
        self.send(&ExecClientMessage::StdinEof).await
    }

    pub async fn signal(&mut self, signal: i32) -> Result<()> {
        self.send(&ExecClientMessage::Signal { signal }).await
    }

    pub async fn close(mut self) {
        let _ = self.0.close().await;
    }
}

impl ExecEvents {
    /// The next event; `None` once the daemon closed the session.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>> {
        loop {
            match self.0.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(&text)
                        .map(Some)
                        .map_err(|e| Error::Protocol(format!("decoding an exec event: {e}")))
                }
                Some(Ok(Message::Close(_))) | None => return Ok(None),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(Error::Protocol(format!("exec session: {e}"))),
            }
        }
    }
}

impl Client {
    /// Runs a program to completion and collects its output.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecOutput> {
        let resp = self.send(self.request(Method::POST, &format!("/v1/sandboxes/{id}/exec")).json(req)).await?;
        let mut stream = resp.bytes_stream();
        let (mut stdout, mut stderr, mut buf) = (Vec::new(), Vec::new(), Vec::new());
        let decode = |data: String| B64.decode(data).map_err(|e| Error::Protocol(format!("exec output: {e}")));
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.map_err(|source| Error::Decode { what: "exec output", source })?);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let event: ExecEvent = serde_json::from_slice(&line)
                    .map_err(|e| Error::Protocol(format!("decoding an exec event: {e}")))?;
                match event {
                    ExecEvent::Stdout { data } => stdout.extend(decode(data)?),
                    ExecEvent::Stderr { data } => stderr.extend(decode(data)?),
                    ExecEvent::Started { .. } => {}
                    ExecEvent::Exit { .. } => return Ok(ExecOutput { stdout, stderr, exit: event }),
                    ExecEvent::Error { message } => return Err(Error::Protocol(format!("exec failed: {message}"))),
                }
            }
        }
        Err(Error::Protocol("the exec stream ended without an exit status".into()))
    }

    /// Starts a program with a WebSocket session for its stdin, signals and output.
    pub async fn exec_session(&self, id: &str, req: &ExecRequest) -> Result<ExecSession> {
        let url = format!("{}/v1/sandboxes/{id}/exec/ws", self.base().replacen("http", "ws", 1));
        let mut request = url.into_client_request().map_err(|e| Error::Protocol(format!("exec session URL: {e}")))?;
        let auth = format!("Bearer {}", self.api_key())
            .parse()
            .map_err(|_| Error::Protocol("the API key is not valid in a header".into()))?;
        request.headers_mut().insert("authorization", auth);
        let (ws, _) = tokio_tungstenite::connect_async(request).await.map_err(|e| match e {
            // The API refused the upgrade: its explanation, not just the status line.
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
                Error::from_answer(resp.status().as_u16(), &body)
            }
            other => Error::Protocol(format!("opening the exec session: {other}")),
        })?;
        let (sink, stream) = ws.split();
        let mut input = ExecInput(sink);
        let text = serde_json::to_string(req).expect("requests serialise");
        input.0.send(Message::Text(text.into())).await.map_err(|e| Error::Protocol(format!("exec session: {e}")))?;
        Ok(ExecSession { input, events: ExecEvents(stream) })
    }
}
