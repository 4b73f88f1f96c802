//! Exec endpoints: `POST …/exec` streams NDJSON events (stdin given up front), and
//! `GET …/exec/ws` is a WebSocket for interactive use (stdin and signals while it runs).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures::{SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use torpor_proto::supervisor::{exec_exited, exec_input, exec_output, ExecInput, ExecStart, StdinEof};

use super::{json_body, AppState};
use crate::error::{ApiError, ErrorBody};
use crate::manager::Live;
use torpor_api::{ExecClientMessage, ExecEvent, ExecRequest, SignalRequest};

const STDIN_CHUNK: usize = 1 << 20;

enum Stdin {
    Data(Vec<u8>),
    Eof,
}

fn new_exec_id() -> String {
    let mut bytes = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    format!("ex-{}", hex::encode(bytes))
}

/// Starts `req` in the sandbox; stdin comes from `stdin`. The stream ends after `exit` or `error`.
async fn start(
    live: &Live,
    req: &ExecRequest,
    stdin: mpsc::Receiver<Stdin>,
) -> Result<(String, impl Stream<Item = ExecEvent> + Send + 'static), ApiError> {
    req.validate()?;
    let exec_id = new_exec_id();
    let first = ExecInput {
        kind: Some(exec_input::Kind::Start(ExecStart {
            exec_id: exec_id.clone(),
            argv: req.argv.clone(),
            env: req.env.clone().into_iter().collect(),
            cwd: req.cwd.clone().unwrap_or_default(),
            user: req.user.clone().unwrap_or_default(),
            timeout_ms: req.timeout_secs.map(|s| (s * 1000.0).ceil() as u64).unwrap_or(0),
        })),
    };
    // Split stdin so no gRPC message approaches the supervisor's message size limit.
    let rest = tokio_stream::wrappers::ReceiverStream::new(stdin).flat_map(|msg| {
        let kinds: Vec<exec_input::Kind> = match msg {
            Stdin::Data(d) => d.chunks(STDIN_CHUNK).map(|c| exec_input::Kind::Stdin(c.to_vec())).collect(),
            Stdin::Eof => vec![exec_input::Kind::StdinEof(StdinEof {})],
        };
        futures::stream::iter(kinds.into_iter().map(|kind| ExecInput { kind: Some(kind) }))
    });
    let input = futures::stream::iter([first]).chain(rest);
    // The call itself must be taken up promptly; what it runs may take as long as it takes.
    let output = crate::guest::within(live.guest.raw().exec(input)).await.map_err(ApiError::from_guest)?.into_inner();
    let events = output
        .map(|item| match item {
            Ok(out) => match out.kind {
                Some(exec_output::Kind::Started(s)) => Some(ExecEvent::Started { exec_id: String::new(), pid: s.pid }),
                Some(exec_output::Kind::Stdout(d)) => Some(ExecEvent::Stdout { data: B64.encode(d) }),
                Some(exec_output::Kind::Stderr(d)) => Some(ExecEvent::Stderr { data: B64.encode(d) }),
                Some(exec_output::Kind::Exited(e)) => Some(ExecEvent::Exit {
                    code: match e.status {
                        Some(exec_exited::Status::Code(c)) => Some(c),
                        _ => None,
                    },
                    signal: match e.status {
                        Some(exec_exited::Status::Signal(s)) => Some(s),
                        _ => None,
                    },
                    timed_out: e.timed_out,
                }),
                None => None,
            },
            Err(status) => Some(ExecEvent::Error { message: format!("guest: {}", status.message()) }),
        })
        .filter_map(futures::future::ready);
    let id = exec_id.clone();
    let events = events.map(move |ev| match ev {
        ExecEvent::Started { pid, .. } => ExecEvent::Started { exec_id: id.clone(), pid },
        other => other,
    });
    Ok((exec_id, events))
}

/// Runs a command and streams its output as NDJSON `ExecEvent`s, ending with `exit`.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", params(("id" = String, Path)), request_body = ExecRequest,
    responses(
        (status = 200, content_type = "application/x-ndjson", body = ExecEvent, description = "one event per line"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "sandbox not running")))]
pub async fn exec_post(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body)?;
    req.validate()?;
    let stdin_data = match &req.stdin {
        Some(b64) => Some(B64.decode(b64).map_err(|e| ApiError::invalid(format!("stdin is not valid base64: {e}")))?),
        None => None,
    };
    let live = state.manager.running(&id).await?;
    let busy = live.busy();
    let (tx, rx) = mpsc::channel(2);
    if let Some(data) = stdin_data {
        let _ = tx.send(Stdin::Data(data)).await;
    }
    let _ = tx.send(Stdin::Eof).await;
    let (_, events) = start(&live, &req, rx).await?;
    let body = events.map(move |ev| {
        // Held for as long as output flows: a running exec keeps the sandbox from idling.
        let _busy = &busy;
        let mut line = serde_json::to_vec(&ev).expect("event serialises");
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .expect("valid response"))
}

