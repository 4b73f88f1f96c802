//! Where a template file and the files it names come from: a directory on the host, or the
//! templates shipped inside the binary.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The templates that ship inside this binary, each a directory with `template.toml`.
static SHIPPED: include_dir::Dir = include_dir::include_dir!("$CARGO_MANIFEST_DIR/../../templates");

/// Where a template file and the files it names come from.
pub enum Origin {
    File { path: PathBuf, text: String },
    Shipped { name: String, dir: &'static include_dir::Dir<'static>, text: String },
}

impl Origin {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Origin::File { path: path.to_owned(), text })
    }

    pub fn shipped(name: &str) -> Result<Self> {
        let dir = SHIPPED.get_dir(name).filter(|d| d.get_file(d.path().join("template.toml")).is_some());
        let Some(dir) = dir else {
            let names: Vec<String> = SHIPPED.dirs().map(|d| d.path().display().to_string()).collect::<Vec<_>>();
            bail!(
                "no template file given (-f FILE) and no template called {name:?} ships with torpor; shipped: {}",
                names.join(", ")
            );
        };
        let file = dir.get_file(dir.path().join("template.toml")).expect("checked above");
        let text = file.contents_utf8().context("shipped template.toml is not UTF-8")?.to_owned();
        Ok(Origin::Shipped { name: name.to_owned(), dir, text })
    }

    pub fn text(&self) -> &str {
        match self {
            Origin::File { text, .. } | Origin::Shipped { text, .. } => text,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Origin::File { path, .. } => path.display().to_string(),
            Origin::Shipped { name, .. } => format!("the shipped template {name}"),
        }
    }

    /// A `source` file, relative to the template file.
    pub fn read(&self, source: &Path) -> Result<Vec<u8>> {
        match self {
            Origin::File { path, .. } => {
                // Resolved first: a symlink in a shared template directory must not lead out of it
                // (`template build` runs as root).
                let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
                let full = dir.join(source);
                // Opened first, then asked where it really is: no symlink swapped in between
                // can lead the read elsewhere.
                let mut file = std::fs::File::open(&full).with_context(|| format!("reading {}", full.display()))?;
                let real = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)))
                    .with_context(|| format!("resolving {}", full.display()))?;
                if !real.starts_with(&dir) {
                    bail!("{} leads to {}, outside the template's directory", full.display(), real.display());
                }
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut file, &mut data)
                    .with_context(|| format!("reading {}", full.display()))?;
                Ok(data)
            }
            Origin::Shipped { name, dir, .. } => dir
                .get_file(dir.path().join(source))
                .map(|f| f.contents().to_vec())
                .with_context(|| format!("the shipped template {name} has no file {}", source.display())),
        }
    }
}
