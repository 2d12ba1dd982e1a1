//! The reactor's DMA region as an io_uring ring's fixed buffers, registered one chunk
//! at a time on first use.
//!
//! An operation on a registered buffer (`READ_FIXED`, `WRITE_FIXED`, an NVMe command
//! with a buffer index) skips the kernel's per-I/O page pinning and unpinning. But
//! registering pins the memory and faults every page of it in, and the region is sized
//! for the worst case (128 MiB per reactor by default) while most of it is never
//! touched; pinning it all at start-up would cost that memory at once. So the ring gets
//! a sparse table with one slot per chunk of the region (2 MiB, or larger to fit the
//! kernel's 16384 slots), and a chunk is registered the first time an operation's
//! buffer lies in it: one system call per chunk over the reactor's life, never per I/O.
//! The buddy allocator hands out low blocks first, so the chunks in use stay few.
//!
//! Buddy blocks are aligned to their size relative to the region's start, so a buffer
//! of at most one chunk never straddles two; larger ones, and memory outside the region,
//! go as ordinary operations. A registration the kernel refuses (a memory-lock limit,
//! a kernel without sparse tables) leaves the chunks already registered in use and
//! stops trying new ones.

use std::cell::Cell;
use std::io;

use io_uring::{IoUring, cqueue, squeue};

/// The smallest chunk: 2 MiB, one huge page when the region is backed by them.
const MIN_CHUNK_SHIFT: u32 = 21;
/// Slots the kernel allows in one ring's buffer table (`IORING_MAX_REG_BUFFERS`).
const MAX_SLOTS: usize = 1 << 14;

/// The registration state of one ring's fixed buffers.
pub(crate) struct Fixed {
    base: usize,
    len: usize,
    shift: u32,
    /// Per chunk: registered with the ring.
    registered: Box<[Cell<bool>]>,
    /// No more chunks are registered (a refused registration).
    full: Cell<bool>,
    /// Fixed buffers are not used at all (refused by the kernel for this ring's
    /// operations; see [`Fixed::disable`]).
    disabled: Cell<bool>,
}

impl Fixed {
    /// A sparse table covering the current reactor's DMA region on `ring`, or `None`
    /// (with the reason logged) when the kernel refuses one.
    pub(crate) fn new<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
        ring: &IoUring<S, C>,
    ) -> Option<Fixed> {
        let (base, len) = poller::dma::region();
        let shift = MIN_CHUNK_SHIFT.max(len.div_ceil(MAX_SLOTS).next_power_of_two().ilog2());
        let slots = len.div_ceil(1 << shift);
        debug_assert!(slots <= MAX_SLOTS, "{slots} fixed-buffer slots");
        if let Err(e) = ring.submitter().register_buffers_sparse(slots as u32) {
            tracing::info!("io_uring without fixed buffers (a sparse table of {slots}: {e})");
            return None;
        }
        Some(Fixed {
            base,
            len,
            shift,
            registered: (0..slots).map(|_| Cell::new(false)).collect(),
            full: Cell::new(false),
            disabled: Cell::new(false),
        })
    }

    /// The index of the fixed buffer holding the `len` bytes at `addr`, registering its
    /// chunk if this is the chunk's first use; `None` when they are not in one chunk of
    /// the region or the chunk cannot be registered.
    pub(crate) fn index<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
        &self,
        ring: &IoUring<S, C>,
        addr: usize,
        len: usize,
    ) -> Option<u16> {
        if self.disabled.get() || len == 0 {
            return None;
        }
        let off = addr.checked_sub(self.base)?;
        let end = off.checked_add(len).filter(|&e| e <= self.len)?;
        let chunk = off >> self.shift;
        if (end - 1) >> self.shift != chunk {
            return None;
        }
        if !self.registered[chunk].get() {
            self.register(ring, chunk).ok()?;
        }
        u16::try_from(chunk).ok()
    }

    fn register<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
        &self,
        ring: &IoUring<S, C>,
        chunk: usize,
    ) -> io::Result<()> {
        if self.full.get() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let start = chunk << self.shift;
        let iov = libc::iovec {
            iov_base: (self.base + start) as *mut libc::c_void,
            iov_len: (1usize << self.shift).min(self.len - start),
        };
        // SAFETY: the chunk lies in the reactor's DMA region, which lives as long as the
        // reactor, and so does the ring (both are the reactor thread's); the kernel pins
        // the pages until the ring is closed or the table unregistered.
        let r = unsafe { ring.submitter().register_buffers_update(chunk as u32, &[iov], None) };
        match r {
            Ok(()) => {
                self.registered[chunk].set(true);
                Ok(())
            }
            Err(e) => {
                tracing::info!("io_uring fixed buffers stop at {chunk} chunk(s): {e}");
                self.full.set(true);
                Err(e)
            }
        }
    }

    /// Stops using fixed buffers on `ring` (a kernel that registers them but refuses them
    /// for the ring's operations with EINVAL, as the test guest's Debian 6.1 kernel does
    /// for NVMe passthrough), releasing the pinned chunks.
    pub(crate) fn disable<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
        &self,
        ring: &IoUring<S, C>,
    ) {
        if !self.disabled.replace(true) {
            let _ = ring.submitter().unregister_buffers();
        }
    }
}
