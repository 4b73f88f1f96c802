//! Guest images: what a sandbox boots. An image is a directory named by the content hash of
//! everything that went into it (kernel package, initramfs recipe, root filesystem recipe, the
//! `torpor-guest` binary), holding `vmlinuz`, `initrd.img`, `rootfs.ext4` and `manifest.json`.
//! Building is idempotent: unchanged inputs find the existing directory and do nothing.

mod build;
mod initramfs;
mod store;

pub use build::DEFAULT_PACKAGES;
pub use build::{build, BuildOptions, Progress};
pub use store::{GuestImage, ImageStore, Manifest};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{tool} is not installed; run `apt-get install {package}`")]
    MissingTool { tool: &'static str, package: &'static str },
    #[error("no guest image for template {template:?} in {dir}; run `torpor image build`")]
    NotBuilt { template: String, dir: PathBuf },
    #[error("guest image {dir} is incomplete ({missing} is missing); run `torpor image build`")]
    Incomplete { dir: PathBuf, missing: &'static str },
    #[error("the torpor-guest binary was not found at {0}; build it with `cargo build -p torpor-guest` or pass --guest-binary")]
    GuestBinaryMissing(PathBuf),
    #[error("{what} failed ({status}): {output}")]
    Command { what: String, status: String, output: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading image manifest {path}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}
