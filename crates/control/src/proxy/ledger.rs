//! Each sandbox's share of the model proxy: how many of its requests may be in flight, and the
//! tokens reserved by those in flight, so that many requests started at once cannot all pass a
//! budget that only one of them fits. Also the daemon-wide bound on request bodies held in
//! memory at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Requests of one sandbox in flight at once (agents run a few in parallel: subagents, token
/// counts).
pub const IN_FLIGHT: usize = 8;
/// Request bodies held in memory at once, in MiB: by one sandbox (one largest request, twice),
/// and over every sandbox. Only bytes that arrived count, so a sandbox that declares a large
/// body and sends nothing holds nothing.
pub const SANDBOX_BUFFERED_MIB: u32 = 64;
pub const BUFFERED_MIB: u32 = 512;

struct Account {
    in_flight: Arc<Semaphore>,
    buffers: Arc<Semaphore>,
    reserved: u64,
}

impl Default for Account {
    fn default() -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            buffers: Arc::new(Semaphore::new(SANDBOX_BUFFERED_MIB as usize)),
            reserved: 0,
        }
    }
}

pub struct Ledger {
    accounts: Mutex<HashMap<String, Account>>,
    buffers: Arc<Semaphore>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self { accounts: Mutex::new(HashMap::new()), buffers: Arc::new(Semaphore::new(BUFFERED_MIB as usize)) }
    }
}

/// One request's place: released when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// Room for one request's body while the daemon holds it: grown as the body arrives, given
/// back when the body has gone upstream.
pub struct Buffer {
    own: Arc<Semaphore>,
    all: Arc<Semaphore>,
    permits: Vec<OwnedSemaphorePermit>,
    mib: u32,
}

impl Buffer {
    /// Room for `bytes` (twice: a rewritten copy of the body may be made); false when the
    /// sandbox, or the daemon, holds all it may already.
    pub fn cover(&mut self, bytes: usize) -> bool {
        let need = (2 * bytes).div_ceil(1 << 20).max(1) as u32;
        if need <= self.mib {
            return true;
        }
        let more = need - self.mib;
        let Ok(own) = self.own.clone().try_acquire_many_owned(more) else { return false };
        let Ok(all) = self.all.clone().try_acquire_many_owned(more) else { return false };
        self.permits.extend([own, all]);
        self.mib = need;
        true
    }
}

impl Ledger {
    /// A place for one more request of `id`, if it has fewer than `IN_FLIGHT`.
    pub fn slot(&self, id: &str) -> Option<Slot> {
        let semaphore =
            self.accounts.lock().expect("ledger poisoned").entry(id.to_owned()).or_default().in_flight.clone();
        semaphore.try_acquire_owned().ok().map(|permit| Slot { _permit: permit })
    }

    /// Room for one request body of sandbox `id`, empty until `Buffer::cover` grows it.
    pub fn buffer(&self, id: &str) -> Buffer {
        let own = self.accounts.lock().expect("ledger poisoned").entry(id.to_owned()).or_default().buffers.clone();
        Buffer { own, all: self.buffers.clone(), permits: Vec::new(), mib: 0 }
    }

    /// Reserves `tokens` for `id` if what it has spent and reserved is under `budget`; returns
    /// what was spent and reserved before.
    pub fn reserve(&self, id: &str, spent: u64, budget: u64, tokens: u64) -> Result<(), u64> {
        let mut accounts = self.accounts.lock().expect("ledger poisoned");
        let account = accounts.entry(id.to_owned()).or_default();
        let committed = spent.saturating_add(account.reserved);
        if committed >= budget {
            return Err(committed);
        }
        account.reserved = account.reserved.saturating_add(tokens);
        Ok(())
    }

    /// The request that reserved `tokens` has been booked.
    pub fn release(&self, id: &str, tokens: u64) {
        if let Some(account) = self.accounts.lock().expect("ledger poisoned").get_mut(id) {
            account.reserved = account.reserved.saturating_sub(tokens);
        }
    }

    /// The sandbox is gone.
    pub fn forget(&self, id: &str) {
        self.accounts.lock().expect("ledger poisoned").remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_requests_are_capped_per_sandbox() {
        let ledger = Ledger::default();
        let held: Vec<Slot> = (0..IN_FLIGHT).map(|_| ledger.slot("sb-a").unwrap()).collect();
        assert!(ledger.slot("sb-a").is_none());
        assert!(ledger.slot("sb-b").is_some(), "another sandbox is not affected");
        drop(held);
        assert!(ledger.slot("sb-a").is_some());
    }

    #[test]
    fn reservations_stop_a_burst_at_the_budget() {
        let ledger = Ledger::default();
        let passed = (0..50).filter(|_| ledger.reserve("sb-a", 0, 30, 20).is_ok()).count();
        assert_eq!(passed, 2, "20 reserved is under 30; 40 is not");
        ledger.release("sb-a", 40);
        assert!(ledger.reserve("sb-a", 29, 30, 20).is_ok());
        assert_eq!(ledger.reserve("sb-a", 29, 30, 20), Err(49));
    }

    #[test]
    fn buffers_are_bounded_per_sandbox_and_daemon_wide() {
        let ledger = Ledger::default();
        let mut a = ledger.buffer("sb-a");
        assert!(a.cover(1000));
        assert!(a.cover(32 << 20), "one largest request, twice");
        assert!(!ledger.buffer("sb-a").cover(1 << 20), "past the sandbox's share");
        drop(a);
        let sandboxes = (BUFFERED_MIB / SANDBOX_BUFFERED_MIB) as usize;
        let held: Vec<Buffer> = (0..sandboxes)
            .map(|i| {
                let mut b = ledger.buffer(&format!("sb-{i}"));
                assert!(b.cover(32 << 20));
                b
            })
            .collect();
        assert!(!ledger.buffer("sb-last").cover(1 << 20), "past the daemon's budget");
        drop(held);
        assert!(ledger.buffer("sb-last").cover(1 << 20));
    }
}
