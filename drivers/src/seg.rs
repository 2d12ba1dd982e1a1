//! I/O segments: the memory an operation reads into or writes from.
//!
//! An [`IoSeg`] has the layout of the kernel's `iovec`, so a slice of segments is passed
//! to `readv`/`writev` as is. Its lifetime ties it to the memory it describes: safe
//! constructors take a mutable borrow, and the I/O futures that use segments borrow them
//! for as long as the kernel may touch them. Memory that Rust cannot borrow (a guest's
//! RAM mapped by vhost-user) enters through the unsafe [`IoSeg::from_raw`].

use std::marker::PhantomData;

use poller::DmaBuf;

/// A contiguous piece of I/O memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoSeg<'a> {
    base: *mut u8,
    len: usize,
    _mem: PhantomData<&'a mut [u8]>,
}

const _: () = assert!(std::mem::size_of::<IoSeg<'static>>() == std::mem::size_of::<libc::iovec>());
const _: () =
    assert!(std::mem::align_of::<IoSeg<'static>>() == std::mem::align_of::<libc::iovec>());

impl<'a> IoSeg<'a> {
    /// A segment of no bytes (a placeholder in fixed arrays; never dereferenced).
    pub const EMPTY: IoSeg<'a> =
        IoSeg { base: std::ptr::NonNull::<u8>::dangling().as_ptr(), len: 0, _mem: PhantomData };

    pub fn new(buf: &'a mut [u8]) -> Self {
        IoSeg { base: buf.as_mut_ptr(), len: buf.len(), _mem: PhantomData }
    }

    pub fn from_dma(buf: &'a mut DmaBuf) -> Self {
        IoSeg { base: buf.as_mut_ptr(), len: buf.len(), _mem: PhantomData }
    }

    /// # Safety
    /// `base..base+len` must stay valid for reads and writes, and not be accessed by
    /// anything else in a conflicting way, for `'a` and until every I/O using the
    /// segment has completed.
    pub unsafe fn from_raw(base: *mut u8, len: usize) -> Self {
        IoSeg { base, len, _mem: PhantomData }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    /// The part `off..off+len` of this segment.
    pub fn slice(&self, off: usize, len: usize) -> IoSeg<'a> {
        assert!(off + len <= self.len, "segment slice {off}+{len} beyond {}", self.len);
        // SAFETY: a sub-range of memory this segment already covers, with its lifetime.
        IoSeg { base: unsafe { self.base.add(off) }, len, _mem: PhantomData }
    }
}

/// Selects `len` bytes starting `skip` bytes into `segs`, into `out`; fails with
/// `TooLarge` if that takes more than `N` segments.
pub fn window<'a, 'o, const N: usize>(
    segs: &[IoSeg<'a>],
    mut skip: usize,
    len: usize,
    out: &'o mut [IoSeg<'a>; N],
) -> Result<&'o [IoSeg<'a>], crate::IoError> {
    let mut n = 0;
    let mut left = len;
    for s in segs {
        if left == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let take = (s.len - skip).min(left);
        if n == N {
            return Err(crate::IoError::TooLarge);
        }
        out[n] = s.slice(skip, take);
        n += 1;
        left -= take;
        skip = 0;
    }
    debug_assert_eq!(left, 0, "window beyond the segments");
    Ok(&out[..n])
}

/// The bytes from `skip` into `segs` that at most `n` segments hold.
pub fn reach(segs: &[IoSeg<'_>], mut skip: usize, n: usize) -> usize {
    let mut bytes = 0;
    let mut taken = 0;
    for s in segs {
        if taken == n {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        bytes += s.len - skip;
        skip = 0;
        taken += 1;
    }
    bytes
}

/// Total bytes of `segs`.
pub fn total_len(segs: &[IoSeg<'_>]) -> usize {
    segs.iter().map(|s| s.len).sum()
}

/// Whether every segment starts on `mem_align` and spans whole `len_align` units.
pub fn segs_aligned(segs: &[IoSeg<'_>], mem_align: usize, len_align: usize) -> bool {
    segs.iter().all(|s| (s.base as usize).is_multiple_of(mem_align) && s.len % len_align == 0)
}

pub(crate) fn as_iovecs(segs: &[IoSeg<'_>]) -> *const libc::iovec {
    segs.as_ptr().cast()
}

/// Copies from linear memory at `src` into the segments, skipping `skip` bytes of them.
///
/// # Safety
/// `src` must be valid for reads of the bytes copied.
pub(crate) unsafe fn copy_into_segs(
    segs: &[IoSeg<'_>],
    mut skip: usize,
    src: *const u8,
    len: usize,
) {
    let mut done = 0;
    for s in segs {
        if done == len {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(len - done);
        // SAFETY: the segment is valid for `s.len` bytes; the caller vouches for `src`.
        unsafe { std::ptr::copy(src.add(done), s.base.add(skip), n) };
        done += n;
        skip = 0;
    }
}

/// Copies from the segments (after skipping `skip` bytes) into linear memory at `dst`.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
pub(crate) unsafe fn copy_from_segs(segs: &[IoSeg<'_>], mut skip: usize, dst: *mut u8, len: usize) {
    let mut done = 0;
    for s in segs {
        if done == len {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(len - done);
        // SAFETY: as in `copy_into_segs`, in the other direction.
        unsafe { std::ptr::copy(s.base.add(skip), dst.add(done), n) };
        done += n;
        skip = 0;
    }
}

/// Fills the segments with zeros.
pub(crate) fn zero_segs(segs: &[IoSeg<'_>], mut skip: usize, len: usize) {
    let mut done = 0;
    for s in segs {
        if done == len {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(len - done);
        // SAFETY: the segment is valid for writes of `s.len` bytes.
        unsafe { std::ptr::write_bytes(s.base.add(skip), 0, n) };
        done += n;
        skip = 0;
    }
}
