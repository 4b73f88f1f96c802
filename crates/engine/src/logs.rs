//! What a VM process writes that the guest controls, kept with a bound: the guest's serial
//! console, and QEMU's own output (a guest can make QEMU complain in a loop). Each goes into a
//! FIFO in the run directory, and the daemon copies what arrives into `<name>.log`, starting it
//! afresh (the previous one kept as `<name>.log.1`) whenever it reaches `LOG_BYTES`. Reading it
//! back for an error message takes only its last few KiB.
//!
//! The FIFO outlives the daemon: after a restart the reader attaches again, and meanwhile QEMU's
//! writes fail (no reader; QEMU ignores SIGPIPE) instead of blocking the guest.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::{io, EngineError};

/// Largest size of each of the two files of a log.
pub const LOG_BYTES: u64 = 512 << 10;
/// What `tail` returns at most, whatever was written.
pub const TAIL_BYTES: usize = 4 << 10;
/// Longest line `tail` keeps (the rest of it is cut).
const TAIL_LINE_BYTES: usize = 512;
/// How far back from the end `tail` looks.
const TAIL_WINDOW: u64 = 64 << 10;

/// One bounded log of a VM, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Log(&'static str);

/// The guest's serial console.
pub const CONSOLE: Log = Log("console");
/// QEMU's own standard output and error.
pub const VMM: Log = Log("qemu");

impl Log {
    pub fn path(self, run_dir: &Path) -> PathBuf {
        run_dir.join(format!("{}.log", self.0))
    }

    fn previous(self, run_dir: &Path) -> PathBuf {
        run_dir.join(format!("{}.log.1", self.0))
    }

    fn fifo(self, run_dir: &Path) -> PathBuf {
        run_dir.join(format!("{}.fifo", self.0))
    }

    /// Makes the FIFO if needed, starts the reader and returns the write end for QEMU, with the
    /// reader's task (it ends when every writer is gone). The reader is opened first, so opening
    /// the writer does not wait, and the reader cannot see an end of file before it exists.
    pub fn open_writer(self, run_dir: &Path) -> Result<(OwnedFd, tokio::task::JoinHandle<()>), EngineError> {
        let fifo = self.fifo(run_dir);
        match nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => {
                return Err(EngineError::Io { context: format!("creating {}", fifo.display()), source: e.into() })
            }
        }
        let receiver = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&fifo)
            .map_err(io(format!("opening {} for reading", fifo.display())))?;
        let writer =
            std::fs::OpenOptions::new().write(true).open(&fifo).map_err(io(format!("opening {}", fifo.display())))?;
        let reader = tokio::spawn(self.copy(receiver, run_dir.to_path_buf()));
        Ok((writer.into(), reader))
    }

    /// After a daemon restart: reads the log of a VM that is already running. One started by an
    /// earlier version writes its files itself (no FIFO): nothing to attach.
    pub fn reattach(self, run_dir: &Path) -> Result<(), EngineError> {
        let fifo = self.fifo(run_dir);
        if !fifo.exists() {
            return Ok(());
        }
        let receiver = tokio::net::unix::pipe::OpenOptions::new()
            .open_receiver(&fifo)
            .map_err(io(format!("opening {} for reading", fifo.display())))?;
        tokio::spawn(self.copy(receiver, run_dir.to_path_buf()));
        Ok(())
    }

    /// The last `lines` lines, for error messages: at most `TAIL_BYTES`, each line cut at
    /// `TAIL_LINE_BYTES`, read from the last `TAIL_WINDOW` of the log only.
    pub fn tail(self, run_dir: &Path, lines: usize) -> String {
        let mut text = end_of(&self.previous(run_dir), TAIL_WINDOW);
        text.extend(end_of(&self.path(run_dir), TAIL_WINDOW));
        let text = String::from_utf8_lossy(&text);
        let mut kept: Vec<&str> = text.lines().rev().take(lines).collect();
        kept.reverse();
        let mut out = String::new();
        for line in kept {
            let line = cut(line, TAIL_LINE_BYTES);
            if out.len() + line.len() + 1 > TAIL_BYTES {
                break;
            }
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(line);
        }
        out
    }

    /// Until every writer is gone (QEMU exited): what arrives, into the log, within its bound.
    async fn copy(self, mut receiver: tokio::net::unix::pipe::Receiver, run_dir: PathBuf) {
        use tokio::io::AsyncReadExt;
        let mut file = LogFile::open(self, &run_dir);
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match receiver.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => file.append(&buf[..n]),
                Err(e) => {
                    tracing::debug!(run_dir = %run_dir.display(), log = self.0, error = %e, "log reader stopped");
                    return;
                }
            }
        }
    }
}

