//! Sandbox lifecycle: create, stop, delete, watch for VM death (here), pause, resume, wake on use
//! and auto-pause (`suspend.rs`), and adopting sandboxes after a daemon restart (`reconcile.rs`).
//! The store is the source of truth; `live` holds the handles of VMs this daemon is responsible
//! for right now.

mod credentials;
use credentials::github_error;
mod engine_slot;
mod lifecycle;
pub use engine_slot::{EngineSlot, Probe};
mod network;
mod reconcile;
mod suspend;
mod templates;

pub use reconcile::Reconciled;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use rand::RngCore;
use torpor_engine::{logs, Engine, Vm, VmSpec};
use torpor_image::ImageStore;
use torpor_net::{AddressPool, SandboxEgress, SandboxNet, Upstream, TAP};

use crate::config::Config;
use crate::error::ApiError;
use crate::guest::GuestClient;
use crate::model::PolicyExt;
use crate::model::ValidCreate;
use crate::store::{Record, Store, StoreError};
use lifecycle::Op;
use torpor_api::{new_sandbox_id, NetworkInfo, Sandbox, State, BASE_TEMPLATE};

const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
const CONSOLE_TAIL_LINES: usize = 20;
const HEALTH_POLL: Duration = Duration::from_millis(10);

pub struct Live {
    pub vm: Box<dyn Vm>,
    pub net: SandboxNet,
    pub guest: GuestClient,
    /// Set before the daemon itself ends the VM, so the exit is not reported as a failure.
    stopping: AtomicBool,
    /// Milliseconds since the epoch of the last API call, exec or transfer touching the sandbox.
    last_activity_ms: AtomicU64,
    /// Execs and file transfers in flight; a sandbox with any is never idle.
    in_flight: AtomicUsize,
    /// Idle time after which the sandbox pauses; 0 = never.
    idle_timeout_ms: u64,
    /// When its credentials are due for renewal, and how the last deliveries went.
    credentials: credentials::Delivery,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Live {
    fn new(vm: Box<dyn Vm>, net: SandboxNet, guest: GuestClient, rec: &Record) -> Arc<Self> {
        Arc::new(Self {
            vm,
            net,
            guest,
            stopping: AtomicBool::new(false),
            last_activity_ms: AtomicU64::new(now_ms()),
            in_flight: AtomicUsize::new(0),
            idle_timeout_ms: rec.idle_timeout_secs * 1000,
            credentials: Default::default(),
        })
    }

    pub fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::SeqCst);
    }

    /// Marks work in flight until the guard is dropped; the sandbox is not idle meanwhile.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        Busy(self.clone())
    }

    /// Idle (nothing in flight) for at least its idle timeout; never when the timeout is 0.
    fn due_for_pause(&self) -> bool {
        self.idle_timeout_ms > 0
            && self.in_flight.load(Ordering::SeqCst) == 0
            && now_ms().saturating_sub(self.last_activity_ms.load(Ordering::SeqCst)) >= self.idle_timeout_ms
    }
}

