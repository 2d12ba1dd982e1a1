//! The requester's side of the zero-hop path (see `hints`): a channel that finds every
//! cluster of a read, or of a plain in-place write, in the image's hints submits the
//! data I/O on its own storage channel, inside a lease, and never involves the owner.
//!
//! What takes the hop instead: a cluster with no hint (never mapped, or changed since),
//! clusters that are not contiguous on the host, a write to a cluster that is shared,
//! may hold metadata or was published before the last metadata allocation, a write to
//! a corrupt or read-only image, and FUA writes (their flush is the owner's).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::IoError;
use crate::io::Storage;
use crate::io::align::Aligned;
use crate::seg::{self, IoSeg};

use super::image::Image;

/// Clusters one zero-hop request may span.
const MAX_CLUSTERS: u64 = 64;

pub(crate) struct Direct {
    io: Aligned,
    img: Arc<Image>,
    /// This channel's lease slot.
    slot: usize,
    writable: bool,
}

impl Direct {
    /// The zero-hop path for a channel on the current reactor, or `None` when every
    /// lease slot is taken (the channel then always takes the hop).
    pub(crate) fn new(img: &Arc<Image>, storage: &Arc<Storage>, writable: bool) -> Option<Direct> {
        let slot = img.lease.claim()?;
        match storage.channel() {
            Ok(ch) => Some(Direct { io: Aligned::new(ch), img: img.clone(), slot, writable }),
            Err(_) => {
                img.lease.release(slot);
                None
            }
        }
    }

    /// The host offset of guest bytes `off..off + len` if every cluster has a hint,
    /// contiguous on the host (and usable for a write, when `write`).
    fn lookup(&self, off: u64, len: u64, write: bool) -> Option<u64> {
        if self.img.closed.load(Ordering::Acquire) {
            return None;
        }
        let cb = self.img.g.cluster_bits;
        let (c0, c1) = (off >> cb, (off + len - 1) >> cb);
        if c1 - c0 >= MAX_CLUSTERS {
            return None;
        }
        let generation = self.img.meta_generation();
        let mut base = 0;
        for (k, c) in (c0..=c1).enumerate() {
            let h = self.img.hints.get(c)?;
            if write && (!h.writable || h.generation != generation) {
                return None;
            }
            if k == 0 {
                base = h.host;
            } else if h.host != base + ((k as u64) << cb) {
                return None;
            }
        }
        Some(base + (off & ((1 << cb) - 1)))
    }

    /// Reads `segs` from guest offset `off`, or `None` if the owner must.
    pub(crate) async fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Option<Result<(), IoError>> {
        let len = seg::total_len(segs) as u64;
        let _lease = self.img.lease.enter(self.slot);
        let host = self.lookup(off, len, false)?;
        self.img.lease.served(self.slot);
        Some(self.io.read(host, segs).await)
    }

    /// Writes `segs` in place at guest offset `off`, or `None` if the owner must.
    pub(crate) async fn write(&self, off: u64, segs: &[IoSeg<'_>]) -> Option<Result<(), IoError>> {
        if !self.writable || self.img.is_corrupt() {
            return None;
        }
        let len = seg::total_len(segs) as u64;
        let _lease = self.img.lease.enter(self.slot);
        let host = self.lookup(off, len, true)?;
        self.img.lease.served(self.slot);
        Some(self.io.write(host, segs, false).await)
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        self.img.lease.release(self.slot);
    }
}