/// A log's file, rotated at `LOG_BYTES`. Failures to write are dropped output, not errors: the
/// logs are for people, and a full disk must not stop the guest.
struct LogFile {
    log: Log,
    run_dir: PathBuf,
    file: Option<std::fs::File>,
    len: u64,
}

impl LogFile {
    fn open(log: Log, run_dir: &Path) -> Self {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log.path(run_dir)).ok();
        let len = file.as_ref().and_then(|f| f.metadata().ok()).map(|m| m.len()).unwrap_or(0);
        Self { log, run_dir: run_dir.to_path_buf(), file, len }
    }

    fn append(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.len >= LOG_BYTES {
                let _ = std::fs::rename(self.log.path(&self.run_dir), self.log.previous(&self.run_dir));
                self.file =
                    std::fs::OpenOptions::new().create(true).append(true).open(self.log.path(&self.run_dir)).ok();
                self.len = 0;
            }
            let room = (LOG_BYTES - self.len) as usize;
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            if let Some(file) = &mut self.file {
                let _ = file.write_all(now);
            }
            self.len += now.len() as u64;
            bytes = rest;
        }
    }
}

/// Up to the last `window` bytes of a file (nothing if it is missing).
fn end_of(path: &Path, window: u64) -> Vec<u8> {
    let Ok(mut file) = std::fs::File::open(path) else { return Vec::new() };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file.seek(SeekFrom::Start(len.saturating_sub(window))).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::with_capacity(window.min(len) as usize);
    let _ = file.take(window).read_to_end(&mut bytes);
    bytes
}

/// `s` cut to at most `max` bytes, on a character boundary (for whatever text from outside is
/// kept or shown: logs, agents' answers, error messages).
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_of_a_huge_sparse_log_is_small_and_quick() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(CONSOLE.path(dir.path())).unwrap();
        file.set_len(8 << 30).unwrap();
        let tail = CONSOLE.tail(dir.path(), 20);
        assert!(tail.len() <= TAIL_BYTES, "{} bytes", tail.len());
    }

    #[test]
    fn tail_of_newlines_and_of_one_endless_line_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(CONSOLE.path(dir.path()), vec![b'\n'; 32 << 20]).unwrap();
        assert!(CONSOLE.tail(dir.path(), 20).len() <= TAIL_BYTES);
        std::fs::write(CONSOLE.path(dir.path()), vec![b'x'; 32 << 20]).unwrap();
        let t = CONSOLE.tail(dir.path(), 5);
        assert_eq!(t.len(), TAIL_LINE_BYTES, "one line, cut");
        std::fs::write(CONSOLE.path(dir.path()), "boot\nok\npanic: here\n").unwrap();
        assert_eq!(CONSOLE.tail(dir.path(), 2), "ok\npanic: here");
    }

    #[test]
    fn text_is_cut_on_a_character_boundary() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("hi", 10), "hi");
    }

    #[test]
    fn the_log_rotates_at_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogFile::open(CONSOLE, dir.path());
        for _ in 0..5 {
            log.append(&vec![b'y'; LOG_BYTES as usize / 2 + 7]);
        }
        let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(CONSOLE.path(dir.path())) <= LOG_BYTES);
        assert_eq!(size(CONSOLE.previous(dir.path())), LOG_BYTES);
    }

    #[tokio::test]
    async fn what_qemu_writes_reaches_its_log_and_no_more_than_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, _reader) = VMM.open_writer(dir.path()).unwrap();
        let mut writer = std::fs::File::from(writer);
        let chunk = vec![b'z'; 64 << 10];
        let written = tokio::task::spawn_blocking(move || {
            for _ in 0..64 {
                writer.write_all(&chunk).unwrap();
            }
            writer.write_all(b"\nlast line\n").unwrap();
        });
        written.await.unwrap();
        let log = VMM.path(dir.path());
        for _ in 0..500 {
            if VMM.tail(dir.path(), 1) == "last line" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(VMM.tail(dir.path(), 1), "last line");
        let total = std::fs::metadata(&log).unwrap().len() + std::fs::metadata(VMM.previous(dir.path())).unwrap().len();
        assert!(total <= 2 * LOG_BYTES, "4 MiB written, {total} bytes kept");
    }
}
