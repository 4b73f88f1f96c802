//! `torpor bench …`: the benchmarks live in their own binary, `torpor-bench`, so that the
//! product ships none of their code nor the lab's fakes. This runs it in place of `torpor`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// `torpor-bench` next to this binary, else on the PATH.
fn bench_binary() -> PathBuf {
    let sibling = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("torpor-bench")));
    sibling.filter(|p| p.is_file()).unwrap_or_else(|| "torpor-bench".into())
}

/// Replaces this process with `torpor-bench ARGS`; returns only if that fails.
pub fn run(args: &[OsString], url: &str, api_key_file: Option<&Path>) -> anyhow::Error {
    let binary = bench_binary();
    let mut cmd = std::process::Command::new(&binary);
    cmd.args(args).env("TORPOR_URL", url);
    if let Some(file) = api_key_file {
        cmd.env("TORPOR_API_KEY_FILE", file);
    }
    let e = cmd.exec();
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "the benchmarks are not installed: `torpor-bench` is neither next to torpor nor on the PATH \
             (scripts/install.sh installs it; from a checkout: cargo build --release -p torpor-bench)"
        )
    } else {
        anyhow::anyhow!("running {}: {e}", binary.display())
    }
}
