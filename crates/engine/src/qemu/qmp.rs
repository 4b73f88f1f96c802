//! Just enough of the QEMU Machine Protocol: JSON lines over a unix socket, a greeting, capability
//! negotiation, then one command at a time. Asynchronous events are skipped.

use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::EngineError;

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

fn err(msg: impl std::fmt::Display) -> EngineError {
    EngineError::Qmp(msg.to_string())
}

impl Qmp {
    pub async fn connect(path: &Path) -> Result<Self, EngineError> {
        let stream =
            UnixStream::connect(path).await.map_err(|e| err(format!("connecting to {}: {e}", path.display())))?;
        let (read, writer) = stream.into_split();
        let mut qmp = Self { reader: BufReader::new(read), writer };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, EngineError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).await.map_err(|e| err(format!("reading: {e}")))?;
        if n == 0 {
            return Err(err("connection closed by QEMU"));
        }
        serde_json::from_str(&line).map_err(|e| err(format!("invalid JSON {line:?}: {e}")))
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
        loop {
            let msg = self.read_message().await?;
            if msg.get("return").is_some() {
                return Ok(());
            }
            if let Some(error) = msg.get("error") {
                return Err(err(format!("getfd: {}", error["desc"].as_str().unwrap_or("unknown error"))));
            }
        }
    }

    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, EngineError> {
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
