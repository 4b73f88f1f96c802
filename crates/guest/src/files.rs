//! `ReadFile` and `WriteFile`. Writes land in a temporary file that is fsynced and renamed into
//! place, so a broken upload never leaves a half-written file behind.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{chown, Gid, Group, Uid, User};
use rand::Rng;
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};
use torpor_proto::supervisor::{
    read_file_output, write_file_input, FileInfo, ReadFileOutput, WriteFileHeader, WriteFileInput,
};

const CHUNK: usize = 256 * 1024;

pub type ReadStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<ReadFileOutput, Status>> + Send>>;

fn absolute(path: &str) -> Result<&Path, Status> {
    if path.is_empty() || !path.starts_with('/') {
        return Err(Status::invalid_argument(format!("path must be absolute, got {path:?}")));
    }
    Ok(Path::new(path))
}

fn io_status(context: &str, path: &Path, e: std::io::Error) -> Status {
    use std::io::ErrorKind::*;
    let msg = format!("{context} {}: {e}", path.display());
    match e.kind() {
        NotFound => Status::not_found(msg),
        PermissionDenied => Status::permission_denied(msg),
        IsADirectory | NotADirectory | InvalidFilename | ReadOnlyFilesystem | AlreadyExists => {
            Status::invalid_argument(msg)
        }
        StorageFull | QuotaExceeded | FileTooLarge => Status::resource_exhausted(msg),
        _ => Status::internal(msg),
    }
}

pub async fn read(path: &str) -> Result<ReadStream, Status> {
    let path = absolute(path)?.to_path_buf();
    // Check the type before opening: opening a FIFO would block forever.
    let meta = tokio::fs::metadata(&path).await.map_err(|e| io_status("reading metadata of", &path, e))?;
    if !meta.is_file() {
        return Err(Status::invalid_argument(format!("{} is not a regular file", path.display())));
    }
    let mut file = File::open(&path).await.map_err(|e| io_status("opening", &path, e))?;
    let (tx, rx) = mpsc::channel(8);
    let info = FileInfo { size: meta.len(), mode: meta.mode() & 0o7777 };
    tokio::spawn(async move {
        let _ = tx.send(Ok(ReadFileOutput { kind: Some(read_file_output::Kind::Info(info)) })).await;
        let mut buf = vec![0u8; CHUNK];
        loop {
            match file.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    let msg = ReadFileOutput { kind: Some(read_file_output::Kind::Data(buf[..n].to_vec())) };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(io_status("reading", &path, e))).await;
                    return;
                }
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

pub async fn write(mut input: Streaming<WriteFileInput>) -> Result<u64, Status> {
    let header = match input.next().await {
        Some(Ok(WriteFileInput { kind: Some(write_file_input::Kind::Header(h)) })) => h,
        Some(Err(e)) => return Err(e),
        _ => return Err(Status::invalid_argument("the first WriteFile message must be `header`")),
    };
    let path = absolute(&header.path)?.to_path_buf();
    let (uid, gid) = resolve_owner(&header.owner)?;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| Status::invalid_argument("cannot write to /"))?
        .to_path_buf();
    if header.create_parents {
        tokio::fs::create_dir_all(&parent).await.map_err(|e| io_status("creating", &parent, e))?;
    }
    let tmp = temp_name(&path);
    let result = write_to(&tmp, &header, uid, gid, &mut input).await;
    match result {
        Ok(written) => {
            tokio::fs::rename(&tmp, &path).await.map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io_status("renaming into", &path, e)
            })?;
            if let Ok(dir) = File::open(&parent).await {
                let _ = dir.sync_all().await;
            }
            Ok(written)
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

async fn write_to(
    tmp: &Path,
    header: &WriteFileHeader,
    uid: Uid,
    gid: Gid,
    input: &mut Streaming<WriteFileInput>,
) -> Result<u64, Status> {
    // Private until it is complete and has its final owner and mode.
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .await
        .map_err(|e| io_status("creating", tmp, e))?;
    let mut written = 0u64;
    while let Some(msg) = input.next().await {
        match msg?.kind {
            Some(write_file_input::Kind::Data(data)) => {
                file.write_all(&data).await.map_err(|e| io_status("writing", tmp, e))?;
                written += data.len() as u64;
            }
            Some(write_file_input::Kind::Abort(abort)) => {
                return Err(Status::aborted(format!("upload aborted by the host: {}", abort.reason)))
            }
            _ => return Err(Status::invalid_argument("only data may follow the WriteFile header")),
        }
    }
    file.sync_all().await.map_err(|e| io_status("syncing", tmp, e))?;
    // chown before chmod: chown clears setuid/setgid bits.
    chown(tmp, Some(uid), Some(gid)).map_err(|e| Status::internal(format!("chown {}: {e}", tmp.display())))?;
    let mode = if header.mode == 0 { 0o644 } else { header.mode & 0o7777 };
    tokio::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode))
        .await
        .map_err(|e| io_status("setting mode of", tmp, e))?;
    Ok(written)
}

fn temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let suffix: u64 = rand::thread_rng().gen();
    path.with_file_name(format!(".{name}.torpor-{suffix:016x}"))
}

/// Parses `user`, `user:group`, `uid` or `uid:gid`; empty means root.
fn resolve_owner(owner: &str) -> Result<(Uid, Gid), Status> {
    if owner.is_empty() {
        return Ok((Uid::from_raw(0), Gid::from_raw(0)));
    }
    let (user, group) = match owner.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (owner, None),
    };
    let bad = |what: &str| Status::invalid_argument(format!("unknown {what} in owner {owner:?}"));
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (Uid::from_raw(uid), Gid::from_raw(uid)),
        Err(_) => {
            let u = User::from_name(user).ok().flatten().ok_or_else(|| bad("user"))?;
            (u.uid, u.gid)
        }
    };
    let gid = match group {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => Gid::from_raw(gid),
            Err(_) => Group::from_name(g).ok().flatten().ok_or_else(|| bad("group"))?.gid,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_forms() {
        assert_eq!(resolve_owner("").unwrap(), (Uid::from_raw(0), Gid::from_raw(0)));
        assert_eq!(resolve_owner("1000").unwrap(), (Uid::from_raw(1000), Gid::from_raw(1000)));
        assert_eq!(resolve_owner("1000:5").unwrap(), (Uid::from_raw(1000), Gid::from_raw(5)));
        assert_eq!(resolve_owner("root:root").unwrap(), (Uid::from_raw(0), Gid::from_raw(0)));
        assert!(resolve_owner("no-such-user-xyz").is_err());
    }

    #[test]
    fn relative_paths_are_refused() {
        assert!(absolute("").is_err());
        assert!(absolute("etc/passwd").is_err());
        assert!(absolute("/etc/passwd").is_ok());
    }

    #[test]
    fn temp_file_sits_beside_the_target() {
        let tmp = temp_name(Path::new("/a/b/file.txt"));
        assert_eq!(tmp.parent(), Some(Path::new("/a/b")));
        assert!(tmp.file_name().unwrap().to_string_lossy().starts_with(".file.txt.torpor-"));
    }
}
