//! Pause, resume, wake on use, cold start, auto-pause and usage.
//!
//! A paused sandbox has no process at all: its RAM is a file, its device state a small snapshot
//! (see `torpor_engine::snapshot`), its network namespace an idle kernel object. Every operation
//! here holds the sandbox's op lock, so concurrent callers that find it paused cause one resume.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use torpor_engine::snapshot;

use super::lifecycle::Op;
use super::{guest_client, wait_healthy, Live, Manager};
use crate::error::ApiError;
use crate::store::Record;
use torpor_api::{Sandbox, State, Usage};

/// How often the auto-pause sweep looks for idle sandboxes.
const IDLE_SWEEP: Duration = Duration::from_secs(1);

impl Manager {
    /// Snapshots a running sandbox and ends its VM process.
    pub async fn pause(self: &Arc<Self>, id: &str) -> Result<Sandbox, ApiError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        self.pause_locked(id).await
    }

    /// Pauses only if the sandbox is still idle once its op lock is held: work may have started
    /// since the sweep looked.
    async fn pause_if_idle(self: &Arc<Self>, id: &str) -> Result<(), ApiError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        if self.live_handle(id).is_some_and(|l| l.due_for_pause()) {
            self.pause_locked(id).await?;
        }
        Ok(())
    }

    /// `pause` for a caller that holds the sandbox's op lock.
    pub(super) async fn pause_locked(self: &Arc<Self>, id: &str) -> Result<Sandbox, ApiError> {
        let rec = self.record(id).await?;
        self.begin(id, Op::Pause).await?;
        let Some(live) = self.live_handle(id) else {
            let e = ApiError::internal(format!("sandbox {id} has no live VM on this daemon"));
            self.fail_after_transient(id, State::Pausing, "pausing", &e).await;
            return Err(e);
        };
        // The VM is about to exit on purpose.
        live.stopping.store(true, Ordering::SeqCst);
        let started = std::time::Instant::now();
        match live.vm.pause_to_snapshot(&self.spec(&rec)).await {
            Ok(meta) => {
                self.live.lock().expect("live table poisoned").remove(id);
                self.parked_clients.lock().expect("client table poisoned").insert(id.to_owned(), live.guest.clone());
                let dir = self.run_dir(id);
                self.store.set_pid(id, None).await?;
                self.store.set_paused_bytes(id, dir_bytes_on_disk(&dir)).await?;
                self.finish(id, Op::Pause).await?;
                tracing::info!(%id, ms = started.elapsed().as_millis() as u64, state_bytes = meta.state_bytes, "sandbox paused");
                self.get(id).await
            }
            Err(e) => {
                let e = ApiError::internal(format!("pausing sandbox {id} failed: {e}"));
                if live.vm.guest_running().await.unwrap_or(false) {
                    live.stopping.store(false, Ordering::SeqCst);
                    self.store.transition(id, &[State::Pausing], State::Running, None).await?;
                    tracing::warn!(%id, error = %e.message, "pause failed; the sandbox keeps running");
                    Err(ApiError::internal(format!("{}; the sandbox keeps running", e.message)))
                } else {
                    live.vm.terminate().await;
                    self.live.lock().expect("live table poisoned").remove(id);
                    self.fail_after_transient(id, State::Pausing, "pausing", &e).await;
                    Err(e)
                }
            }
        }
    }

    /// Resumes a paused sandbox; 409 if it is not paused.
    pub async fn resume(self: &Arc<Self>, id: &str) -> Result<Sandbox, ApiError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let rec = self.record(id).await?;
        if !Op::Resume.rule().from.contains(&rec.state) {
            return Err(Op::Resume.refusal(id, rec.state));
        }
        self.resume_locked(&rec).await?;
        self.get(id).await
    }

    /// The live handle of a sandbox, resuming it first if it is paused (wake on use).
    pub async fn running(self: &Arc<Self>, id: &str) -> Result<Arc<Live>, ApiError> {
        if let Some(live) = self.live_handle(id) {
            // Touch first: an auto-pause deciding right now must see this use.
            live.touch();
            if self.record(id).await?.state == State::Running {
                return Ok(live);
            }
        }
        // Detached: a caller that gives up must not cut a resume short.
        let (manager, id) = (self.clone(), id.to_owned());
        tokio::spawn(async move { manager.wake(&id).await })
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(format!("resume task failed: {e}"))))
    }

    async fn wake(self: &Arc<Self>, id: &str) -> Result<Arc<Live>, ApiError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let rec = self.record(id).await?;
        match rec.state {
            State::Running => {}
            State::Paused => self.resume_locked(&rec).await?,
            other => return Err(ApiError::conflict(format!("sandbox {id} is {other}; it must be running or paused"))),
        }
        let live = self
            .live_handle(id)
            .ok_or_else(|| ApiError::conflict(format!("sandbox {id} is not running on this daemon")))?;
        live.touch();
        Ok(live)
    }

    async fn resume_locked(self: &Arc<Self>, rec: &Record) -> Result<(), ApiError> {
        let id = rec.id.as_str();
        let engine = self.engine()?;
        self.begin(id, Op::Resume).await?;
        let started = std::time::Instant::now();
        let mut net = self.net_for(rec);
        if !net.exists() {
            // The namespace does not survive a host reboot; the snapshot does.
            match self.setup_net(rec).await {
                Ok(n) => net = n,
                Err(e) => {
                    self.store.transition(id, &[State::Resuming], State::Paused, None).await?;
                    return Err(e);
                }
            }
        } else if !self.has_egress(id) {
            if let Err(e) = self.start_egress(rec, &net).await {
                self.store.transition(id, &[State::Resuming], State::Paused, None).await?;
                return Err(e);
            }
        }
        let spec = self.spec(rec);
        let vm = match engine.restore(&spec, torpor_engine::SnapshotSource::Own).await {
            Ok(vm) => vm,
            Err(e) => {
                let e = ApiError::internal(format!("resuming sandbox {id} failed: {e}"));
                if snapshot::exists(&spec.run_dir) {
                    // Nothing was used up: the sandbox is paused as before and may be retried.
                    self.store.transition(id, &[State::Resuming], State::Paused, None).await?;
                    return Err(e);
                }
                self.fail_after_transient(id, State::Resuming, "resuming", &e).await;
                return Err(e);
            }
        };
        let restored_ms = started.elapsed().as_millis() as u64;
        self.store.set_pid(id, Some(vm.pid())).await?;
        let parked = self.parked_clients.lock().expect("client table poisoned").remove(id);
        let guest = match parked {
            Some(client) => client,
            None => guest_client(&spec, &net).map_err(ApiError::internal)?,
        };
        let ready = async {
            wait_healthy(&guest, vm.as_ref(), Duration::from_secs(self.cfg.boot_timeout_secs)).await?;
            // The guest's wall clock stood still while it was paused, and its token may have
            // expired meanwhile: both are fixed at once, side by side.
            let credentials = async {
                let started = std::time::Instant::now();
                let pushed = self.push_credentials(id, &guest, false).await;
                (pushed, started.elapsed().as_millis() as u64)
            };
            let (clock, credentials) = tokio::join!(guest.sync_clock(), credentials);
            clock.map_err(|e| format!("setting the guest clock: {}", e.message()))?;
            Ok::<_, String>(credentials)
        };
        let (credentials, credentials_ms) = match ready.await {
            Ok(credentials) => credentials,
            Err(why) => {
                vm.terminate().await;
                let e = ApiError::internal(format!("sandbox {id} did not come back after resume: {why}"));
                self.fail_after_transient(id, State::Resuming, "resuming", &e).await;
                return Err(e);
            }
        };
        self.store.count_resume(id).await?;
        let live = Live::new(vm, net, guest, rec);
        live.credentials.record(id, &credentials, false);
        self.go_live(id, live, State::Resuming).await?;
        // restored_ms: VMM start, state load and `cont`; the rest is the guest answering again.
        // credentials_ms: issuing and pushing them (a GitHub token minted if one was due).
        tracing::info!(%id, ms = started.elapsed().as_millis() as u64, restored_ms, credentials_ms, "sandbox resumed");
        Ok(())
    }

    /// Cold-boots a stopped or failed sandbox from its disk.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<Sandbox, ApiError> {
        let lock = self.op_lock(id);
        let _op = lock.lock().await;
        let rec = self.record(id).await?;
        self.begin(id, Op::Start).await?;
        let engine = self.engine()?;
        self.kill_stale(&rec).await;
        snapshot::discard(&self.run_dir(id));
        let _ = self.teardown_net(&rec).await;
        match self.boot(&engine, &rec).await {
            Ok(live) => {
                self.go_live(id, live, State::Creating).await?;
                self.get(id).await
            }
            Err(e) => {
                self.fail_after_transient(id, State::Creating, "starting", &e).await;
                Err(e)
            }
        }
    }

    /// A lifecycle operation failed halfway: record why instead of staying in `from`.
    pub(super) async fn fail_after_transient(&self, id: &str, from: State, what: &str, e: &ApiError) {
        let reason = format!("{what} failed: {}", e.message);
        tracing::error!(%id, %reason);
        // A failed sandbox has no VM; its network and resolver go too (start sets them up anew).
        if let Ok(Some(rec)) = self.store.get(id).await {
            let _ = self.teardown_net(&rec).await;
        }
        let _ = self.store.set_pid(id, None).await;
        let _ = self.store.transition(id, &[from], State::Failed, Some(&reason)).await;
    }

    pub async fn usage(&self, id: &str) -> Result<Usage, ApiError> {
        let rec = self.record(id).await?;
        let (running_ms, paused_byte_ms) = rec.meter.totals(Utc::now());
        let running_seconds = running_ms as f64 / 1000.0;
        Ok(Usage {
            id: rec.id.clone(),
            running_seconds,
            vcpu_seconds: running_seconds * f64::from(rec.vcpus),
            memory_gib_seconds: running_seconds * f64::from(rec.memory_mib) / 1024.0,
            paused_bytes: if rec.state == State::Paused { rec.meter.paused_bytes } else { 0 },
            paused_byte_seconds: paused_byte_ms / 1000.0,
            storage_bytes: dir_bytes_on_disk(&self.run_dir(id)),
            resumes: rec.meter.resumes,
            limits: self.api_limits(&rec),
            model_requests: rec.meter.model.requests,
            model_input_tokens: rec.meter.model.input_tokens,
            model_output_tokens: rec.meter.model.output_tokens,
            model_token_budget: rec.models.as_ref().and_then(|m| m.budget()),
        })
    }

    /// Pauses sandboxes idle past their timeout, forever. Idle means no API call, no exec or
    /// transfer in flight.
    pub async fn auto_pause(self: Arc<Self>) {
        let mut tick = tokio::time::interval(IDLE_SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let candidates: Vec<(String, Arc<Live>)> =
                self.live.lock().expect("live table poisoned").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            self.refresh_due_credentials(&candidates);
            // The live table holds only sandboxes this daemon runs, each with its own timeout:
            // the sweep needs no store reads.
            for (id, live) in candidates {
                if !live.due_for_pause() {
                    continue;
                }
                let manager = self.clone();
                tokio::spawn(async move {
                    tracing::info!(%id, "auto-pausing idle sandbox");
                    if let Err(e) = manager.pause_if_idle(&id).await {
                        tracing::warn!(%id, error = %e.message, "auto-pause failed");
                    }
                });
            }
        }
    }
}

/// Allocated bytes of every file in a sandbox's directory (sparse files count what they hold).
pub(super) fn dir_bytes_on_disk(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.blocks() * 512).sum()
        })
        .unwrap_or(0)
}
