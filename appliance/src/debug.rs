//! Debug hooks for tests and benchmarks, set by environment variables read once:
//! nothing is set in production, and then each request pays one load of a cached
//! value.
//!
//! - `APPLIANCE_DEBUG_DELAY_US=N` delays every request by N microseconds: benchmarks use
//!   it to prove they see a slower server, the reconnect test to keep requests in
//!   flight while the appliance is killed.
//! - `APPLIANCE_DEBUG_PANIC_OFFSET=BYTES` panics the reactor that takes a request
//!   covering that byte offset of any disk: the test of the panic policy (a panic ends
//!   the whole process at once, see `cli::install_panic_policy`).

use std::sync::OnceLock;
use std::time::Duration;

struct Hooks {
    delay: Duration,
    panic_at: Option<u64>,
}

fn hooks() -> &'static Hooks {
    static HOOKS: OnceLock<Hooks> = OnceLock::new();
    HOOKS.get_or_init(|| {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        let us = var("APPLIANCE_DEBUG_DELAY_US").unwrap_or(0);
        if us > 0 {
            tracing::warn!("APPLIANCE_DEBUG_DELAY_US={us}: every request is delayed (test and benchmark self-check)");
        }
        let panic_at = var("APPLIANCE_DEBUG_PANIC_OFFSET");
        if let Some(at) = panic_at {
            tracing::warn!("APPLIANCE_DEBUG_PANIC_OFFSET={at}: a request there panics the appliance (test of the panic policy)");
        }
        Hooks { delay: Duration::from_micros(us), panic_at }
    })
}

/// Reads the hooks now (at start-up), so their warnings come first.
pub fn init() {
    hooks();
}

/// Runs before every export request on `off..off + len`.
pub async fn before_request(off: u64, len: u64) {
    let h = hooks();
    if let Some(at) = h.panic_at
        && off <= at
        && at < off.saturating_add(len.max(1))
    {
        panic!(
            "APPLIANCE_DEBUG_PANIC_OFFSET: deliberate panic on a request at byte {off} ({len} bytes)"
        );
    }
    if !h.delay.is_zero() {
        poller::sleep(h.delay).await;
    }
}
