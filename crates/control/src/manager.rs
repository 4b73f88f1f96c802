//! Sandbox lifecycle: create, stop, delete, watch for VM death, and adopt running sandboxes
//! after a daemon restart. The store is the source of truth; `live` holds the handles of VMs this
//! daemon is responsible for right now.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use rand::RngCore;
use torpor_engine::{console_tail, Engine, Vm, VmSpec};
use torpor_image::ImageStore;
use torpor_net::{AddressPool, SandboxNet, TAP};

use crate::config::Config;
use crate::error::ApiError;
use crate::guest::GuestClient;
use crate::model::{new_sandbox_id, NetworkInfo, Sandbox, State, ValidCreate};
use crate::store::{Record, Store, StoreError};

/// Every guest has the same MAC, like the same IP: each sits alone on its own link.
const GUEST_MAC: &str = "02:74:70:00:00:02";
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
const CONSOLE_TAIL_LINES: usize = 20;

pub struct Live {
    pub vm: Box<dyn Vm>,
    pub net: SandboxNet,
    pub guest: GuestClient,
    /// Set before the daemon itself ends the VM, so the exit is not reported as a failure.
    stopping: AtomicBool,
}

pub struct Manager {
    pub cfg: Arc<Config>,
    store: Store,
    /// `Err` carries what to tell the user when QEMU is missing.
    engine: Result<Arc<dyn Engine>, String>,
    images: ImageStore,
    pool: AddressPool,
    live: Mutex<HashMap<String, Arc<Live>>>,
}

/// What `reconcile` found at start-up.
#[derive(Debug, Default, PartialEq)]
pub struct Reconciled {
    pub adopted: Vec<String>,
    /// Sandboxes marked failed because their VM could not be adopted, with the reason.
    pub failed: Vec<(String, String)>,
    /// Leftovers of sandboxes that have no record (removed).
    pub orphans: Vec<String>,
}

