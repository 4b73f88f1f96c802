//! `torpor image build`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use torpor_image::{BuildOptions, ImageStore, Progress};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build the guest image (kernel, initramfs, Debian root filesystem with torpor-guest).
    /// Cached by content hash: running it again with the same inputs does nothing.
    Build {
        /// Template to build (only `base` exists today).
        #[arg(long, default_value = "base")]
        template: String,
        /// The guest supervisor binary to install; default: `torpor-guest` beside this executable.
        #[arg(long)]
        guest_binary: Option<PathBuf>,
        /// Where images live; default $TORPOR_IMAGES or /var/cache/torpor/images.
        #[arg(long)]
        image_dir: Option<PathBuf>,
        /// Debian mirror for the root filesystem.
        #[arg(long, default_value = "http://deb.debian.org/debian")]
        mirror: String,
        /// Size of the guest's root disk in MiB (sparse).
        #[arg(long, default_value_t = 4096)]
        disk_size_mib: u64,
    },
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn stage(&self, index: usize, total: usize, message: &str) {
        self.0.set_length(total as u64);
        self.0.set_position(index as u64 - 1);
        self.0.set_prefix(format!("[{index}/{total}]"));
        self.0.set_message(message.to_owned());
    }
    fn detail(&self, line: &str) {
        let line: String = line.chars().take(70).collect();
        self.0.set_message(line);
    }
}

pub fn run(cmd: ImageCommand) -> Result<()> {
    let ImageCommand::Build { template, guest_binary, image_dir, mirror, disk_size_mib } = cmd;
    let guest_binary = match guest_binary {
        Some(p) => p,
        None => std::env::current_exe().context("locating this executable")?.with_file_name("torpor-guest"),
    };
    let store = ImageStore::new(image_dir.unwrap_or_else(torpor_control::config::default_image_dir));
    let mut opts = BuildOptions::new(guest_binary);
    opts.mirror = mirror;
    opts.disk_size_mib = disk_size_mib;
    let bar = ProgressBar::new(4);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{elapsed_precise}] {wide_msg}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let result = torpor_image::build(&store, &template, &opts, &Bar(bar.clone()));
    bar.finish_and_clear();
    let (image, built) = result?;
    let verb = if built { "built" } else { "up to date:" };
    println!(
        "{verb} {} (kernel {} {})",
        image.dir.display(),
        image.manifest.kernel_package,
        image.manifest.kernel_version
    );
    Ok(())
}
