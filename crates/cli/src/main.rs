//! `torpor`: the daemon (`torpor server`) and the command-line client for everything else.

mod bench;
mod channel;
mod client;
mod cp;
mod doctor;
mod exec;
mod grants;
mod image;
mod network;
mod sandbox;
mod template;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "torpor", version, about = "microVM sandboxes for AI agents", propagate_version = true)]
struct Cli {
    /// URL of the Torpor daemon.
    #[arg(long, global = true, env = "TORPOR_URL", default_value = "http://127.0.0.1:7070")]
    url: String,
    /// File holding the API key; by default $TORPOR_API_KEY if set, else
    /// $TORPOR_HOME/api-key (/var/lib/torpor/api-key). The key itself is never an argument:
    /// every local user can read a process's arguments.
    #[arg(long, global = true, env = "TORPOR_API_KEY_FILE", value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: REST API, sandbox lifecycle, state in $TORPOR_HOME (needs root).
    Server {
        /// Config file (TOML); default $TORPOR_HOME/config.toml if it exists.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the API listen address, e.g. 127.0.0.1:7070.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Manage sandboxes.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
    /// Build guest images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Build and manage templates: snapshots with processes already running.
    #[command(subcommand)]
    Template(template::TemplateCommand),
    /// Channels that bring messages to sandboxes' agents: HTTP, Telegram, Slack.
    #[command(subcommand)]
    Channel(channel::ChannelCommand),
    /// Check this host as the daemon uses it: programs and versions, KVM or TCG, cgroups,
    /// nftables, disk, the guest image, the API. Says what to run for each problem.
    Doctor {
        /// Config file (TOML); default $TORPOR_HOME/config.toml if it exists.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Wait up to this many seconds for the API to answer (a daemon just started).
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Measure performance: runs `torpor-bench` (installed next to `torpor`); `torpor bench
    /// --help` lists the benchmarks.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        // Only the commands that call the API read its key (`server` creates it).
        let key_file = cli.api_key_file.as_deref();
        match cli.command {
            Command::Server { config, listen } => run_server(config, listen).await.map(|_| ExitCode::SUCCESS),
            Command::Image(cmd) => image::run(cmd).map(|_| ExitCode::SUCCESS),
            Command::Doctor { config, wait } => {
                doctor::run(&cli.url, config, std::time::Duration::from_secs(wait)).await
            }
            Command::Sandbox(cmd) => sandbox::run(cmd, &cli.url, key_file).await,
            Command::Channel(cmd) => channel::run(cmd, &cli.url, key_file).await,
            Command::Template(cmd) => template::run(cmd, &cli.url, key_file).await.map(|_| ExitCode::SUCCESS),
            Command::Bench { args } => Err(bench::run(&args, &cli.url, cli.api_key_file.as_deref())),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_server(config: Option<PathBuf>, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,tower=warn,hickory_server=warn".into()),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut cfg = torpor_control::config::Config::load(config.as_deref())?;
    if let Some(listen) = listen {
        cfg.listen = listen;
        cfg.validate()?;
    }
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down the API; sandboxes keep running");
    };
    torpor_control::server::run(cfg, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn the_api_key_is_never_an_argument() {
        assert!(super::Cli::try_parse_from(["torpor", "--api-key", "tp_x", "sandbox", "list"]).is_err());
        let cli = super::Cli::try_parse_from(["torpor", "--api-key-file", "/k", "sandbox", "list"]).unwrap();
        assert_eq!(cli.api_key_file.as_deref(), Some(std::path::Path::new("/k")));
    }
}
