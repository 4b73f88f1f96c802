//! Just enough of the QEMU Machine Protocol: JSON lines over a unix socket, a greeting, capability
//! negotiation, then one command at a time. Asynchronous events are skipped.
//!
//! The peer is a process the guest may have taken over, so it is given a deadline for every
//! answer and a bound on every line: it can fail an operation, never hang the daemon or grow
//! its memory.

use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::EngineError;

/// Connecting and the greeting.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Every command's answer (the long operations, migration, are polled with short commands).
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest message accepted; QMP's answers to our commands are a few hundred bytes.
const MAX_LINE: u64 = 1 << 20;

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

fn err(msg: impl std::fmt::Display) -> EngineError {
    EngineError::Qmp(msg.to_string())
}

impl Qmp {
    pub async fn connect(path: &Path) -> Result<Self, EngineError> {
        let greeted = async {
            let stream =
                UnixStream::connect(path).await.map_err(|e| err(format!("connecting to {}: {e}", path.display())))?;
            let (read, writer) = stream.into_split();
            let mut qmp = Self { reader: BufReader::new(read), writer };
            let greeting = qmp.read_message().await?;
            if greeting.get("QMP").is_none() {
                return Err(err(format!("unexpected greeting {}", truncated(&greeting.to_string()))));
            }
            Ok(qmp)
        };
        let mut qmp = tokio::time::timeout(CONNECT_TIMEOUT, greeted)
            .await
            .map_err(|_| err(format!("no greeting on {} within {} s", path.display(), CONNECT_TIMEOUT.as_secs())))??;
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, EngineError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| err(format!("reading: {e}")))?;
        if n == 0 {
            return Err(err("connection closed by QEMU"));
        }
        if line.last() != Some(&b'\n') && n as u64 == MAX_LINE {
            return Err(err(format!("a message longer than {MAX_LINE} bytes")));
        }
        serde_json::from_slice(&line)
            .map_err(|e| err(format!("invalid JSON {:?}: {e}", truncated(&String::from_utf8_lossy(&line)))))
    }

    /// Hands QEMU an open descriptor under `name` (`getfd`): the jailed VM cannot open our
    /// files, and its seccomp filter forbids the `exec:` migration transport.
    pub async fn send_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), EngineError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;
        let line = format!("{}\n", json!({ "execute": "getfd", "arguments": { "fdname": name } }));
        let raw = [fd.as_raw_fd()];
        let stream = self.writer.as_ref();
        loop {
            stream.writable().await.map_err(|e| err(format!("waiting to write: {e}")))?;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                let cmsg = [ControlMessage::ScmRights(&raw)];
                sendmsg::<UnixAddr>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(line.as_bytes())],
                    &cmsg,
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) if n == line.len() => break,
                Ok(n) => return Err(err(format!("getfd: short write ({n} of {} bytes)", line.len()))),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(err(format!("getfd: {e}"))),
            }
        }
        let answered = async {
            loop {
                let msg = self.read_message().await?;
                if msg.get("return").is_some() {
                    return Ok(());
                }
                if let Some(error) = msg.get("error") {
                    return Err(err(format!("getfd: {}", error["desc"].as_str().unwrap_or("unknown error"))));
                }
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, answered)
            .await
            .map_err(|_| err(format!("getfd: no answer within {} s", COMMAND_TIMEOUT.as_secs())))?
    }

    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, EngineError> {
        tokio::time::timeout(COMMAND_TIMEOUT, self.execute_now(command, arguments))
            .await
            .map_err(|_| err(format!("{command}: no answer within {} s", COMMAND_TIMEOUT.as_secs())))?
    }

    async fn execute_now(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, EngineError> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await.map_err(|e| err(format!("writing: {e}")))?;
        loop {
            let msg = self.read_message().await?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(error) = msg.get("error") {
                return Err(err(format!("{command}: {}", error["desc"].as_str().unwrap_or("unknown error"))));
            }
            // Anything else is an event; keep reading.
        }
    }
}

/// A peer's text in an error message: a bounded piece of it.
fn truncated(s: &str) -> &str {
    crate::logs::cut(s, 200)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    async fn serve(listener: UnixListener, script: &'static [u8]) {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(script).await.unwrap();
        // Holds the connection open and silent.
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    }

    #[tokio::test]
    async fn a_peer_that_never_greets_fails_the_connect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        tokio::spawn(serve(UnixListener::bind(&path).unwrap(), b""));
        let e = Qmp::connect(&path).await.err().expect("connected to a silent peer");
        assert!(e.to_string().contains("no greeting"), "{e}");
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_fails_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        tokio::spawn(serve(UnixListener::bind(&path).unwrap(), b"{\"QMP\": {}}\n{\"return\": {}}\n"));
        let mut qmp = Qmp::connect(&path).await.unwrap();
        let e = qmp.execute("query-status", None).await.unwrap_err();
        assert!(e.to_string().contains("no answer"), "{e}");
    }

    #[tokio::test]
    async fn an_endless_line_is_refused_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let chunk = vec![b'x'; 64 << 10];
            // 64 MiB without a newline, unless the reader gives up first.
            for _ in 0..1024 {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let e = Qmp::connect(&path).await.err().expect("accepted an endless greeting");
        assert!(e.to_string().contains("longer than"), "{e}");
    }
}
