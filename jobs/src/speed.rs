//! A job's speed limit: copies are issued no faster than `speed` bytes per second on
//! average, with no more than a tenth of a second's worth ahead (so a lowered limit
//! takes effect at once and a raised one is not owed a burst).

use std::time::{Duration, Instant};

/// Credit a limiter may run ahead.
const SLACK: Duration = Duration::from_millis(100);

pub struct Limiter {
    /// When the next byte may go.
    next: Instant,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new()
    }
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter { next: Instant::now() }
    }

    /// The wait before `bytes` may go at `speed` bytes per second (0: none), charging
    /// them.
    pub fn charge(&mut self, bytes: u64, speed: u64) -> Duration {
        let now = Instant::now();
        if speed == 0 {
            self.next = now;
            return Duration::ZERO;
        }
        // Idle time earns at most SLACK of credit.
        self.next = self.next.max(now.checked_sub(SLACK).unwrap_or(now));
        let wait = self.next.saturating_duration_since(now);
        self.next += Duration::from_secs_f64(bytes as f64 / speed as f64);
        wait
    }

    /// Waits (on the reactor's timers) until `bytes` may go.
    pub async fn wait(&mut self, bytes: u64, speed: u64) {
        let d = self.charge(bytes, speed);
        if !d.is_zero() {
            poller::sleep(d).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_pace_at_the_speed() {
        let mut l = Limiter::new();
        assert_eq!(l.charge(1 << 20, 0), Duration::ZERO);
        // 10 MiB at 10 MiB/s: the first goes at once, the last about 0.9 s later.
        let waits: Vec<Duration> = (0..10).map(|_| l.charge(1 << 20, 10 << 20)).collect();
        assert_eq!(waits[0], Duration::ZERO);
        assert!(waits[9] > Duration::from_millis(800) && waits[9] <= Duration::from_millis(900));
    }
}
