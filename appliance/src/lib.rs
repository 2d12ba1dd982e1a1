//! The appliance: a single process that serves disk images to virtual machines.
//!
//! This crate is the binary's body: the command line ([`cli`]), start-up and shutdown
//! order ([`serve`]), the exports ([`nbd`], [`vhost`]), operations ([`metrics`],
//! [`control`]) and the image tools ([`tools`]). The data path lives in the `poller`
//! (reactors) and `drivers` (block devices) crates; this crate wires them to sockets.

pub mod cli;
pub mod control;
pub mod ctl;
pub mod metrics;
pub mod nbd;
pub mod serve;
pub mod tools;
pub mod vhost;

/// A deliberate per-request delay (`APPLIANCE_DEBUG_DELAY_US`, read once), zero in
/// production: benchmarks use it to prove they see a slower server, and the reconnect
/// test to keep requests in flight while the appliance is killed.
pub fn debug_delay() -> std::time::Duration {
    static DELAY: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let us = std::env::var("APPLIANCE_DEBUG_DELAY_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if us > 0 {
            tracing::warn!("APPLIANCE_DEBUG_DELAY_US={us}: every request is delayed (test and benchmark self-check)");
        }
        std::time::Duration::from_micros(us)
    })
}
