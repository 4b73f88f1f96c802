//! What a sandbox's resolver remembers of its answers: which addresses it handed out, until
//! when, and for which names. The guest chooses the names (any number, under a wildcard or in
//! open mode), so every part of it is bounded: addresses (the nftables set's size), names per
//! address (the most recent few), and name bytes per sandbox. It also meters how often answers
//! may change the firewall, each change being a process on the host.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Names remembered per address: the most recent.
pub(crate) const NAMES_PER_ADDRESS: usize = 16;
/// Bytes of names remembered per sandbox; past that, new names are not remembered (their
/// addresses still are: names only decide what survives a policy change, and what is shown).
pub(crate) const NAME_BYTES: usize = 1 << 20;
/// Firewall updates per second an answer may cause, and a burst.
const UPDATES_PER_SEC: f64 = 20.0;
const UPDATES_BURST: f64 = 40.0;

pub(crate) struct Entry {
    /// Oldest first.
    pub names: Vec<String>,
    pub expires: Instant,
}

pub(crate) struct Resolved {
    entries: HashMap<Ipv4Addr, Entry>,
    name_bytes: usize,
    max_addresses: usize,
    updates: TokenBucket,
}

impl Resolved {
    pub fn new(max_addresses: usize, now: Instant) -> Self {
        Self { entries: HashMap::new(), name_bytes: 0, max_addresses, updates: TokenBucket::new(now) }
    }

    /// Addresses (no names: those are lost with the old daemon) with their time left.
    pub fn restore(&mut self, addrs: impl IntoIterator<Item = (Ipv4Addr, Duration)>, now: Instant) {
        for (ip, left) in addrs {
            self.entries.insert(ip, Entry { names: Vec::new(), expires: now + left });
        }
    }

    pub fn live(&self, now: Instant) -> impl Iterator<Item = (&Ipv4Addr, &Entry)> {
        self.entries.iter().filter(move |(_, e)| e.expires > now)
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.name_bytes = 0;
    }

    /// Which of `addrs` (with the time each should stay allowed) the firewall must learn:
    /// (not in it, in it with too short a time).
    #[allow(clippy::type_complexity)]
    pub fn changes(
        &self,
        addrs: &[(Ipv4Addr, Duration)],
        now: Instant,
    ) -> (Vec<(Ipv4Addr, Duration)>, Vec<(Ipv4Addr, Duration)>) {
        let (mut fresh, mut refresh) = (Vec::new(), Vec::new());
        for &(ip, ttl) in addrs {
            match self.entries.get(&ip) {
                None => fresh.push((ip, ttl)),
                // The kernel may still hold it (expired or not), and a plain add would keep its
                // old timeout. A second of slack absorbs rounding.
                Some(e) if e.expires + Duration::from_secs(1) < now + ttl => refresh.push((ip, ttl)),
                Some(_) => {}
            }
        }
        (fresh, refresh)
    }

    /// Whether an answer may change the firewall now (a token is taken if so).
    pub fn may_update(&mut self, now: Instant) -> bool {
        self.updates.take(now)
    }

    /// Records that `qname` resolved to `ip`, allowed for `ttl` from `now`.
    pub fn remember(&mut self, ip: Ipv4Addr, ttl: Duration, qname: &str, now: Instant) {
        let entry = self.entries.entry(ip).or_insert_with(|| Entry { names: Vec::new(), expires: now });
        entry.expires = entry.expires.max(now + ttl);
        if let Some(pos) = entry.names.iter().position(|n| n == qname) {
            let name = entry.names.remove(pos);
            entry.names.push(name);
        } else if self.name_bytes + qname.len() <= NAME_BYTES {
            entry.names.push(qname.to_owned());
            self.name_bytes += qname.len();
            if entry.names.len() > NAMES_PER_ADDRESS {
                let oldest = entry.names.remove(0);
                self.name_bytes -= oldest.len();
            }
        }
        if self.entries.len() > self.max_addresses {
            self.forget_soonest(now);
        }
    }

