//! `torpor server`: open the store, pick the engine, reconcile, serve.

use std::sync::Arc;

use crate::api::{router, AppState};
use crate::config::Config;
use crate::manager::{create_private_dir, Manager};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("this daemon needs root (network namespaces, tap devices, nftables); run it with sudo")]
    NotRoot,
    #[error("{0}")]
    Setup(String),
    #[error("opening the store")]
    Store(#[from] crate::store::StoreError),
    #[error("binding {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the API")]
    Serve(#[source] std::io::Error),
}

/// Runs the daemon until `shutdown` resolves. Sandboxes keep running after it returns.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(ServerError::NotRoot);
    }
    raise_fd_limit();
    // Everything the daemon creates (disks, snapshots, logs, keys) is private unless made
    // otherwise on purpose.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    create_private_dir(&cfg.data_dir).map_err(|e| ServerError::Setup(e.message))?;
    create_private_dir(&cfg.sandboxes_dir()).map_err(|e| ServerError::Setup(e.message))?;
    let api_key = crate::files::load_or_create_api_key(&cfg.data_dir)
        .map_err(|e| ServerError::Setup(format!("API key in {}: {e}", cfg.data_dir.display())))?;
    let store = Store::open(&cfg.data_dir.join("torpor.db")).await?;

    let engine_cfg = cfg.engine.clone();
    let warned = std::sync::Once::new();
    let engine: crate::manager::Probe = Box::new(move || {
        let (engine, warning) = torpor_engine::open(&engine_cfg).map_err(|e| e.to_string())?;
        if let Some(warning) = &warning {
            warned.call_once(|| tracing::warn!("{warning}"));
        }
        Ok(engine)
    });
    if let Err(e) = torpor_image::ImageStore::new(&cfg.image_dir).current("base") {
        tracing::error!("sandboxes cannot start: {e}");
    }

    let pool = cfg.pool().map_err(|e| ServerError::Setup(e.to_string()))?;
    let routing = torpor_net::HostRouting::new(pool.net());
    routing.install().await.map_err(|e| ServerError::Setup(format!("host routing for sandbox egress: {e}")))?;
    tracing::info!(table = routing.table(), "host forwarding and masquerading for {pool} in place");

    let listen = cfg.listen;
    let cfg = Arc::new(cfg);
    let manager = Manager::new(cfg.clone(), store, engine).map_err(|e| ServerError::Setup(e.message))?;
    let relay = crate::relay::Relay::new(manager.clone());
    let app = router(AppState {
        manager: manager.clone(),
        api_key: Arc::new(api_key),
        auth_failures: Default::default(),
        relay: relay.clone(),
    });
    // Before reconcile: the sandboxes it adopts are served their API in their namespaces too.
    manager.set_guest_api(crate::guest_api::router(manager.clone()));
    let report = manager.reconcile().await.map_err(|e| ServerError::Setup(e.message))?;
    tracing::info!(
        adopted = report.adopted.len(),
        paused_again = report.paused.len(),
        failed = report.failed.len(),
        orphans_removed = report.orphans.len(),
        "reconciled the store with the host"
    );
    for (id, reason) in &report.failed {
        tracing::warn!(%id, %reason, "could not adopt sandbox");
    }

    match relay.recover().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(messages = n, "delivering messages taken before the daemon stopped"),
        Err(e) => tracing::error!(error = %e.message, "reading the relay's pending messages"),
    }
    manager.background.spawn("auto-pause", manager.clone().auto_pause());

    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|source| ServerError::Bind { addr: listen, source })?;
    tracing::info!(%listen, data_dir = %cfg.data_dir.display(), "torpor API listening");
    // Client addresses feed the rate limit on failed authentications.
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(ServerError::Serve);
    manager.background.shutdown(SHUTDOWN_GRACE).await;
    served
}

/// How long background tasks have to end once told to (they end at their next await).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Each sandbox holds descriptors in the daemon (its API and resolver sockets, their
/// connections, its console, its supervisor connection): the soft limit a shell starts us with
/// (often 1024) would cap a host at a couple of hundred sandboxes. Raised to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}
