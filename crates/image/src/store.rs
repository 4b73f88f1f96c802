//! Where images live and how the daemon finds the current one for a template.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{io, ImageError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub hash: String,
    pub kernel_package: String,
    pub kernel_version: String,
    pub suite: String,
    pub packages: Vec<String>,
    pub guest_sha256: String,
    pub disk_size_mib: u64,
    pub built_at_unix: u64,
}

#[derive(Debug, Clone)]
pub struct GuestImage {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl GuestImage {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }

    fn check(&self) -> Result<(), ImageError> {
        for (path, name) in [(self.kernel(), "vmlinuz"), (self.initrd(), "initrd.img"), (self.rootfs(), "rootfs.ext4")]
        {
            if !path.is_file() {
                return Err(ImageError::Incomplete { dir: self.dir.clone(), missing: name });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn pointer(&self, template: &str) -> PathBuf {
        self.root.join(format!("{template}.current"))
    }

    /// The image a new sandbox of `template` boots.
    pub fn current(&self, template: &str) -> Result<GuestImage, ImageError> {
        let pointer = self.pointer(template);
        let name = match std::fs::read_to_string(&pointer) {
            Ok(name) => name.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NotBuilt { template: template.to_owned(), dir: self.root.clone() })
            }
            Err(e) => return Err(io(format!("reading {}", pointer.display()))(e)),
        };
        self.open(&self.root.join(name))
    }

    pub fn open(&self, dir: &Path) -> Result<GuestImage, ImageError> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|_| ImageError::Incomplete { dir: dir.to_path_buf(), missing: "manifest.json" })?;
        let manifest = serde_json::from_str(&text).map_err(|source| ImageError::Manifest { path, source })?;
        let image = GuestImage { dir: dir.to_path_buf(), manifest };
        image.check()?;
        Ok(image)
    }
}

/// Writes `contents` to `path` atomically: temp file, fsync, rename, fsync the directory.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), ImageError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(format!("creating a file in {}", dir.display())))?;
    tmp.write_all(contents).map_err(io(format!("writing {}", path.display())))?;
    tmp.as_file().sync_all().map_err(io(format!("syncing {}", path.display())))?;
    tmp.persist(path).map_err(|e| io(format!("renaming into {}", path.display()))(e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_image_says_what_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageStore::new(dir.path()).current("base").unwrap_err();
        assert!(err.to_string().contains("torpor image build"), "{err}");
    }

    #[test]
    fn incomplete_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path());
        let img = dir.path().join("base-abc");
        std::fs::create_dir(&img).unwrap();
        let manifest = Manifest {
            format: 1,
            hash: "abc".into(),
            kernel_package: "k".into(),
            kernel_version: "1".into(),
            suite: "bookworm".into(),
            packages: vec![],
            guest_sha256: "x".into(),
            disk_size_mib: 1,
            built_at_unix: 0,
        };
        std::fs::write(img.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
        write_atomic(&store.pointer("base"), b"base-abc\n").unwrap();
        let err = store.current("base").unwrap_err();
        assert!(matches!(err, ImageError::Incomplete { missing: "vmlinuz", .. }), "{err}");
        for f in ["vmlinuz", "initrd.img", "rootfs.ext4"] {
            std::fs::write(img.join(f), b"x").unwrap();
        }
        assert_eq!(store.current("base").unwrap().manifest, manifest);
    }
}
