//! Per-disk QoS: IOPS and bandwidth limits across every export, connection and reactor
//! of a disk, changeable while it runs.
//!
//! Each limit is a GCRA (generic cell rate algorithm, the "virtual scheduling" form of a
//! token bucket): one atomic theoretical arrival time (TAT) per limit. A request of
//! cost `c` (one operation, or its bytes) moves the TAT to `max(TAT, now) + c/rate` with
//! one compare-and-swap, and waits until `TAT - burst` — so up to `burst` seconds of
//! unused budget can be spent at once, and beyond that requests are paced. Requests
//! wait (a reactor timer), never fail. The reservation is taken before waiting, so
//! waiters are served in arrival order without retry loops.
//!
//! With no limit set, admission costs one relaxed load of a flag that never changes
//! under I/O: no shared write per request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Limits of one disk; zero means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QosLimits {
    pub iops: u64,
    /// Bytes per second.
    pub bandwidth: u64,
    /// Seconds of budget that may be saved up.
    pub burst: f64,
}

struct Gcra {
    /// Nanoseconds per unit (0 = unlimited).
    ns_per_unit_x1000: AtomicU64,
    burst_ns: AtomicU64,
    /// Theoretical arrival time, in nanoseconds since `Qos::epoch`.
    tat: AtomicU64,
}

impl Gcra {
    fn new() -> Self {
        Gcra {
            ns_per_unit_x1000: AtomicU64::new(0),
            burst_ns: AtomicU64::new(0),
            tat: AtomicU64::new(0),
        }
    }

    fn set(&self, rate: u64, burst: f64) {
        let per = if rate == 0 {
            0
        } else {
            (1_000_000_000_000u128 / u128::from(rate)).min(u128::from(u64::MAX)) as u64
        };
        self.ns_per_unit_x1000.store(per, Ordering::Relaxed);
        self.burst_ns.store((burst * 1e9) as u64, Ordering::Relaxed);
    }

    /// Reserves `units`; returns how long the caller must wait.
    fn reserve(&self, units: u64, now_ns: u64) -> u64 {
        let per = self.ns_per_unit_x1000.load(Ordering::Relaxed);
        if per == 0 {
            return 0;
        }
        let cost =
            (u128::from(units) * u128::from(per) / 1000).min(u128::from(u64::MAX / 4)) as u64;
        let burst = self.burst_ns.load(Ordering::Relaxed);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            // An idle disk starts again from now: it has saved at most `burst`.
            let base = tat.max(now_ns);
            let new_tat = base + cost;
            match self.tat.compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return new_tat.saturating_sub(now_ns + burst),
                Err(t) => tat = t,
            }
        }
    }
}

/// A disk's QoS state, shared by every channel of the disk.
pub struct Qos {
    enabled: AtomicBool,
    epoch: Instant,
    ops: Gcra,
    bytes: Gcra,
    limits: std::sync::Mutex<QosLimits>,
}

impl Default for Qos {
    fn default() -> Self {
        Qos {
            enabled: AtomicBool::new(false),
            epoch: Instant::now(),
            ops: Gcra::new(),
            bytes: Gcra::new(),
            limits: std::sync::Mutex::new(QosLimits::default()),
        }
    }
}

impl Qos {
    /// Sets (or lifts, with zeros) the limits; takes effect for the next request.
    pub fn set(&self, l: QosLimits) {
        let burst = if l.burst > 0.0 { l.burst } else { 0.1 };
        self.ops.set(l.iops, burst);
        self.bytes.set(l.bandwidth, burst);
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = l;
        self.enabled.store(l.iops > 0 || l.bandwidth > 0, Ordering::Release);
    }

    pub fn limits(&self) -> QosLimits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a request of `bytes` must wait before it may run (reserved now).
    pub fn admit_delay(&self, bytes: u64) -> Duration {
        if !self.enabled.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        let a = self.ops.reserve(1, now);
        let b = self.bytes.reserve(bytes, now);
        Duration::from_nanos(a.max(b))
    }

    /// Waits (on the current reactor) until a request of `bytes` may run.
    pub async fn admit(&self, bytes: u64) {
        let d = self.admit_delay(bytes);
        if !d.is_zero() {
            poller::sleep(d).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_to_the_rate_after_the_burst() {
        let g = Gcra::new();
        g.set(1000, 0.01); // 1000/s, 10 ms of burst = 10 units
        let now = 1_000_000_000;
        let waits: Vec<u64> = (0..30).map(|_| g.reserve(1, now)).collect();
        assert!(waits[..10].iter().all(|&w| w == 0), "the burst is free: {waits:?}");
        assert!(waits[10..].windows(2).all(|w| w[1] > w[0]), "then paced");
        assert_eq!(waits[29], 20_000_000, "30 ops at 1000/s after 10 free: 20 ms");
        // Unlimited.
        let g = Gcra::new();
        assert_eq!(g.reserve(1 << 40, now), 0);
    }

    #[test]
    fn idle_time_accrues_only_the_burst() {
        let g = Gcra::new();
        g.set(100, 0.05); // 5 ops of burst
        assert_eq!(g.reserve(1, 0), 0);
        let later = 10_000_000_000; // ten idle seconds
        let waits: Vec<u64> = (0..8).map(|_| g.reserve(1, later)).collect();
        assert_eq!(waits.iter().filter(|&&w| w == 0).count(), 5, "{waits:?}");
    }
}