/// Interactive exec. The first text frame is an `ExecRequest` (without `stdin`); then the client
/// may send `{"type":"stdin","data":B64}`, `{"type":"stdin_eof"}` and `{"type":"signal","signal":N}`.
/// The server sends one `ExecEvent` per text frame and closes after `exit`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/exec/ws", params(("id" = String, Path)),
    responses((status = 101, description = "WebSocket upgrade"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn exec_ws(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let live = state.manager.running(&id).await?;
    Ok(ws.on_upgrade(move |socket| run_ws(socket, live)))
}

async fn send_event(socket: &mut WebSocket, ev: &ExecEvent) -> bool {
    let text = serde_json::to_string(ev).expect("event serialises");
    socket.send(Message::Text(text.into())).await.is_ok()
}

async fn run_ws(mut socket: WebSocket, live: Arc<Live>) {
    let _busy = live.busy();
    let req: ExecRequest = match socket.recv().await {
        Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
            Ok(req) => req,
            Err(e) => {
                send_event(&mut socket, &ExecEvent::Error { message: format!("invalid exec request: {e}") }).await;
                return;
            }
        },
        _ => return,
    };
    let (tx, rx) = mpsc::channel(16);
    let (exec_id, events) = match start(&live, &req, rx).await {
        Ok(started) => started,
        Err(e) => {
            send_event(&mut socket, &ExecEvent::Error { message: e.message }).await;
            return;
        }
    };
    let (mut sink, mut incoming) = socket.split();
    // Client messages are handled in their own task: waiting for the guest to take stdin must
    // never stop output from flowing the other way.
    let (problem_tx, mut problem_rx) = mpsc::channel::<String>(1);
    let mut reader = tokio::spawn(async move {
        let mut tx = Some(tx);
        while let Some(Ok(msg)) = incoming.next().await {
            let data = match msg {
                Message::Text(text) => match serde_json::from_str::<ExecClientMessage>(&text) {
                    Ok(ExecClientMessage::Stdin { data }) => match B64.decode(data) {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            let _ = problem_tx.send(format!("stdin is not valid base64: {e}")).await;
                            return;
                        }
                    },
                    Ok(ExecClientMessage::StdinEof) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(Stdin::Eof).await;
                        }
                        continue;
                    }
                    Ok(ExecClientMessage::Signal { signal }) => {
                        if let Err(e) = live.guest.signal(&exec_id, signal).await {
                            tracing::debug!(%exec_id, error = %e.message(), "signal failed");
                        }
                        continue;
                    }
                    Err(e) => {
                        let _ = problem_tx.send(format!("invalid message: {e}")).await;
                        return;
                    }
                },
                Message::Binary(bytes) => bytes.to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            if let Some(tx) = &tx {
                let _ = tx.send(Stdin::Data(data)).await;
            }
        }
        // The client went away: dropping `tx` and, below, the exec stream ends the process.
    });
    tokio::pin!(events);
    loop {
        tokio::select! {
            ev = events.next() => {
                let Some(ev) = ev else { break };
                let last = matches!(ev, ExecEvent::Exit { .. } | ExecEvent::Error { .. });
                let text = serde_json::to_string(&ev).expect("event serialises");
                if sink.send(Message::Text(text.into())).await.is_err() || last {
                    break;
                }
            }
            Some(problem) = problem_rx.recv() => {
                let text = serde_json::to_string(&ExecEvent::Error { message: problem }).expect("event serialises");
                let _ = sink.send(Message::Text(text.into())).await;
                break;
            }
        }
    }
    // A clean close: the client answers our Close with its own, and the reader consumes what it
    // sent meanwhile (stdin EOF, typically). Dropping the socket with that still unread would
    // make the kernel reset the connection, and the client could lose the exit event to it.
    let _ = sink.send(Message::Close(None)).await;
    if tokio::time::timeout(CLOSE_GRACE, &mut reader).await.is_err() {
        reader.abort();
    }
}

/// How long a finished exec's WebSocket waits for the client to acknowledge the close.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends a signal to a running exec's process group.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/execs/{exec_id}/signal",
    params(("id" = String, Path), ("exec_id" = String, Path)), request_body = SignalRequest,
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn signal(
    State(state): State<AppState>,
    Path((id, exec_id)): Path<(String, String)>,
    body: Result<Json<SignalRequest>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let req = json_body(body)?;
    let live = state.manager.running(&id).await?;
    live.guest.signal(&exec_id, req.signal).await.map_err(ApiError::from_guest)?;
    Ok(StatusCode::NO_CONTENT)
}
