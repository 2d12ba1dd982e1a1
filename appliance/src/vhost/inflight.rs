//! Inflight I/O tracking (vhost-user `INFLIGHT_SHMFD`), so the appliance can restart
//! under a running guest without losing or repeating requests.
//!
//! The front-end keeps a shared-memory region the back-end allocated; the back-end
//! records in it, per queue, which descriptor heads are in flight (with a counter that
//! preserves their order), the head of the last completion and the used index. After a
//! restart the new back-end gets the same region back, reconciles it with the used
//! ring (a crash between the used-index update and clearing the flag leaves one stale
//! entry) and resubmits what is still in flight, oldest first. The layout follows
//! libvhost-user's split-ring format:
//!
//! ```text
//! queue region: u64 features, u16 version, u16 desc_num, u16 last_batch_head,
//!               u16 used_idx, then desc_num x { u8 inflight, u8 pad[5], u16 next,
//!               u64 counter }, rounded up to 64 bytes
//! ```

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

const ALIGN: u64 = 64;
const VERSION: u16 = 1;

/// Bytes of one queue's region.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (16 + 16 * u64::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// A mapped inflight region (all queues).
pub struct InflightRegion {
    base: *mut u8,
    len: usize,
    pub queue_size: u16,
    pub num_queues: u16,
    _file: File,
}

// SAFETY: the mapping is owned by this struct; each queue's part is touched by one
// reactor at a time (the queue's), and the control plane only before a queue starts.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    fn map(
        file: File,
        len: usize,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        // SAFETY: a shared mapping of a file we own; the length was checked by callers.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as i64,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(InflightRegion { base: p.cast(), len, queue_size, num_queues, _file: file })
    }

    /// A new, zeroed region in a memfd; returns it and a descriptor for the front-end.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(Self, File, u64)> {
        let len = queue_region_size(queue_size) * u64::from(num_queues);
        // SAFETY: memfd_create with a valid C string.
        let fd = unsafe { libc::memfd_create(c"appliance-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len)?;
        let dup = file.try_clone()?;
        Ok((Self::map(file, len as usize, 0, num_queues, queue_size)?, dup, len))
    }

    /// Maps a region the front-end handed back (after a reconnect).
    pub fn open(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        let need = queue_region_size(queue_size) * u64::from(num_queues);
        if num_queues == 0 || queue_size == 0 || mmap_size < need || mmap_size > 64 << 20 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inflight region of the wrong size",
            ));
        }
        let file_len = file.metadata()?.len();
        if mmap_offset.checked_add(mmap_size).is_none_or(|end| end > file_len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inflight region beyond its file",
            ));
        }
        Self::map(file, mmap_size as usize, mmap_offset, num_queues, queue_size)
    }

    /// The region of queue `i`.
    pub fn queue(&self, i: u16) -> Option<InflightQueue> {
        if i >= self.num_queues {
            return None;
        }
        let off = queue_region_size(self.queue_size) * u64::from(i);
        // SAFETY: `off + region size <= len` by construction.
        Some(InflightQueue { base: unsafe { self.base.add(off as usize) }, size: self.queue_size })
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps our own mapping once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// One queue's part of the region. Valid while its [`InflightRegion`] lives (the queue
/// runner holds an `Arc` of it).
#[derive(Clone, Copy)]
pub struct InflightQueue {
    base: *mut u8,
    size: u16,
}

impl InflightQueue {
    fn at<T>(&self, off: usize) -> *mut T {
        // SAFETY: callers use offsets inside the queue region.
        unsafe { self.base.add(off).cast() }
    }
    fn desc(&self, head: u16) -> usize {
        16 + 16 * usize::from(head)
    }

    /// Records that `head` was taken from the available ring.
    pub fn get(&self, head: u16, counter: u64) {
        if head >= self.size {
            return;
        }
        // SAFETY: inside the region; only this queue's reactor writes here.
        unsafe {
            self.at::<u64>(self.desc(head) + 8).write_volatile(counter);
            self.at::<u8>(self.desc(head)).write_volatile(1);
        }
    }

    /// Before `head` goes into the used ring.
    pub fn pre_put(&self, head: u16) {
        // SAFETY: as in `get`.
        unsafe { self.at::<u16>(12).write_volatile(head) };
        super::blk::fence();
    }

    /// After the used index moved to `used_idx` with `head` in it.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if head >= self.size {
            return;
        }
        super::blk::fence();
        // SAFETY: as in `get`.
        unsafe {
            self.at::<u8>(self.desc(head)).write_volatile(0);
            super::blk::fence();
            self.at::<u16>(14).write_volatile(used_idx);
        }
    }

    /// Reconciles the region with the used ring's index at start-up; returns the heads
    /// still in flight, oldest first, and the next counter value. A fresh region
    /// (version 0) is initialised instead.
    pub fn recover(&self, used_idx: u16) -> (Vec<u16>, u64) {
        // SAFETY: reads and writes inside the region, before the queue runs.
        unsafe {
            if self.at::<u16>(8).read_volatile() != VERSION {
                std::ptr::write_bytes(self.base, 0, 16 + 16 * usize::from(self.size));
                self.at::<u16>(8).write_volatile(VERSION);
                self.at::<u16>(10).write_volatile(self.size);
                self.at::<u16>(14).write_volatile(used_idx);
                return (Vec::new(), 0);
            }
            let flagged = (0..self.size)
                .filter(|&h| self.at::<u8>(self.desc(h)).read_volatile() == 1)
                .count();
            tracing::debug!(
                region_used = self.at::<u16>(14).read_volatile(),
                used_idx,
                flagged,
                "inflight region found"
            );
            if self.at::<u16>(14).read_volatile() != used_idx {
                // The last completion reached the used ring but not the region.
                let last = self.at::<u16>(12).read_volatile();
                if last < self.size {
                    self.at::<u8>(self.desc(last)).write_volatile(0);
                }
                self.at::<u16>(14).write_volatile(used_idx);
            }
            let mut heads: Vec<(u64, u16)> = (0..self.size)
                .filter(|&h| self.at::<u8>(self.desc(h)).read_volatile() == 1)
                .map(|h| (self.at::<u64>(self.desc(h) + 8).read_volatile(), h))
                .collect();
            heads.sort_unstable();
            let next = heads.last().map_or(0, |(c, _)| c + 1);
            (heads.into_iter().map(|(_, h)| h).collect(), next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_record_and_recover() {
        let (region, file, size) = InflightRegion::create(2, 128).unwrap();
        assert_eq!(size, 2 * queue_region_size(128));
        let q = region.queue(1).unwrap();
        assert_eq!(q.recover(0), (vec![], 0), "fresh region");
        q.get(5, 0);
        q.get(9, 1);
        q.get(7, 2);
        q.pre_put(9);
        q.post_put(9, 1);
        // A second mapping of the same file sees the state (the front-end keeps it).
        let again = InflightRegion::open(file, size, 0, 2, 128).unwrap();
        let q2 = again.queue(1).unwrap();
        assert_eq!(q2.recover(1), (vec![5, 7], 3));
        // A completion that reached the used ring (index 2) but not the region.
        q2.pre_put(5);
        assert_eq!(q2.recover(2), (vec![7], 3));
        drop(region);
    }
}
