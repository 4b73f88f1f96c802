//! Files the daemon keeps for itself: private (0600) and written atomically.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `contents` to `path` with mode 0600 via a temp file, fsync and rename.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The API key, created on first start.
pub fn load_or_create_api_key(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("api-key");
    match std::fs::read_to_string(&path) {
        Ok(key) if !key.trim().is_empty() => return Ok(key.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    let key = format!("tp_{}", hex::encode(bytes));
    write_private(&path, format!("{key}\n").as_bytes())?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn api_key_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let key = super::load_or_create_api_key(dir.path()).unwrap();
        assert!(key.starts_with("tp_") && key.len() == 67);
        let mode = std::fs::metadata(dir.path().join("api-key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(super::load_or_create_api_key(dir.path()).unwrap(), key);
    }
}
