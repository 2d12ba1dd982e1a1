//! Format drivers: how a guest's view of a disk maps onto storage. Each implements the
//! implementor API ([`crate::driver::BlockDriver`]) over I/O drivers ([`crate::io`]).
//! - [`raw`]: the guest view is the storage, through the shared alignment layer;
//! - [`qcow2`]: the qcow2 engine (mapping, allocation, backing chains, crash-safe
//!   metadata ordering) and its image tools.

pub mod qcow2;
pub mod raw;
