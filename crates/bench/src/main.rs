//! `torpor-bench`: Torpor's benchmarks, each printing numbers and ratios measured side by side in
//! one run. A binary of its own so that the product (`torpor`) ships none of this code nor the
//! lab's fakes; `torpor bench …` runs it when it is installed next to `torpor`.

mod coder;
mod common;
mod create;
mod credentials;
mod daemon;
mod lifecycle;
mod network;
mod soak;
mod wake;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "torpor-bench", version, about = "Torpor's benchmarks")]
struct Cli {
    /// URL of the Torpor daemon (benchmarks that use a running daemon).
    #[arg(long, global = true, env = "TORPOR_URL", default_value = "http://127.0.0.1:7070")]
    url: String,
    /// File holding the API key; by default $TORPOR_API_KEY, else the daemon's own key file.
    #[arg(long, global = true, env = "TORPOR_API_KEY_FILE", value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Create → first successful exec, exec round trip of `true`, VM memory per idle sandbox.
    Create {
        /// Sandboxes to create (one after another).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// `true` round trips per sandbox.
        #[arg(long, default_value_t = 20)]
        exec_runs: usize,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Print the raw samples as JSON too.
        #[arg(long)]
        json: bool,
    },
    /// Cold create, pause, resume → first exec (for 256 MiB and 2 GiB guests side by side),
    /// bytes on disk per paused sandbox, and host memory held by paused sandboxes.
    Lifecycle {
        /// Pause/resume cycles per guest size.
        #[arg(long, default_value_t = 10)]
        cycles: usize,
        /// Paused sandboxes to create for the host-memory measurement.
        #[arg(long, default_value_t = 50)]
        paused: usize,
    },
    /// What the egress policy costs: TCP connect latency and bulk throughput to an allowed host
    /// under `open` and `allowlist` side by side, and the sandbox resolver's answer latency.
    /// Builds its own lab network and runs a private daemon (needs root).
    Network {
        /// TCP connections to time per policy.
        #[arg(long, default_value_t = 200)]
        connects: usize,
        /// Size of each bulk download.
        #[arg(long, default_value_t = 64)]
        bulk_mib: u64,
        #[arg(long, default_value_t = 3)]
        bulk_runs: usize,
        /// DNS queries per kind (cached, first lookup, refused, direct); at most 200.
        #[arg(long, default_value_t = 100)]
        dns_queries: usize,
        /// Print the raw samples as JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// A Telegram message to a sandbox's agent: webhook → reply at Telegram, for a paused and a
    /// running sandbox side by side, and the share of the paused case spent resuming. Runs a
    /// private daemon and a fake Telegram (needs root).
    Wake {
        /// Messages per case.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// What the credential broker and model proxy cost: model calls through the proxy vs
    /// straight to the upstream (first byte and total, whole and streamed), and resume → first
    /// exec with no credentials, with credentials to push, and with a GitHub token to mint.
    /// Builds its own lab network with fake GitHub and Anthropic APIs and runs a private daemon
    /// (needs root).
    Credentials {
        /// Model calls per path and kind.
        #[arg(long, default_value_t = 100)]
        calls: usize,
        /// Words in each prompt (the fake answers with as many).
        #[arg(long, default_value_t = 50)]
        words: usize,
        /// Pause/resume cycles per kind.
        #[arg(long, default_value_t = 10)]
        cycles: usize,
    },
    /// Sandboxes of two sizes running code-churning work for N minutes: QEMU's own memory over
    /// time (it must plateau), out-of-memory kills (there must be none) and whether each is
    /// still running. Runs a private daemon (needs root).
    Soak {
        #[arg(long, default_value_t = 20)]
        minutes: u64,
        /// Guest memory of each sandbox, MiB (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "512,2048")]
        sizes: Vec<u32>,
        /// Template to create them from (its size wins over --sizes unless it is `base`).
        #[arg(long, default_value = "base")]
        template: String,
        /// Seconds between samples.
        #[arg(long, default_value_t = 30)]
        sample_secs: u64,
        /// Run with this TCG code cache instead of the default (to compare sizes).
        #[arg(long)]
        tcg_code_cache_mib: Option<u32>,
    },
    /// The `coder` template against a cold boot of the same disk with the same processes
    /// started by hand: request → Chromium's DevTools answers, request → the agent's first
    /// reply, memory and disk per sandbox. Runs a private daemon with a fake model API and
    /// builds the template in it first (minutes; needs root and the package registries).
    Coder {
        /// Sandboxes per side.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// A CA certificate (PEM) the template build trusts, as for `template build` (repeatable).
        #[arg(long = "ca-cert", value_name = "PEM")]
        ca_certs: Vec<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let client = || -> Result<torpor_client::Client> {
        let key = torpor_client::find_api_key(cli.api_key_file.as_deref())?;
        Ok(torpor_client::Client::new(&cli.url, key))
    };
    match cli.command {
        BenchCommand::Create { runs, exec_runs, vcpus, memory, json } => {
            create::run(&client()?, create::Params { runs, exec_runs, vcpus, memory, json }).await
        }
        BenchCommand::Lifecycle { cycles, paused } => lifecycle::run(&client()?, cycles, paused).await,
        BenchCommand::Network { connects, bulk_mib, bulk_runs, dns_queries, json } => {
            network::run(network::Params { connects, bulk_mib, bulk_runs, dns_queries, json }).await
        }
        BenchCommand::Wake { runs } => wake::run(runs).await,
        BenchCommand::Credentials { calls, words, cycles } => {
            credentials::run(credentials::Params { calls, words, cycles }).await
        }
        BenchCommand::Soak { minutes, sizes, template, sample_secs, tcg_code_cache_mib } => {
            soak::run(soak::Params { minutes, sizes, template, sample_secs, tcg_code_cache_mib }).await
        }
        BenchCommand::Coder { runs, ca_certs } => coder::run(coder::Params { runs, ca_certs }).await,
    }
}