    /// Past the address bound: the expired go, then those expiring soonest (they stay in the
    /// kernel's set until their own timeout).
    fn forget_soonest(&mut self, now: Instant) {
        self.retain(|_, e| e.expires > now);
        let excess = self.entries.len().saturating_sub(self.max_addresses);
        if excess > 0 {
            let mut by_expiry: Vec<(Instant, Ipv4Addr)> = self.entries.iter().map(|(ip, e)| (e.expires, *ip)).collect();
            by_expiry.sort();
            let gone: Vec<Ipv4Addr> = by_expiry.into_iter().take(excess).map(|(_, ip)| ip).collect();
            self.retain(|ip, _| !gone.contains(ip));
        }
    }

    /// Keeps the entries for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&Ipv4Addr, &Entry) -> bool) {
        let mut freed = 0;
        self.entries.retain(|ip, e| {
            let kept = keep(ip, e);
            if !kept {
                freed += e.names.iter().map(String::len).sum::<usize>();
            }
            kept
        });
        self.name_bytes -= freed;
    }

    /// Keeps, in every entry, the names for which `keep` holds.
    pub fn retain_names(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let mut freed = 0;
        for entry in self.entries.values_mut() {
            entry.names.retain(|n| {
                let kept = keep(n);
                if !kept {
                    freed += n.len();
                }
                kept
            });
        }
        self.name_bytes -= freed;
    }

    #[cfg(test)]
    fn name_bytes(&self) -> usize {
        self.name_bytes
    }
}

struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(now: Instant) -> Self {
        Self { tokens: UPDATES_BURST, last: now }
    }

    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * UPDATES_PER_SEC;
        self.tokens = (self.tokens + refill).min(UPDATES_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_names_for_one_address_stay_bounded() {
        let now = Instant::now();
        let mut r = Resolved::new(16384, now);
        let ip = Ipv4Addr::new(198, 18, 0, 1);
        for i in 0..1_000_000 {
            r.remember(ip, Duration::from_secs(60), &format!("n{i}.wild.example"), now);
        }
        let names = &r.live(now).next().unwrap().1.names;
        assert_eq!(names.len(), NAMES_PER_ADDRESS);
        assert_eq!(names.last().unwrap(), "n999999.wild.example", "the most recent are kept");
        assert!(r.name_bytes() <= NAME_BYTES);
    }

    #[test]
    fn name_bytes_are_bounded_over_many_addresses() {
        let now = Instant::now();
        let mut r = Resolved::new(16384, now);
        for i in 0..16384u32 {
            let ip = Ipv4Addr::from(0xC612_0000 + i);
            for j in 0..16 {
                r.remember(ip, Duration::from_secs(60), &format!("{j}-{}", "x".repeat(200)), now);
            }
        }
        assert!(r.name_bytes() <= NAME_BYTES);
        let total: usize = r.live(now).flat_map(|(_, e)| e.names.iter()).map(String::len).sum();
        assert_eq!(total, r.name_bytes(), "the count matches what is held");
        r.retain(|_, _| false);
        assert_eq!(r.name_bytes(), 0);
    }

    #[test]
    fn addresses_past_the_bound_expiring_soonest_go_first() {
        let now = Instant::now();
        let mut r = Resolved::new(2, now);
        r.remember(Ipv4Addr::new(1, 0, 0, 1), Duration::from_secs(10), "a", now);
        r.remember(Ipv4Addr::new(1, 0, 0, 2), Duration::from_secs(30), "b", now);
        r.remember(Ipv4Addr::new(1, 0, 0, 3), Duration::from_secs(20), "c", now);
        let mut left: Vec<Ipv4Addr> = r.live(now).map(|(ip, _)| *ip).collect();
        left.sort();
        assert_eq!(left, [Ipv4Addr::new(1, 0, 0, 2), Ipv4Addr::new(1, 0, 0, 3)]);
    }

    #[test]
    fn firewall_updates_are_metered() {
        let now = Instant::now();
        let mut r = Resolved::new(16, now);
        let allowed = (0..1000).filter(|_| r.may_update(now)).count();
        assert_eq!(allowed, UPDATES_BURST as usize);
        assert!(r.may_update(now + Duration::from_secs(1)), "refilled a second later");
    }
}