impl Manager {
    pub fn new(cfg: Arc<Config>, store: Store, engine: Result<Arc<dyn Engine>, String>) -> Result<Arc<Self>, ApiError> {
        let pool = cfg.pool().map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Arc::new(Self {
            images: ImageStore::new(&cfg.image_dir),
            cfg,
            store,
            engine,
            pool,
            live: Mutex::new(HashMap::new()),
        }))
    }

    pub fn accelerator(&self) -> Option<String> {
        self.engine.as_ref().ok().map(|e| e.accel().to_string())
    }

    fn engine(&self) -> Result<Arc<dyn Engine>, ApiError> {
        self.engine.clone().map_err(ApiError::unavailable)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.cfg.sandboxes_dir().join(id)
    }

    fn net_for(&self, rec: &Record) -> SandboxNet {
        let (host_ip, access_ip) = self.pool.slot(rec.slot).unwrap_or((
            std::net::Ipv4Addr::UNSPECIFIED,
            std::net::Ipv4Addr::UNSPECIFIED,
        ));
        SandboxNet::new(&rec.id, host_ip, access_ip)
    }

    fn spec(&self, rec: &Record) -> VmSpec {
        let image = PathBuf::from(&rec.image_dir);
        let run_dir = self.run_dir(&rec.id);
        VmSpec {
            id: rec.id.clone(),
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            kernel: image.join("vmlinuz"),
            initrd: image.join("initrd.img"),
            base_disk: image.join("rootfs.ext4"),
            netns_path: torpor_net::netns_path(&self.net_for(rec).netns),
            tap: TAP.into(),
            mac: GUEST_MAC.into(),
            secret_file: run_dir.join("secret"),
            run_dir,
            kernel_args_extra: self.cfg.kernel_args_extra.clone(),
        }
    }

    pub fn to_api(&self, rec: &Record) -> Sandbox {
        let alive = matches!(rec.state, State::Running | State::Creating | State::Stopping);
        Sandbox {
            id: rec.id.clone(),
            state: rec.state,
            reason: rec.reason.clone(),
            template: rec.template.clone(),
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            env_keys: rec.env.keys().cloned().collect(),
            accelerator: rec.accel.clone(),
            pid: if alive { rec.pid } else { None },
            network: NetworkInfo {
                guest_ip: torpor_proto::GUEST_IP.into(),
                host_address: alive.then(|| self.net_for(rec).supervisor_addr().to_string()),
            },
            created_at: rec.created_at,
            updated_at: rec.updated_at,
        }
    }

    async fn record(&self, id: &str) -> Result<Record, ApiError> {
        if !crate::model::is_valid_sandbox_id(id) {
            return Err(ApiError::not_found(format!("no sandbox {id:?}")));
        }
        self.store.get(id).await?.ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))
    }

    pub async fn get(&self, id: &str) -> Result<Sandbox, ApiError> {
        Ok(self.to_api(&self.record(id).await?))
    }

    pub async fn list(&self) -> Result<Vec<Sandbox>, ApiError> {
        Ok(self.store.list().await?.iter().map(|r| self.to_api(r)).collect())
    }

    /// The live handle of a running sandbox, or why there is none.
    pub async fn running(&self, id: &str) -> Result<Arc<Live>, ApiError> {
        let rec = self.record(id).await?;
        if rec.state != State::Running {
            return Err(ApiError::conflict(format!("sandbox {id} is {}; it must be running", rec.state)));
        }
        self.live
            .lock()
            .expect("live table poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::conflict(format!("sandbox {id} is not running on this daemon")))
    }

    pub async fn create(self: &Arc<Self>, req: ValidCreate) -> Result<Sandbox, ApiError> {
        let engine = self.engine()?;
        let image = self.images.current(&req.template).map_err(|e| ApiError::unavailable(e.to_string()))?;
        let now = Utc::now();
        let mut rec = Record {
            id: new_sandbox_id(),
            state: State::Creating,
            reason: None,
            template: req.template,
            image_dir: image.dir.display().to_string(),
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            env: req.env,
            slot: 0,
            pid: None,
            accel: engine.accel().to_string(),
            created_at: now,
            updated_at: now,
        };
        rec.slot = self.store.insert(&rec, self.pool.capacity()).await.map_err(|e| match e {
            StoreError::PoolExhausted(_) => ApiError::unavailable(e.to_string()),
            other => other.into(),
        })?;
        let id = rec.id.clone();
        tracing::info!(%id, vcpus = rec.vcpus, memory_mib = rec.memory_mib, "creating sandbox");
        match self.boot(&engine, &rec).await {
            Ok(live) => {
                self.live.lock().expect("live table poisoned").insert(id.clone(), live.clone());
                self.store.transition(&id, &[State::Creating], State::Running, None).await?;
                tokio::spawn(self.clone().monitor(id.clone(), live));
                tracing::info!(%id, "sandbox running");
                self.get(&id).await
            }
            Err(e) => {
                tracing::warn!(%id, error = %e.message, "create failed; removing everything it set up");
                let _ = std::fs::remove_dir_all(self.run_dir(&id));
                self.store.delete(&id).await?;
                Err(e)
            }
        }
    }

    /// Network, disk, VM, first health check. On failure, undoes its own steps.
    async fn boot(&self, engine: &Arc<dyn Engine>, rec: &Record) -> Result<Arc<Live>, ApiError> {
        let spec = self.spec(rec);
        create_private_dir(&spec.run_dir)?;
        let secret = ensure_secret(&spec.secret_file)?;
        let net = self.net_for(rec);
        net.setup().await.map_err(|e| ApiError::internal(format!("setting up the sandbox network: {e}")))?;
        let vm = match self.start_vm(engine, &spec).await {
            Ok(vm) => vm,
            Err(e) => {
                let _ = net.teardown().await;
                return Err(e);
            }
        };
        let guest = GuestClient::new(net.supervisor_addr(), &secret);
        let ready = async {
            self.store.set_pid(&rec.id, Some(vm.pid())).await?;
            wait_healthy(&guest, vm.as_ref(), Duration::from_secs(self.cfg.boot_timeout_secs))
                .await
                .map_err(|why| {
                    ApiError::internal(format!(
                        "sandbox {} did not become healthy: {why}\n--- console log (last {CONSOLE_TAIL_LINES} lines) ---\n{}",
                        rec.id,
                        console_tail(&spec.console_log(), CONSOLE_TAIL_LINES)
                    ))
                })?;
            if !rec.env.is_empty() {
                let env = rec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                guest.set_env(env).await.map_err(ApiError::from_guest)?;
            }
            Ok::<_, ApiError>(())
        };
        if let Err(e) = ready.await {
            vm.terminate().await;
            let _ = net.teardown().await;
            return Err(e);
        }
        Ok(Arc::new(Live { vm, net, guest, stopping: AtomicBool::new(false) }))
    }

    async fn start_vm(&self, engine: &Arc<dyn Engine>, spec: &VmSpec) -> Result<Box<dyn Vm>, ApiError> {
        engine.prepare_disk(spec).await.map_err(|e| ApiError::internal(e.to_string()))?;
        let vm = engine.launch(spec).await.map_err(|e| ApiError::internal(e.to_string()))?;
        let _ = std::fs::write(spec.run_dir.join("vm.pid"), vm.pid().to_string());
        Ok(vm)
    }

    /// Marks the sandbox failed if its VM dies without the daemon asking it to.
    async fn monitor(self: Arc<Self>, id: String, live: Arc<Live>) {
        let exit = live.vm.wait_exit().await;
        if live.stopping.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut table = self.live.lock().expect("live table poisoned");
            if table.get(&id).is_some_and(|l| Arc::ptr_eq(l, &live)) {
                table.remove(&id);
            }
        }
        let tail = console_tail(&self.run_dir(&id).join("console.log"), 5);
        let reason = if tail.trim().is_empty() {
            exit.description.clone()
        } else {
            format!("{}; console: {}", exit.description, tail.trim().replace('\n', " | "))
        };
        tracing::warn!(%id, %reason, "sandbox VM died");
        let _ = live.net.teardown().await;
        let _ = self.store.set_pid(&id, None).await;
        let _ = self.store.transition(&id, &[State::Running, State::Creating], State::Failed, Some(&reason)).await;
    }

    fn take_live(&self, id: &str) -> Option<Arc<Live>> {
        let live = self.live.lock().expect("live table poisoned").remove(id);
        if let Some(l) = &live {
            l.stopping.store(true, Ordering::SeqCst);
        }
        live
    }

    /// Shuts the guest down cleanly (then forcibly if it does not comply). The disk is kept.
    pub async fn stop(&self, id: &str) -> Result<Sandbox, ApiError> {
        self.record(id).await?;
        match self.store.transition(id, &[State::Running], State::Stopping, None).await? {
            None => return Err(ApiError::not_found(format!("no sandbox {id:?}"))),
            Some(State::Running) => {}
            Some(other) => {
                return Err(ApiError::conflict(format!("sandbox {id} is {other}; only a running sandbox can be stopped")))
            }
        }
        if let Err(e) = self.stop_running(id).await {
            self.fail_after(id, "stopping", &e).await;
            return Err(e);
        }
        self.get(id).await
    }

    async fn stop_running(&self, id: &str) -> Result<(), ApiError> {
        if let Some(live) = self.take_live(id) {
            let graceful = live.guest.shutdown(Duration::from_secs(5)).await.is_ok()
                && tokio::time::timeout(SHUTDOWN_GRACE, live.vm.wait_exit()).await.is_ok();
            if !graceful {
                tracing::warn!(%id, "guest did not power off cleanly; terminating the VM");
                live.vm.terminate().await;
            }
            live.net.teardown().await.map_err(|e| ApiError::internal(e.to_string()))?;
        }
        self.finish_stop(id).await
    }

    /// A lifecycle operation failed halfway: the sandbox must not stay in a transient state.
    async fn fail_after(&self, id: &str, what: &str, e: &ApiError) {
        let reason = format!("{what} failed: {}", e.message);
        tracing::error!(%id, %reason);
        let _ = self.store.transition(id, &[State::Stopping], State::Failed, Some(&reason)).await;
    }

    async fn finish_stop(&self, id: &str) -> Result<(), ApiError> {
        let dir = self.run_dir(id);
        for file in ["qmp.sock", "vm.pid"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        self.store.set_pid(id, None).await?;
        self.store.transition(id, &[State::Stopping], State::Stopped, None).await?;
        Ok(())
    }

    /// Removes the sandbox and everything it owns.
    pub async fn delete(&self, id: &str) -> Result<(), ApiError> {
        let rec = self.record(id).await?;
        let from = [State::Running, State::Stopped, State::Failed];
        match self.store.transition(id, &from, State::Stopping, None).await? {
            Some(s) if from.contains(&s) => {}
            Some(other) => return Err(ApiError::conflict(format!("sandbox {id} is {other}; try again when it settles"))),
            None => return Err(ApiError::not_found(format!("no sandbox {id:?}"))),
        }
        if let Err(e) = self.remove_everything(&rec).await {
            self.fail_after(id, "deleting", &e).await;
            return Err(e);
        }
        tracing::info!(%id, "sandbox removed");
        Ok(())
    }

    async fn remove_everything(&self, rec: &Record) -> Result<(), ApiError> {
        let id = rec.id.as_str();
        if let Some(live) = self.take_live(id) {
            live.vm.terminate().await;
        }
        self.kill_stale(rec).await;
        self.net_for(rec).teardown().await.map_err(|e| ApiError::internal(e.to_string()))?;
        let dir = self.run_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| ApiError::internal(format!("removing {}: {e}", dir.display())))?;
        }
        self.store.delete(id).await?;
        Ok(())
    }

    /// Kills a VM of this sandbox that no live handle owns (left by an earlier daemon, or by a
    /// create cut short before its pid was recorded).
    async fn kill_stale(&self, rec: &Record) {
        let pid = rec.pid.or_else(|| {
            std::fs::read_to_string(self.run_dir(&rec.id).join("vm.pid")).ok().and_then(|p| p.trim().parse().ok())
        });
        let Some(pid) = pid else { return };
        match self.engine() {
            Ok(engine) => {
                engine.kill_stale(&rec.id, pid).await;
            }
            // QEMU was uninstalled since: its processes can still be running, and still must go.
            Err(_) => {
                torpor_engine::qemu::kill_stale_vm(&rec.id, pid).await;
            }
        }
    }

    /// Brings the store and the host into agreement after a (re)start: adopts VMs that are still
    /// running, fails the ones that are gone, finishes interrupted stops, removes leftovers.
    pub async fn reconcile(self: &Arc<Self>) -> Result<Reconciled, ApiError> {
        let mut report = Reconciled::default();
        let records = self.store.list().await?;
        for rec in &records {
            let net = self.net_for(rec);
            match rec.state {
                State::Running => match self.adopt(rec, &net).await {
                    Ok(()) => report.adopted.push(rec.id.clone()),
                    Err(why) => {
                        let reason = format!("could not adopt the VM after a daemon restart: {why}");
                        tracing::warn!(id = %rec.id, %reason);
                        self.kill_leftovers(rec, &net).await;
                        self.store.transition(&rec.id, &[State::Running], State::Failed, Some(&reason)).await?;
                        report.failed.push((rec.id.clone(), reason));
                    }
                },
                State::Creating => {
                    let reason = "the daemon stopped while the sandbox was being created".to_owned();
                    self.kill_leftovers(rec, &net).await;
                    self.store.transition(&rec.id, &[State::Creating], State::Failed, Some(&reason)).await?;
                    report.failed.push((rec.id.clone(), reason));
                }
                State::Stopping => {
                    self.kill_leftovers(rec, &net).await;
                    self.finish_stop(&rec.id).await?;
                }
                State::Stopped | State::Failed => {
                    let _ = net.teardown().await;
                }
            }
        }
        report.orphans = self.remove_orphans(&records).await;
        Ok(report)
    }

    async fn adopt(self: &Arc<Self>, rec: &Record, net: &SandboxNet) -> Result<(), String> {
        let engine = self.engine.clone()?;
        let pid = rec.pid.ok_or("no VM pid was recorded")?;
        if !net.exists() {
            return Err(format!("its network namespace {} is gone", net.netns));
        }
        let spec = self.spec(rec);
        let vm = engine.adopt(&spec, pid).await.map_err(|e| e.to_string())?;
        let secret = std::fs::read_to_string(&spec.secret_file).map_err(|e| format!("reading its secret: {e}"))?;
        let guest = GuestClient::new(net.supervisor_addr(), secret.trim());
        guest.health(Duration::from_secs(5)).await.map_err(|e| format!("supervisor health check: {}", e.message()))?;
        let live = Arc::new(Live { vm, net: net.clone(), guest, stopping: AtomicBool::new(false) });
        self.live.lock().expect("live table poisoned").insert(rec.id.clone(), live.clone());
        tokio::spawn(self.clone().monitor(rec.id.clone(), live));
        tracing::info!(id = %rec.id, pid, "adopted running sandbox");
        Ok(())
    }

    async fn kill_leftovers(&self, rec: &Record, net: &SandboxNet) {
        self.kill_stale(rec).await;
        let _ = net.teardown().await;
        let _ = self.store.set_pid(&rec.id, None).await;
    }

    /// Sandbox directories in our data dir without a record: a create that died before its
    /// record was written, or a delete that died after. Their VM and network go too.
    async fn remove_orphans(&self, records: &[Record]) -> Vec<String> {
        let mut orphans = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.cfg.sandboxes_dir()) else { return orphans };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if records.iter().any(|r| r.id == id) || !crate::model::is_valid_sandbox_id(&id) {
                continue;
            }
            let pid = std::fs::read_to_string(entry.path().join("vm.pid")).ok().and_then(|p| p.trim().parse().ok());
            if let Some(pid) = pid {
                torpor_engine::qemu::kill_stale_vm(&id, pid).await;
            }
            let unspecified = std::net::Ipv4Addr::UNSPECIFIED;
            let _ = SandboxNet::new(&id, unspecified, unspecified).teardown().await;
            let _ = std::fs::remove_dir_all(entry.path());
            tracing::warn!(%id, "removed leftovers of a sandbox with no record");
            orphans.push(id);
        }
        orphans
    }
}

async fn wait_healthy(guest: &GuestClient, vm: &dyn Vm, timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error;
    loop {
        tokio::select! {
            exit = vm.wait_exit() => return Err(exit.description),
            result = guest.health(Duration::from_secs(2)) => match result {
                Ok(_) => return Ok(()),
                Err(e) => last_error = e.message().to_owned(),
            },
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("no answer from the supervisor within {} s (last error: {last_error})", timeout.as_secs()));
        }
        tokio::select! {
            exit = vm.wait_exit() => return Err(exit.description),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

pub fn create_private_dir(dir: &std::path::Path) -> Result<(), ApiError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| ApiError::internal(format!("chmod {}: {e}", dir.display())))
}

/// The sandbox secret: 32 random bytes from the OS, hex, in a 0600 file.
fn ensure_secret(path: &std::path::Path) -> Result<String, ApiError> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        return Ok(existing.trim().to_owned());
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = hex::encode(bytes);
    crate::files::write_private(path, secret.as_bytes())
        .map_err(|e| ApiError::internal(format!("writing {}: {e}", path.display())))?;
    Ok(secret)
}
