//! The gather list a connection's writer sends from. (The socket itself, on the
//! reactor's io_uring ring or on epoll as `nbd.socket_io` says, is
//! `drivers::io::net::Socket`; the reader and the writer each have at most one
//! operation in flight on it.)
//!
//! The writer gathers queued replies into a [`Gather`]: header bytes are copied into a
//! staging buffer the gather owns (consecutive headers share one iovec), payloads are
//! referenced in their DMA buffers. So a send in flight on the ring never points into
//! the reply queue, which other tasks keep pushing to; the replies whose payloads it
//! references are not dropped until it completes (`Conn::sending`).

use std::io::IoSlice;

use super::reply::{HDR_CAP, Reply};

/// iovecs per send.
pub const IOV_BATCH: usize = 64;
/// Staging bytes for headers per send.
const STAGE: usize = 64 * HDR_CAP;

/// The iovecs of one send.
pub struct Gather {
    stage: Box<[u8]>,
    used: usize,
    iov: [libc::iovec; IOV_BATCH],
    count: usize,
    /// Payload bytes gathered (headers not counted).
    payload: usize,
}

impl Gather {
    pub fn new() -> Self {
        let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        Gather {
            stage: vec![0u8; STAGE].into_boxed_slice(),
            used: 0,
            iov: [empty; IOV_BATCH],
            count: 0,
            payload: 0,
        }
    }

    /// Gathers the unsent bytes of `replies`, skipping the `skip` bytes of the front
    /// ones already sent, until the iovecs or the staging buffer run out.
    pub fn fill<'r>(&mut self, replies: impl Iterator<Item = &'r Reply>, mut skip: usize) {
        self.used = 0;
        self.count = 0;
        self.payload = 0;
        for r in replies {
            let hdr = &r.hdr[..r.hdr_len as usize];
            if self.count + 2 > IOV_BATCH || self.used + hdr.len() > STAGE {
                break;
            }
            if skip < hdr.len() {
                self.stage_header(&hdr[skip..]);
                skip = 0;
            } else {
                skip -= hdr.len();
            }
            if let Some(d) = &r.data {
                let d = d.as_slice();
                if skip < d.len() {
                    let rest = &d[skip..];
                    self.iov[self.count] =
                        libc::iovec { iov_base: rest.as_ptr() as *mut _, iov_len: rest.len() };
                    self.count += 1;
                    self.payload += rest.len();
                }
                skip = 0;
            }
        }
    }

    /// Copies header bytes into the stage, extending the last iovec when it ends there.
    fn stage_header(&mut self, bytes: &[u8]) {
        let at = self.used;
        self.stage[at..at + bytes.len()].copy_from_slice(bytes);
        self.used += bytes.len();
        let start = self.stage[at..].as_ptr() as *mut libc::c_void;
        if let Some(last) = self.count.checked_sub(1).map(|i| &mut self.iov[i])
            && (last.iov_base as usize) + last.iov_len == start as usize
        {
            last.iov_len += bytes.len();
            return;
        }
        self.iov[self.count] = libc::iovec { iov_base: start, iov_len: bytes.len() };
        self.count += 1;
    }

    /// Payload bytes in the gathered iovecs.
    pub fn payload(&self) -> usize {
        self.payload
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The gathered iovecs. They point into this gather's stage and into the replies'
    /// DMA buffers, which must outlive the send that uses them.
    pub fn slices(&self) -> &[IoSlice<'_>] {
        // SAFETY: IoSlice is ABI-compatible with iovec on Unix (std documents it), and
        // the first `count` entries are initialised, pointing at live memory.
        unsafe { std::slice::from_raw_parts(self.iov.as_ptr().cast::<IoSlice<'_>>(), self.count) }
    }
}
