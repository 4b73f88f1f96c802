//! The daemon's background work as named tasks in one set, so that a shutdown stops them all
//! before the daemon exits instead of leaving them to the runtime's teardown. A task stops at its
//! next await, as it would if the process ended there: what it was doing must already be safe to
//! cut (the relay marks a message delivered only after its reply went out, so a cut delivery is
//! made again after a restart; a cut pause or resume is what reconcile finishes). Sandboxes keep
//! running: their VMs are not the daemon's tasks.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Default)]
pub struct Background {
    tasks: Mutex<JoinSet<&'static str>>,
    stop: CancellationToken,
}

impl Background {
    /// Runs `work` until it ends or the daemon shuts down. `name` says what it is in logs
    /// (`auto-pause`, `vm-monitor`, `relay-worker`).
    pub fn spawn(&self, name: &'static str, work: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        let task = async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = work => {}
            }
            name
        };
        let mut tasks = self.tasks.lock().expect("task set poisoned");
        // Finished tasks' results are dropped here, so the set holds only running ones.
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                if e.is_panic() {
                    tracing::error!(error = %e, "a background task panicked");
                }
            }
        }
        tasks.spawn(task.instrument(tracing::info_span!("task", name)));
    }

    /// How many tasks are running.
    pub fn running(&self) -> usize {
        let mut tasks = self.tasks.lock().expect("task set poisoned");
        while tasks.try_join_next().is_some() {}
        tasks.len()
    }

    /// Tells every task to stop and waits up to `grace` for them to end; any still running then
    /// (one stuck in blocking code) is counted in the log and aborted.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("task set poisoned"));
        let drained = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(left = tasks.len(), "background tasks did not stop in time; aborting them");
            tasks.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_stops_every_task_and_finished_ones_are_not_kept() {
        let background = Background::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        for _ in 0..3 {
            let tx = tx.clone();
            background.spawn("forever", async move {
                let _guard = tx;
                std::future::pending::<()>().await;
            });
        }
        background.spawn("short", async {});
        tokio::task::yield_now().await;
        assert_eq!(background.running(), 3, "the finished task is not kept");
        drop(tx);
        background.shutdown(Duration::from_secs(5)).await;
        // Every task dropped its sender: none is left running.
        assert!(rx.recv().await.is_none());
        assert_eq!(background.running(), 0);
    }
}
