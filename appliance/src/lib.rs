//! The appliance: a single process that serves disk images to virtual machines.
//!
//! This crate is the binary's body: the command line ([`cli`]), start-up and shutdown
//! order ([`serve`]), the exports ([`nbd`], [`vhost`]), operations ([`metrics`],
//! [`control`]) and the image tools ([`tools`]). The data path lives in the `poller`
//! (reactors) and `drivers` (block devices) crates; this crate wires them to sockets.

mod backup;
mod bitmaps;
mod block_jobs;
pub mod cli;
pub mod control;
pub mod ctl;
pub mod debug;
mod fleece;
pub mod fuzzing;
pub mod metrics;
pub mod nbd;
pub mod perms;
pub mod rbd_tools;
mod resize;
pub mod serve;
mod snapshots;
pub mod tools;
pub mod vhost;
