//! `torpor-guest`: the supervisor inside every Torpor sandbox.
//!
//! As PID 1 (the normal case) it prepares the machine, then serves the gRPC control API on
//! `0.0.0.0:50051`. `torpor-guest serve --listen ADDR --secret-file FILE` runs only the API, for
//! debugging the supervisor on a workstation.

mod agent;
mod exec;
mod files;
mod identity;
mod info;
mod init;
mod reaper;
mod service;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, RwLock};
use torpor_proto::supervisor::agent_server::AgentServer;
use torpor_proto::supervisor::supervisor_server::SupervisorServer;
use torpor_proto::SUPERVISOR_PORT;

fn main() {
    let is_init = std::process::id() == 1;
    tracing_subscriber::fmt().with_target(false).without_time().with_ansi(false).init();
    if let Err(e) = run(is_init) {
        eprintln!("torpor-guest: {e:#}");
        if is_init {
            // PID 1 must not exit; the host sees the failure in the console log and health checks.
            init::power_off();
        }
        std::process::exit(1);
    }
}

fn run(is_init: bool) -> Result<()> {
    let (listen, secret) = if is_init {
        init::mount_filesystems()?;
        let id = init::cmdline_param("torpor.id").unwrap_or_else(|| "torpor".to_owned());
        init::set_hostname(&id)?;
        init::configure_network()?;
        let listen = SocketAddr::from(([0, 0, 0, 0], SUPERVISOR_PORT));
        (listen, init::read_secret()?)
    } else {
        parse_serve_args()?
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let power_off = runtime.block_on(serve(listen, secret, is_init))?;
    drop(runtime);
    if power_off {
        init::power_off();
    }
    Ok(())
}

fn parse_serve_args() -> Result<(SocketAddr, String)> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: torpor-guest serve --listen ADDR --secret-file FILE (PID 1 needs no arguments)";
    if args.first().map(String::as_str) != Some("serve") {
        bail!("{usage}");
    }
    let mut listen = None;
    let mut secret_file = None;
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--listen" => listen = it.next().map(|v| v.parse()).transpose().context("--listen")?,
            "--secret-file" => secret_file = it.next().cloned(),
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; {usage}"),
        }
    }
    let (Some(listen), Some(secret_file)) = (listen, secret_file) else { bail!("{usage}") };
    let secret = std::fs::read_to_string(&secret_file).with_context(|| format!("reading {secret_file}"))?;
    Ok((listen, secret.trim().to_owned()))
}

/// At most this long for in-flight answers to go out before the supervisor powers off.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// Serves until asked to shut down; returns whether the machine should power off.
async fn serve(listen: SocketAddr, secret: String, is_init: bool) -> Result<bool> {
    let reaper = reaper::Reaper::start().context("installing the SIGCHLD handler")?;
    let (shutdown_tx, mut shutdown_rx) = mpsc::channel(1);
    let running = exec::Running::default();
    let secret = Arc::new(std::sync::RwLock::new(secret));
    let service = service::Service {
        secret: secret.clone(),
        reaper,
        running: running.clone(),
        default_env: Arc::new(RwLock::new(HashMap::new())),
        shutdown: shutdown_tx,
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    // Ctrl-Alt-Del (and QEMU's `system_powerdown` on some machines) arrives at PID 1 as SIGINT.
    let mut sigint = signal(SignalKind::interrupt())?;
    let (stop_serving, stopped) = tokio::sync::oneshot::channel::<()>();
    let agents = agent::Agents::new(service.reaper.clone(), service.default_env.clone());
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                SupervisorServer::new(service).max_decoding_message_size(16 * 1024 * 1024),
                service::authenticator(secret.clone()),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                AgentServer::new(agent::AgentService(agents)),
                service::authenticator(secret),
            ))
            .serve_with_shutdown(listen, async {
                let _ = stopped.await;
            }),
    );
    tracing::info!(%listen, "torpor-guest {} serving", torpor_proto::VERSION);
    tokio::select! {
        _ = shutdown_rx.recv() => {}
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
        result = &mut server => {
            result.context("supervisor task")?.context("serving the supervisor API")?;
            return Ok(is_init);
        }
    }
    // Open exec streams would hold a graceful shutdown open forever: end their processes, let
    // in-flight answers (the Shutdown reply among them) go out, then stop waiting.
    running.signal_all(nix::sys::signal::Signal::SIGTERM);
    let _ = stop_serving.send(());
    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, server).await;
    Ok(is_init)
}
