//! The engine as the daemon has it now. A host missing the VMM (or a tool it needs, or with an unusable
//! /dev/kvm when KVM was asked for) gets a daemon that starts anyway and says what to install;
//! once the host is fixed, the next request finds the engine, with no restart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use torpor_engine::Engine;

/// Makes the engine from the host as it is now; `Err` says what is missing and how to fix it.
pub type Probe = Box<dyn Fn() -> Result<Arc<dyn Engine>, String> + Send + Sync>;

/// How often a missing engine is looked for again (each look runs `which` and may time the TSC).
const RETRY: Duration = Duration::from_secs(1);

/// The engine, or why there is none, and when that was found.
type Probed = (Result<Arc<dyn Engine>, String>, Instant);

pub struct EngineSlot {
    probe: Probe,
    current: Mutex<Probed>,
}

impl EngineSlot {
    pub fn new(probe: Probe) -> Self {
        let first = probe();
        if let Err(e) = &first {
            tracing::error!("sandboxes cannot start until this is fixed: {e}");
        }
        Self { probe, current: Mutex::new((first, Instant::now())) }
    }

    /// The engine, probed again if it was missing at the last look.
    pub fn get(&self) -> Result<Arc<dyn Engine>, String> {
        let mut current = self.current.lock().expect("engine slot poisoned");
        if current.0.is_err() && current.1.elapsed() >= RETRY {
            current.0 = (self.probe)();
            current.1 = Instant::now();
            if current.0.is_ok() {
                tracing::info!("the host can run sandboxes now");
            }
        }
        current.0.clone()
    }

    /// The engine if the daemon has one, without looking again.
    pub fn cached(&self) -> Option<Arc<dyn Engine>> {
        self.current.lock().expect("engine slot poisoned").0.as_ref().ok().cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_fixed_host_is_found_without_a_restart() {
        let fixed = Arc::new(AtomicBool::new(false));
        let seen = fixed.clone();
        let slot = EngineSlot::new(Box::new(move || {
            if seen.load(Ordering::SeqCst) {
                Err("still a stand-in: no engine in unit tests, but the host was looked at again".into())
            } else {
                Err("a tool the engine needs was not found; run `apt-get install the-tool`".into())
            }
        }));
        let error = |slot: &EngineSlot| slot.get().err().expect("no engine in unit tests");
        assert!(error(&slot).contains("the-tool"));
        fixed.store(true, Ordering::SeqCst);
        // Looked at again once `RETRY` has passed, not before.
        assert!(error(&slot).contains("the-tool"));
        slot.current.lock().unwrap().1 -= RETRY;
        assert!(error(&slot).contains("looked at again"));
    }
}
