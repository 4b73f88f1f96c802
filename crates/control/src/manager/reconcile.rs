//! Start-up reconciliation: bring the store and the host into agreement after the daemon was
//! stopped or killed, whatever it was doing. Every sandbox ends up running, paused, stopped or
//! failed with a reason; none is lost and none stays in a transient state.

use std::sync::Arc;
use std::time::Duration;

use torpor_engine::snapshot;
use torpor_net::SandboxNet;

use super::{guest_client, Live, Manager};
use crate::error::ApiError;
use crate::store::Record;
use torpor_api::State;

enum Outcome {
    Adopted,
    Paused,
    Failed(String),
}

/// What `reconcile` found at start-up.
#[derive(Debug, Default, PartialEq)]
pub struct Reconciled {
    pub adopted: Vec<String>,
    /// Sandboxes marked failed because their VM could not be adopted, with the reason.
    pub failed: Vec<(String, String)>,
    /// Sandboxes whose pause or resume was cut short and that are paused again.
    pub paused: Vec<String>,
    /// Leftovers of sandboxes that have no record (removed).
    pub orphans: Vec<String>,
}

impl Manager {
    pub async fn reconcile(self: &Arc<Self>) -> Result<Reconciled, ApiError> {
        let mut report = Reconciled::default();
        let records = self.store.list().await?;
        // Side by side: each sandbox's steps have deadlines, and no guest's may add to another's.
        let outcomes = futures::future::join_all(records.iter().map(|rec| self.reconcile_one(rec))).await;
        for (rec, outcome) in records.iter().zip(outcomes) {
            match outcome? {
                Some(Outcome::Adopted) => report.adopted.push(rec.id.clone()),
                Some(Outcome::Paused) => report.paused.push(rec.id.clone()),
                Some(Outcome::Failed(reason)) => report.failed.push((rec.id.clone(), reason)),
                None => {}
            }
        }
        report.orphans = self.remove_orphans(&records).await;
        // Paused sandboxes keep their namespace (and its rules); their resolver went with the
        // old daemon. Running ones got theirs back when adopted.
        for rec in self.store.list().await? {
            let net = self.net_for(&rec);
            if rec.state == State::Paused && net.exists() {
                if let Err(e) = self.start_egress(&rec, &net).await {
                    tracing::warn!(id = %rec.id, error = %e.message, "egress of a paused sandbox not restored; it will be on resume");
                    let _ = self.teardown_net(&rec).await;
                }
            }
        }
        Ok(report)
    }

    /// Brings one sandbox into agreement with the host; `None` when nothing was to be done.
    async fn reconcile_one(self: &Arc<Self>, rec: &Record) -> Result<Option<Outcome>, ApiError> {
        let net = self.net_for(rec);
        let dir = self.run_dir(&rec.id);
        let outcome = match rec.state {
            State::Running => self.adopt(rec, &net, false).await.map(|_| State::Running),
            // Cut short mid-pause: a sealed snapshot wins (finish the pause); otherwise the guest
            // is only stopped, so let it run on.
            State::Pausing if snapshot::exists(&dir) => {
                self.kill_stale(rec).await;
                Ok(State::Paused)
            }
            State::Pausing => self.adopt(rec, &net, true).await.map(|_| State::Running),
            // Cut short mid-resume: an unused snapshot means the guest never ran from it.
            State::Resuming if snapshot::exists(&dir) => {
                self.kill_stale(rec).await;
                Ok(State::Paused)
            }
            State::Resuming => self.adopt(rec, &net, true).await.map(|_| State::Running),
            State::Creating => Err("the daemon stopped while the sandbox was being created".to_owned()),
            State::Stopping => {
                self.kill_leftovers(rec, &net).await;
                self.finish_stop(&rec.id).await?;
                return Ok(None);
            }
            State::Paused => {
                // No VM may run for a paused sandbox; its namespace stays for the resume.
                self.kill_stale(rec).await;
                return Ok(None);
            }
            State::Stopped | State::Failed => {
                let _ = net.teardown().await;
                return Ok(None);
            }
        };
        Ok(Some(match outcome {
            Ok(State::Running) => Outcome::Adopted,
            Ok(_) => {
                self.store.set_pid(&rec.id, None).await?;
                self.store.set_paused_bytes(&rec.id, super::suspend::dir_bytes_on_disk(&dir)).await?;
                self.store.transition(&rec.id, &[rec.state], State::Paused, None).await?;
                Outcome::Paused
            }
            Err(why) => {
                let reason = if rec.state == State::Creating {
                    why
                } else {
                    format!("could not adopt the VM after a daemon restart ({} when it stopped): {why}", rec.state)
                };
                tracing::warn!(id = %rec.id, %reason);
                self.kill_leftovers(rec, &net).await;
                self.store.transition(&rec.id, &[rec.state], State::Failed, Some(&reason)).await?;
                Outcome::Failed(reason)
            }
        }))
    }

    /// Takes over a VM an earlier daemon started. `may_be_stopped`: its CPUs may be stopped by a
    /// pause or resume that was cut short; they are continued.
    async fn adopt(self: &Arc<Self>, rec: &Record, net: &SandboxNet, may_be_stopped: bool) -> Result<(), String> {
        let engine = self.engine.get()?;
        // A resume cut short may not have recorded its VM's pid yet.
        let pid = rec.pid.or_else(|| engine.find_vm(&rec.id)).ok_or("no VM process is running")?;
        if !net.exists() {
            return Err(format!("its network namespace {} is gone", net.netns));
        }
        let spec = self.spec(rec);
        let vm = engine.adopt(&spec, pid).await.map_err(|e| e.to_string())?;
        if may_be_stopped && !vm.guest_running().await.map_err(|e| e.to_string())? {
            vm.continue_guest().await.map_err(|e| e.to_string())?;
        }
        self.start_egress(rec, net).await.map_err(|e| e.message)?;
        let guest = guest_client(&spec, net)?;
        guest.health(Duration::from_secs(5)).await.map_err(|e| format!("supervisor health check: {}", e.message()))?;
        if rec.state == State::Resuming {
            let _ = guest.sync_clock().await;
            let _ = self.store.count_resume(&rec.id).await;
        }
        self.go_live_later(&rec.id, Live::new(vm, net.clone(), guest, rec), rec.state).await.map_err(|e| e.message)?;
        tracing::info!(id = %rec.id, pid, "adopted running sandbox");
        Ok(())
    }

    async fn kill_leftovers(&self, rec: &Record, net: &SandboxNet) {
        self.kill_stale(rec).await;
        self.stop_egress(&rec.id);
        let _ = net.teardown().await;
        let _ = self.store.set_pid(&rec.id, None).await;
    }

    /// Sandbox directories in our data dir without a record: a create that died before its
    /// record was written, or a delete that died after. Their VM and network go too.
    async fn remove_orphans(&self, records: &[Record]) -> Vec<String> {
        let mut orphans = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.cfg.sandboxes_dir()) else {
            return orphans;
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if records.iter().any(|r| r.id == id) || !torpor_api::is_valid_sandbox_id(&id) {
                continue;
            }
            torpor_engine::kill_stale_vms(&id).await;
            let unspecified = std::net::Ipv4Addr::UNSPECIFIED;
            let _ = SandboxNet::new(&id, unspecified, unspecified).teardown().await;
            let _ = std::fs::remove_dir_all(entry.path());
            tracing::warn!(%id, "removed leftovers of a sandbox with no record");
            orphans.push(id);
        }
        orphans
    }
}
