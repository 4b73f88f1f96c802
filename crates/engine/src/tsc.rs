//! Measuring the host's TSC frequency. Under TCG the guest's TSC is the host's, so telling the
//! guest kernel its frequency spares it a calibration that goes wrong on a busy host.

use std::time::{Duration, Instant};

#[cfg(target_arch = "x86_64")]
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    // Without a constant, non-stop TSC a measured rate would mean nothing.
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    if !(flags.contains(" constant_tsc") && flags.contains(" nonstop_tsc")) {
        return None;
    }
    // Three short samples, keeping the median, to ride out a preemption during one of them.
    let mut samples: Vec<u64> = (0..3).map(|_| sample(Duration::from_millis(20))).collect();
    samples.sort_unstable();
    Some(samples[1])
}

#[cfg(target_arch = "x86_64")]
fn sample(window: Duration) -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    let (t0, c0) = (Instant::now(), unsafe { core::arch::x86_64::_rdtsc() });
    while t0.elapsed() < window {
        std::hint::spin_loop();
    }
    // SAFETY: as above.
    let (elapsed, c1) = (t0.elapsed(), unsafe { core::arch::x86_64::_rdtsc() });
    ((c1 - c0) as f64 / elapsed.as_secs_f64() / 1000.0).round() as u64
}

#[cfg(not(target_arch = "x86_64"))]
pub fn host_tsc_khz() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn measures_a_plausible_frequency_where_the_tsc_is_invariant() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let invariant = cpuinfo.contains(" constant_tsc") && cpuinfo.contains(" nonstop_tsc");
        match super::host_tsc_khz() {
            Some(khz) => assert!((100_000..10_000_000).contains(&khz), "{khz} kHz"),
            None => assert!(!invariant, "the TSC is invariant but was not measured"),
        }
    }
}
