//! `torpor sandbox exec`: a WebSocket session that forwards stdin and Ctrl-C and mirrors the
//! command's stdout, stderr and exit code.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tokio::io::AsyncReadExt;
use torpor_api::{ExecEvent, ExecRequest};
use torpor_client::{Client, ExecSession};

/// Exit code for failures of Torpor itself (not of the command), as `docker exec` uses.
const TORPOR_FAILURE: u8 = 125;

pub async fn interactive(client: &Client, id: &str, req: &ExecRequest) -> Result<ExitCode> {
    let ExecSession { mut input, mut events } = client.exec_session(id, req).await?;

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
            event = events.next() => {
                match event? {
                    None => bail!("the exec session closed without an exit status"),
                    Some(ExecEvent::Started { .. }) => {}
                    Some(ExecEvent::Stdout { data }) => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&B64.decode(data)?)?;
                        out.flush()?;
                    }
                    Some(ExecEvent::Stderr { data }) => {
                        let mut err = std::io::stderr().lock();
                        err.write_all(&B64.decode(data)?)?;
                        err.flush()?;
                    }
                    Some(ExecEvent::Exit { code, signal, timed_out }) => {
                        input.close().await;
                        return Ok(ExitCode::from(exit_code(code, signal, timed_out)));
                    }
                    Some(ExecEvent::Error { message }) => {
                        eprintln!("error: {message}");
                        return Ok(ExitCode::from(TORPOR_FAILURE));
                    }
                }
            }
            chunk = stdin_rx.recv(), if stdin_open => {
                match chunk.flatten() {
                    Some(data) => input.stdin(&data).await?,
                    None => {
                        stdin_open = false;
                        input.close_stdin().await?;
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => input.signal(libc::SIGINT).await?,
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
