//! File transfer: `PUT …/files?path=` uploads the request body, `GET …/files?path=` downloads.
//! Both stream; both refuse files over `max_file_bytes` with 413 and leave nothing behind.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use torpor_proto::supervisor::{
    read_file_output, write_file_input, ReadFileRequest, WriteAbort, WriteFileHeader, WriteFileInput,
};

use super::AppState;
use crate::error::{ApiError, ErrorBody};
use torpor_api::validate_guest_path;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    /// Absolute path in the guest.
    pub path: String,
    /// Octal permission bits, e.g. `755`; default `644`.
    pub mode: Option<String>,
    /// `user`, `user:group`, `uid` or `uid:gid`; default root.
    pub owner: Option<String>,
    /// Create missing parent directories (default true).
    pub parents: Option<bool>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DownloadParams {
    /// Absolute path in the guest.
    pub path: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Uploaded {
    pub path: String,
    pub bytes: u64,
}

fn parse_mode(mode: Option<&str>) -> Result<u32, ApiError> {
    match mode {
        None => Ok(0o644),
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|v| *v <= 0o7777)
            .ok_or_else(|| ApiError::invalid(format!("mode must be octal permission bits such as 644, got {m:?}"))),
    }
}

/// How much of a refused upload is read before answering.
const REFUSED_BODY_DRAIN: usize = 8 << 20;

fn too_large(limit: u64) -> ApiError {
    ApiError::too_large(format!("file is larger than the limit of {limit} bytes (max_file_bytes)"))
}

/// Writes the request body to a file in the guest, atomically.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", params(("id" = String, Path), UploadParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = Uploaded), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody)))]
pub async fn upload(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<UploadParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Uploaded>, ApiError> {
    validate_guest_path(&params.path)?;
    if params.path.ends_with('/') {
        return Err(ApiError::invalid(format!("{:?} names a directory; give the file's full path", params.path)));
    }
    let mode = parse_mode(params.mode.as_deref())?;
    let limit = state.manager.cfg.max_file_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        // Read (and drop) a bounded part of the body first: a client still sending when the
        // connection closes sees a broken pipe instead of this answer.
        let mut stream = body.into_data_stream();
        let mut drained = 0usize;
        while drained < REFUSED_BODY_DRAIN {
            match stream.next().await {
                Some(Ok(chunk)) => drained += chunk.len(),
                _ => break,
            }
        }
        return Err(too_large(limit));
    }
    let live = state.manager.running(&id).await?;
    let _busy = live.busy();

    let (tx, rx) = mpsc::channel::<WriteFileInput>(4);
    let header = WriteFileHeader {
        path: params.path.clone(),
        mode,
        owner: params.owner.clone().unwrap_or_default(),
        create_parents: params.parents.unwrap_or(true),
    };
    tx.send(WriteFileInput { kind: Some(write_file_input::Kind::Header(header)) }).await.expect("receiver alive");
    let forward = async move {
        let mut stream = body.into_data_stream();
        let mut total = 0u64;
        let abort = |reason: &str| WriteFileInput {
            kind: Some(write_file_input::Kind::Abort(WriteAbort { reason: reason.into() })),
        };
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(abort("the upload was interrupted")).await;
                    return Err(ApiError::invalid(format!("reading the upload: {e}")));
                }
            };
            total += chunk.len() as u64;
            if total > limit {
                // An explicit abort, not just the end of the stream: the guest must discard it.
                let _ = tx.send(abort("over the size limit")).await;
                return Err(too_large(limit));
            }
            if tx.send(WriteFileInput { kind: Some(write_file_input::Kind::Data(chunk.to_vec())) }).await.is_err() {
                break;
            }
        }
        Ok(())
    };
    let mut client = live.guest.raw();
    let write = client.write_file(tokio_stream::wrappers::ReceiverStream::new(rx));
    // The upload takes as long as the client sends; once all of it is handed over, the guest
    // must confirm within the usual deadline.
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
    let forward = async move {
        let result = forward.await;
        let _ = sent_tx.send(());
        result
    };
    let confirmed = async move {
        tokio::pin!(write);
        tokio::select! {
            written = &mut write => written,
            _ = async { let _ = sent_rx.await; tokio::time::sleep(crate::guest::CALL_TIMEOUT).await } => {
                Err(tonic::Status::deadline_exceeded("the guest did not confirm the file"))
            }
        }
    };
    let (forwarded, written) = tokio::join!(forward, confirmed);
    forwarded?;
    let written = written.map_err(ApiError::from_guest)?.into_inner();
    Ok(Json(Uploaded { path: params.path, bytes: written.bytes_written }))
}

/// Streams a file from the guest.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", params(("id" = String, Path), DownloadParams),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>,
        description = "the file; `x-torpor-mode` carries its permission bits in octal"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn download(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<DownloadParams>,
) -> Result<Response, ApiError> {
    validate_guest_path(&params.path)?;
    let limit = state.manager.cfg.max_file_bytes;
    let live = state.manager.running(&id).await?;
    let mut stream = crate::guest::within(live.guest.raw().read_file(ReadFileRequest { path: params.path.clone() }))
        .await
        .map_err(ApiError::from_guest)?
        .into_inner();
    let first = tokio::time::timeout(crate::guest::CALL_TIMEOUT, stream.next())
        .await
        .map_err(|_| ApiError::new(StatusCode::GATEWAY_TIMEOUT, "the guest did not start sending the file"))?;
    let info = match first {
        Some(Ok(msg)) => match msg.kind {
            Some(read_file_output::Kind::Info(info)) => info,
            _ => return Err(ApiError::internal("guest sent data before file info")),
        },
        Some(Err(status)) => return Err(ApiError::from_guest(status)),
        None => return Err(ApiError::internal("guest closed the stream before sending file info")),
    };
    if info.size > limit {
        return Err(too_large(limit));
    }
    // No Content-Length: a file's size can change while it is read, and /proc files report 0.
    // The limit is enforced on the bytes that actually flow.
    let mut sent = 0u64;
    let busy = live.busy();
    let body = stream.map(move |msg| match msg {
        Ok(m) => match m.kind {
            Some(read_file_output::Kind::Data(d)) => {
                let _busy = &busy;
                sent += d.len() as u64;
                if sent > limit {
                    return Err(std::io::Error::other(format!("file grew past the limit of {limit} bytes")));
                }
                Ok(Bytes::from(d))
            }
            _ => Ok(Bytes::new()),
        },
        Err(status) => Err(std::io::Error::other(status.message().to_owned())),
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        // Permission bits only: what a hostile guest reports must not set setuid, setgid or
        // sticky bits on anyone's copy.
        .header("x-torpor-mode", format!("{:o}", info.mode & 0o777))
        .body(Body::from_stream(body))
        .expect("valid response"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn modes_are_octal() {
        assert_eq!(super::parse_mode(None).unwrap(), 0o644);
        assert_eq!(super::parse_mode(Some("755")).unwrap(), 0o755);
        assert!(super::parse_mode(Some("9")).is_err());
        assert!(super::parse_mode(Some("77777")).is_err());
    }
}
