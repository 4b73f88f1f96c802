//! `torpor sandbox exec`: a WebSocket session that forwards stdin and Ctrl-C and mirrors the
//! command's stdout, stderr and exit code.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use torpor_control::model::{ExecClientMessage, ExecEvent, ExecRequest};

use crate::client::Client;

/// Exit code for failures of Torpor itself (not of the command), as `docker exec` uses.
const TORPOR_FAILURE: u8 = 125;

pub async fn interactive(client: &Client, id: &str, req: &ExecRequest) -> Result<ExitCode> {
    let ws_url = format!("{}/v1/sandboxes/{id}/exec/ws", client.base.replacen("http", "ws", 1));
    let mut request = ws_url.into_client_request().context("building the WebSocket request")?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {}", client.api_key).parse().context("API key is not valid ASCII")?);
    let (ws, _) = tokio_tungstenite::connect_async(request).await.map_err(|e| match e {
        // The API refused the upgrade: show its explanation, not just the status line.
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| body.into_owned());
            anyhow!("{message} ({})", resp.status().as_u16())
        }
        other => anyhow!("opening the exec session: {other}"),
    })?;
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::Text(serde_json::to_string(req)?.into())).await?;

    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(8);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = stdin_tx.send(None).await;
                    return;
                }
                Ok(n) => {
                    if stdin_tx.send(Some(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    });

    let mut stdin_open = true;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None => bail!("the exec session closed without an exit status"),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => bail!("exec session: {e}"),
                };
                match serde_json::from_str::<ExecEvent>(&text).context("decoding an exec event")? {
                    ExecEvent::Started { .. } => {}
                    ExecEvent::Stdout { data } => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&B64.decode(data)?)?;
                        out.flush()?;
                    }
                    ExecEvent::Stderr { data } => {
                        let mut err = std::io::stderr().lock();
                        err.write_all(&B64.decode(data)?)?;
                        err.flush()?;
                    }
                    ExecEvent::Exit { code, signal, timed_out } => {
                        let _ = sink.close().await;
                        return Ok(ExitCode::from(exit_code(code, signal, timed_out)));
                    }
                    ExecEvent::Error { message } => {
                        eprintln!("error: {message}");
                        return Ok(ExitCode::from(TORPOR_FAILURE));
                    }
                }
            }
            chunk = stdin_rx.recv(), if stdin_open => {
                let msg = match chunk.flatten() {
                    Some(data) => ExecClientMessage::Stdin { data: B64.encode(data) },
                    None => {
                        stdin_open = false;
                        ExecClientMessage::StdinEof
                    }
                };
                sink.send(Message::Text(serde_json::to_string(&msg)?.into())).await?;
            }
            _ = tokio::signal::ctrl_c() => {
                let msg = ExecClientMessage::Signal { signal: libc::SIGINT };
                sink.send(Message::Text(serde_json::to_string(&msg)?.into())).await?;
            }
        }
    }
}

/// The shell's convention: the code itself, 128+N for signal N, 124 for a timeout.
pub fn exit_code(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> u8 {
    if timed_out {
        return 124;
    }
    match (code, signal) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => TORPOR_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::exit_code;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(Some(0), None, false), 0);
        assert_eq!(exit_code(Some(3), None, false), 3);
        assert_eq!(exit_code(None, Some(9), false), 137);
        assert_eq!(exit_code(None, Some(9), true), 124);
    }
}