/// See [`Live::busy`].
pub struct Busy(Arc<Live>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Manager {
    pub cfg: Arc<Config>,
    store: Store,
    /// Looked for again while missing: fixing the host needs no restart.
    engine: EngineSlot,
    images: ImageStore,
    pool: AddressPool,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// One lifecycle operation per sandbox at a time (pause, resume, start): N requests that
    /// wake a paused sandbox queue here and cause exactly one resume.
    op_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Supervisor clients of paused sandboxes. Their TCP connection is part of the guest's
    /// snapshot and of the host's kernel state, so it survives the pause, and reusing it spares
    /// the resume a new TCP and HTTP/2 handshake with a guest that has only just woken.
    parked_clients: Mutex<HashMap<String, GuestClient>>,
    /// Only one base template snapshot is ever built at a time.
    base_template_lock: tokio::sync::Mutex<()>,
    /// Held shared by a create from a template until its record exists, exclusively by whatever
    /// removes a template's files: a template cannot vanish under a clone being made.
    templates_lock: tokio::sync::RwLock<()>,
    /// Egress (policy in force and resolver) of every sandbox whose namespace exists.
    egress: Mutex<HashMap<String, Arc<SandboxEgress>>>,
    upstream: Arc<Upstream>,
    /// Signs the device tokens sandboxes hold.
    pub tokens: Arc<crate::identity::DeviceTokens>,
    /// The API as guests reach it, served inside each sandbox's namespace (set once the router
    /// exists).
    guest_api: std::sync::OnceLock<axum::Router>,
    guest_api_tasks: Mutex<HashMap<String, tokio_util::sync::CancellationToken>>,
    /// Serves the model APIs to sandboxes with the host's keys.
    pub proxy: Arc<crate::proxy::ModelProxy>,
    /// Exchanges the GitHub App's key for installation tokens, if one is configured.
    github: Option<Arc<crate::github::GitHubBroker>>,
    /// The installation token each sandbox holds now (host memory only).
    github_tokens: Mutex<HashMap<String, crate::github::InstallationToken>>,
    /// One credential delivery per sandbox at a time: a renewal and a resume never mint two
    /// tokens or land out of order.
    credential_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The auto-pause sweep, VM monitors and the relay's workers.
    pub background: crate::background::Background,
}

impl Manager {
    pub fn new(cfg: Arc<Config>, store: Store, engine: Probe) -> Result<Arc<Self>, ApiError> {
        let pool = cfg.pool().map_err(|e| ApiError::internal(e.to_string()))?;
        let upstream = Upstream::new(&cfg.dns_upstreams).map_err(|e| ApiError::internal(e.to_string()))?;
        let ttl = Duration::from_secs(cfg.device_token_ttl_secs);
        let tokens = crate::identity::DeviceTokens::load_or_create(&cfg.data_dir, ttl)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let proxy =
            crate::proxy::ModelProxy::load_or_create(&cfg.data_dir).map_err(|e| ApiError::internal(e.to_string()))?;
        let github = cfg
            .github
            .as_ref()
            .map(crate::github::GitHubBroker::new)
            .transpose()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Arc::new(Self {
            proxy: Arc::new(proxy),
            github: github.map(Arc::new),
            github_tokens: Mutex::new(HashMap::new()),
            credential_locks: Mutex::new(HashMap::new()),
            background: Default::default(),
            tokens: Arc::new(tokens),
            guest_api: std::sync::OnceLock::new(),
            guest_api_tasks: Mutex::new(HashMap::new()),
            egress: Mutex::new(HashMap::new()),
            upstream: Arc::new(upstream),
            images: ImageStore::new(&cfg.image_dir),
            cfg,
            store,
            engine: EngineSlot::new(engine),
            pool,
            live: Mutex::new(HashMap::new()),
            op_locks: Mutex::new(HashMap::new()),
            parked_clients: Mutex::new(HashMap::new()),
            base_template_lock: tokio::sync::Mutex::new(()),
            templates_lock: tokio::sync::RwLock::new(()),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn accelerator(&self) -> Option<String> {
        self.engine.get().ok().map(|e| e.accel().to_string())
    }

    fn engine(&self) -> Result<Arc<dyn Engine>, ApiError> {
        self.engine.get().map_err(ApiError::unavailable)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.cfg.sandboxes_dir().join(id)
    }

    fn net_for(&self, rec: &Record) -> SandboxNet {
        let (host_ip, access_ip) =
            self.pool.slot(rec.slot).unwrap_or((std::net::Ipv4Addr::UNSPECIFIED, std::net::Ipv4Addr::UNSPECIFIED));
        SandboxNet::new(&rec.id, host_ip, access_ip)
    }

    fn spec(&self, rec: &Record) -> VmSpec {
        let image = PathBuf::from(&rec.image_dir);
        let run_dir = self.run_dir(&rec.id);
        let template = rec.template_dir.as_ref().map(PathBuf::from);
        let base_disk = match &template {
            Some(dir) => torpor_engine::BaseDisk::Template(dir.clone()),
            None => torpor_engine::BaseDisk::Image(image.join("rootfs.ext4")),
        };
        VmSpec {
            id: rec.id.clone(),
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            kernel: image.join("vmlinuz"),
            initrd: image.join("initrd.img"),
            base_disk,

            netns_path: torpor_net::netns_path(&self.net_for(rec).netns),
            tap: TAP.into(),
            mac: torpor_proto::GUEST_MAC.into(),
            secret_file: run_dir.join("secret"),
            run_dir,
            kernel_args_extra: self.cfg.kernel_args_extra.clone(),
            jail: self.jail_spec(rec, &image, template.as_deref()),
            limits: self.engine_limits(rec),
        }
    }

    /// The sandbox's VM uid and gid: one per address slot, so no two live sandboxes share one.
    pub(super) fn vm_uid(&self, rec: &Record) -> u32 {
        self.cfg.vm_uid_base + rec.slot
    }

    fn jail_spec(
        &self,
        rec: &Record,
        image: &std::path::Path,
        template: Option<&std::path::Path>,
    ) -> torpor_engine::JailSpec {
        let uid = self.vm_uid(rec);
        let groups = vec![self.cfg.vm_uid_base];
        let mut read_only = vec![image.to_path_buf()];
        read_only.extend(template.map(std::path::Path::to_path_buf));
        torpor_engine::JailSpec { uid, gid: uid, groups, max_file_bytes: u64::from(rec.disk_mib) << 20, read_only }
    }

    fn engine_limits(&self, rec: &Record) -> torpor_engine::Limits {
        let engine_extra = self.engine.cached().map(|e| e.extra_memory_mib()).unwrap_or(0);
        torpor_engine::Limits::new(
            rec.vcpus,
            rec.memory_mib,
            self.cfg.vmm_overhead_mib + engine_extra,
            self.cfg.vm_pids_max,
            self.cfg.vm_io_weight,
        )
    }

    pub(super) fn api_limits(&self, rec: &Record) -> torpor_api::Limits {
        let l = self.engine_limits(rec);
        torpor_api::Limits {
            cpu_quota_us: l.cpu_quota_us,
            memory_bytes: l.memory_bytes,
            pids: l.pids,
            io_weight: l.io_weight,
            disk_bytes: u64::from(rec.disk_mib) << 20,
        }
    }

    pub fn to_api(&self, rec: &Record) -> Sandbox {
        let alive =
            matches!(rec.state, State::Running | State::Creating | State::Stopping | State::Pausing | State::Resuming);
        let reachable = alive || rec.state == State::Paused;
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
            idle_timeout_secs: rec.idle_timeout_secs,
            network: NetworkInfo {
                guest_ip: torpor_proto::GUEST_IP.into(),
                host_address: reachable.then(|| self.net_for(rec).supervisor_addr().to_string()),
            },
            limits: self.api_limits(rec),
            secrets: rec.secrets.clone(),
            github: rec.github.clone(),
            models: rec.models.clone(),
            agent: rec.agent.clone(),
            created_at: rec.created_at,
            updated_at: rec.updated_at,
        }
    }

    async fn record(&self, id: &str) -> Result<Record, ApiError> {
        if !torpor_api::is_valid_sandbox_id(id) {
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

    fn live_handle(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().expect("live table poisoned").get(id).cloned()
    }

    fn op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.op_locks.lock().expect("lock table poisoned").entry(id.to_owned()).or_default().clone()
    }

    /// Creates a sandbox: a restore of its template's snapshot, or a cold boot of the base image
    /// (asked for, or a size other than the base template's).
    pub async fn create(self: &Arc<Self>, req: ValidCreate) -> Result<Sandbox, ApiError> {
        let engine = self.engine()?;
        let template = if req.template == BASE_TEMPLATE {
            let vcpus = req.vcpus.unwrap_or(self.cfg.default_vcpus);
            let memory_mib = req.memory_mib.unwrap_or(self.cfg.default_memory_mib);
            let base_shape = (vcpus, memory_mib) == (self.cfg.default_vcpus, self.cfg.default_memory_mib);
            if req.cold_boot || !base_shape {
                return self
                    .create_cold(&engine, ValidCreate { vcpus: Some(vcpus), memory_mib: Some(memory_mib), ..req })
                    .await;
            }
            self.base_template(&engine).await?
        } else {
            let t = self.store.template(&req.template).await?.ok_or_else(|| {
                ApiError::not_found(format!("unknown template {:?}; `torpor template list` shows them", req.template))
            })?;
            if req.vcpus.is_some_and(|v| v != t.vcpus) || req.memory_mib.is_some_and(|m| m != t.memory_mib) {
                return Err(ApiError::invalid(format!(
                    "template {} is a snapshot of a {} vCPU / {} MiB machine; omit vcpus and memory_mib or match them",
                    t.name, t.vcpus, t.memory_mib
                )));
            }
            t
        };
        // Looked up again under the lock: it may have been replaced or removed meanwhile.
        let _templates = self.templates_lock.read().await;
        let template = self
            .store
            .template(&template.name)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("template {:?} was just removed", template.name)))?;
        let mut rec = self.new_record(&engine, &req, &template.image_dir, template.vcpus, template.memory_mib);
        rec.template_dir = Some(template.dir.clone());
        // The snapshot holds the template's env already; the record must too, for a cold start.
        rec.env = template.env.clone().into_iter().chain(std::mem::take(&mut rec.env)).collect();
        if req.network.is_none() {
            rec.network = template.network.clone().canonical(&self.cfg.package_registries)?;
        }
        if req.secrets.is_none() {
            rec.secrets = template.secrets.clone();
        }
        if req.github.is_none() {
            rec.github = template.github.clone();
        }
        if req.models.is_none() {
            rec.models = template.models.clone().map(|m| crate::model::model_grant(m, &self.cfg)).transpose()?;
        }
        if req.agent.is_none() {
            rec.agent = template.agent.clone();
        }
        self.finish_create(rec, |rec| async move { self.clone_template(&engine, &rec, &template).await }).await
    }

    pub(super) async fn create_cold(
        self: &Arc<Self>,
        engine: &Arc<dyn Engine>,
        req: ValidCreate,
    ) -> Result<Sandbox, ApiError> {
        let image = self.images.current(BASE_TEMPLATE).map_err(|e| ApiError::unavailable(e.to_string()))?;
        let vcpus = req.vcpus.unwrap_or(self.cfg.default_vcpus);
        let memory_mib = req.memory_mib.unwrap_or(self.cfg.default_memory_mib);
        let rec = self.new_record(engine, &req, &image.dir.display().to_string(), vcpus, memory_mib);
        self.finish_create(rec, |rec| async move { self.boot(engine, &rec).await }).await
    }

    fn new_record(
        &self,
        engine: &Arc<dyn Engine>,
        req: &ValidCreate,
        image_dir: &str,
        vcpus: u32,
        memory_mib: u32,
    ) -> Record {
        let now = Utc::now();
        Record {
            id: new_sandbox_id(),
            state: State::Creating,
            reason: None,
            template: req.template.clone(),
            image_dir: image_dir.to_owned(),
            vcpus,
            memory_mib,
            env: req.env.clone(),
            slot: 0,
            pid: None,
            accel: engine.accel().to_string(),
            created_at: now,
            updated_at: now,
            idle_timeout_secs: req.idle_timeout_secs,
            meter: Default::default(),
            template_dir: None,
            network: req.network.clone().unwrap_or_default(),
            disk_mib: req.disk_mib,
            secrets: req.secrets.clone().unwrap_or_default(),
            github: req.github.clone(),
            models: req.models.clone(),
            agent: req.agent.clone(),
        }
    }

    /// Records the sandbox, runs `start`, and either makes it live or removes every trace.
    async fn finish_create<F, Fut>(self: &Arc<Self>, mut rec: Record, start: F) -> Result<Sandbox, ApiError>
    where
        F: FnOnce(Record) -> Fut,
        Fut: std::future::Future<Output = Result<Arc<Live>, ApiError>>,
    {
        rec.slot = self.store.insert(&rec, self.pool.capacity()).await.map_err(|e| match e {
            StoreError::PoolExhausted(_) => ApiError::unavailable(e.to_string()),
            other => other.into(),
        })?;
        let id = rec.id.clone();
        tracing::info!(%id, template = %rec.template, vcpus = rec.vcpus, memory_mib = rec.memory_mib, "creating sandbox");
        let started = std::time::Instant::now();
        // A GitHub token is minted while the VM boots: a scope GitHub refuses fails the create
        // with GitHub's reason instead of leaving a sandbox without its token.
        let cleanup_rec = rec.clone();
        let github = async {
            match &cleanup_rec.github {
                Some(grant) if self.github.is_some() => {
                    let lock = self.credential_lock(&id);
                    let _one_at_a_time = lock.lock().await;
                    self.github_token(&id, grant).await.map(|_| ())
                }
                _ => Ok(()),
            }
        };
        let (result, github) = tokio::join!(start(rec), github);
        let result = match (result, github) {
            (Ok(live), Err(e)) => {
                live.vm.terminate().await;
                let _ = self.teardown_net(&cleanup_rec).await;
                Err(github_error(e))
            }
            (Err(e), _) => Err(e),
            (ok, Ok(())) => ok,
        };
        match result {
            Ok(live) => {
                self.go_live(&id, live, State::Creating).await?;
                tracing::info!(%id, ms = started.elapsed().as_millis() as u64, "sandbox running");
                self.get(&id).await
            }
            Err(e) => {
                tracing::warn!(%id, error = %e.message, "create failed; removing everything it set up");
                // Whichever step failed, nothing of it stays in memory (a token minted, its lock).
                self.forget(&id);
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
        let net = self.setup_net(rec).await?;
        let vm = match self.start_vm(engine, &spec).await {
            Ok(vm) => vm,
            Err(e) => {
                let _ = self.teardown_net(rec).await;
                return Err(e);
            }
        };
        let guest = GuestClient::new(net.supervisor_addr(), &secret);
        let ready = async {
            self.store.set_pid(&rec.id, Some(vm.pid())).await?;
            let probe = GuestClient::probe(net.supervisor_addr(), &secret);
            wait_healthy(&probe, vm.as_ref(), Duration::from_secs(self.cfg.boot_timeout_secs))
                .await
                .map_err(|why| with_console_tail(&spec, format!("sandbox {} did not become healthy: {why}", rec.id)))?;
            if !rec.env.is_empty() {
                let env = rec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                guest.set_env(env, false).await.map_err(ApiError::from_guest)?;
            }
            Ok::<_, ApiError>(())
        };
        if let Err(e) = ready.await {
            vm.terminate().await;
            let _ = self.teardown_net(rec).await;
            return Err(e);
        }
        Ok(Live::new(vm, net, guest, rec))
    }

    async fn start_vm(&self, engine: &Arc<dyn Engine>, spec: &VmSpec) -> Result<Box<dyn Vm>, ApiError> {
        let vm = engine.launch(spec).await.map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(vm)
    }

    /// Serves `router` to every sandbox from now on (on the gateway address in its namespace).
    pub fn set_guest_api(&self, router: axum::Router) {
        let _ = self.guest_api.set(router);
    }

    /// Starts watching a VM that is now live and running, with fresh credentials.
    async fn go_live(self: &Arc<Self>, id: &str, live: Arc<Live>, from: State) -> Result<(), ApiError> {
        // A resume pushes them itself, alongside the clock; a failed push leaves 0 here.
        if !live.credentials.pushed() {
            // The sandbox runs either way; a failed delivery is retried by the refresher.
            let first = from != State::Resuming;
            let pushed = self.push_credentials(id, &live.guest, first).await;
            live.credentials.record(id, &pushed, first);
        }
        self.watch(id, live, from).await
    }

    /// `go_live` for a VM found running after a restart: its credentials are delivered by the
    /// refresher within a second, not awaited here, so no guest can hold up start-up.
    async fn go_live_later(self: &Arc<Self>, id: &str, live: Arc<Live>, from: State) -> Result<(), ApiError> {
        live.credentials.due_now();
        self.watch(id, live, from).await
    }

    async fn watch(self: &Arc<Self>, id: &str, live: Arc<Live>, from: State) -> Result<(), ApiError> {
        self.live.lock().expect("live table poisoned").insert(id.to_owned(), live.clone());
        self.store.transition(id, &[from], State::Running, None).await?;
        self.background.spawn("vm-monitor", self.clone().monitor(id.to_owned(), live));
        Ok(())
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
        let tail = logs::CONSOLE.tail(&self.run_dir(&id), 5);
        let reason = if tail.trim().is_empty() {
            exit.description.clone()
        } else {
            format!("{}; console: {}", exit.description, tail.trim().replace('\n', " | "))
        };
        tracing::warn!(%id, %reason, "sandbox VM died");
        self.stop_egress(&id);
        let _ = live.net.teardown().await;
        let _ = self.store.set_pid(&id, None).await;
        let _ = self.store.transition(&id, lifecycle::VM_EXPECTED, State::Failed, Some(&reason)).await;
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
        let rec = self.record(id).await?;
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        self.begin(id, Op::Stop).await?;
        if let Err(e) = self.stop_running(&rec).await {
            self.fail_after_transient(id, State::Stopping, "stopping", &e).await;
            return Err(e);
        }
        self.get(id).await
    }

    async fn stop_running(&self, rec: &Record) -> Result<(), ApiError> {
        let id = rec.id.as_str();
        if let Some(live) = self.take_live(id) {
            let graceful = live.guest.shutdown(Duration::from_secs(5)).await.is_ok()
                && tokio::time::timeout(SHUTDOWN_GRACE, live.vm.wait_exit()).await.is_ok();
            if !graceful {
                tracing::warn!(%id, "guest did not power off cleanly; terminating the VM");
                live.vm.terminate().await;
            }
        }
        // A paused sandbox's memory snapshot has no meaning once it is stopped; the disk stays.
        torpor_engine::snapshot::discard(&self.run_dir(id));
        self.teardown_net(rec).await?;
        self.finish_stop(id).await
    }

    async fn finish_stop(&self, id: &str) -> Result<(), ApiError> {
        if let Some(engine) = self.engine.cached() {
            engine.release_run_dir(&self.run_dir(id));
        }
        self.store.set_pid(id, None).await?;
        self.finish(id, Op::Stop).await
    }

    /// Removes the sandbox and everything it owns.
    pub async fn delete(&self, id: &str) -> Result<(), ApiError> {
        let rec = self.record(id).await?;
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        self.begin(id, Op::Delete).await?;
        if let Err(e) = self.remove_everything(&rec).await {
            self.fail_after_transient(id, State::Stopping, "deleting", &e).await;
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
        self.teardown_net(rec).await?;
        let dir = self.run_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| ApiError::internal(format!("removing {}: {e}", dir.display())))?;
        }
        self.store.delete(id).await?;
        self.forget(id);
        Ok(())
    }

    /// Drops everything the daemon holds in memory for a sandbox whose record is gone.
    fn forget(&self, id: &str) {
        self.forget_credentials(id);
        self.proxy.forget(id);
        self.op_locks.lock().expect("lock table poisoned").remove(id);
        self.parked_clients.lock().expect("client table poisoned").remove(id);
    }

    /// Kills any VM of this sandbox that no live handle owns (left by an earlier daemon, or by
    /// an operation cut short before its pid was recorded).
    async fn kill_stale(&self, rec: &Record) {
        match self.engine() {
            Ok(engine) => engine.kill_stale(&rec.id).await,
            // The VMM was uninstalled since: its processes can still be running, and still must go.
            Err(_) => torpor_engine::kill_stale_vms(&rec.id).await,
        };
    }
}

pub(super) async fn wait_healthy(guest: &GuestClient, vm: &dyn Vm, timeout: Duration) -> Result<(), String> {
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
            return Err(format!(
                "no answer from the supervisor within {} s (last error: {last_error})",
                timeout.as_secs()
            ));
        }
        tokio::select! {
            exit = vm.wait_exit() => return Err(exit.description),
            // Short: after a resume the guest answers within milliseconds, and every poll we
            // oversleep is added to the resume time.
            _ = tokio::time::sleep(HEALTH_POLL) => {}
        }
    }
}

/// An error about a guest that did not answer, with the end of its console log.
pub(super) fn with_console_tail(spec: &VmSpec, message: String) -> ApiError {
    ApiError::internal(format!(
        "{message}\n--- console log (last {CONSOLE_TAIL_LINES} lines) ---\n{}",
        logs::CONSOLE.tail(&spec.run_dir, CONSOLE_TAIL_LINES)
    ))
}

/// A supervisor client authenticated with the sandbox's own secret.
pub(super) fn guest_client(spec: &VmSpec, net: &SandboxNet) -> Result<GuestClient, String> {
    let secret = std::fs::read_to_string(&spec.secret_file).map_err(|e| format!("reading the sandbox secret: {e}"))?;
    Ok(GuestClient::new(net.supervisor_addr(), secret.trim()))
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
pub(super) fn ensure_secret(path: &std::path::Path) -> Result<String, ApiError> {
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
