//! DMA buffers: each reactor owns one region, sized at start-up, carved by a buddy
//! allocator into power-of-two blocks of 4 KiB and up.
//!
//! - Every block is at least 4096-byte aligned, which satisfies any O_DIRECT memory
//!   alignment a Linux device reports.
//! - The region is backed by hugepages (through `hugepage-rs`) when asked for and
//!   available, by ordinary anonymous memory otherwise; pages are touched lazily.
//!   Ordinary memory is aligned to 2 MiB and, unless hugepages are off, advised as
//!   transparent huge pages (`MADV_HUGEPAGE`), so each 2 MiB chunk the buffers reach
//!   (the chunks the io_uring registers as fixed buffers, see `drivers`) is one
//!   physically contiguous page where the kernel can give one, and a buffer the device
//!   gets is contiguous memory rather than pages from anywhere: on the virtio disk of
//!   the benchmark machine, 64 KiB sequential reads over NBD ran 1.22–1.30x faster (the
//!   disk's own time per request about 420 against 520 µs); 4 KiB requests did not
//!   lose (docs/perf/profile.md).
//! - The allocator's bookkeeping is allocated once with the region: allocating and
//!   freeing a buffer touch only fixed arrays (intrusive free lists), never the heap.
//! - An empty pool is a status: [`alloc`] returns `None`, and [`alloc_wait`] parks the
//!   task on the pool's wait list until a buffer is freed.

use std::alloc::Layout;
use std::cell::RefCell;
use std::io;
use std::ptr::NonNull;
use std::rc::Rc;
use std::task::Poll;

use crate::executor::WaitList;
use crate::reactor::with_core;

/// The smallest block: one page.
pub const MIN_BLOCK_SHIFT: u32 = 12;
pub const MIN_BLOCK_BYTES: usize = 1 << MIN_BLOCK_SHIFT;
/// Marks "no block" in the intrusive lists.
const NIL: u32 = u32::MAX;
/// Marks a block that is not the head of a free block.
const NOT_FREE: u8 = u8::MAX;

/// Whether the DMA region uses hugepages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugepageMode {
    /// Use hugepages if enough are free, ordinary memory otherwise.
    Auto,
    /// Require hugepages.
    On,
    Off,
}

/// A reactor's buffer pool.
#[derive(Clone)]
pub(crate) struct DmaPool {
    inner: Rc<PoolInner>,
}

struct PoolInner {
    base: NonNull<u8>,
    bytes: usize,
    backing: Backing,
    buddy: RefCell<Buddy>,
    waiters: WaitList,
}

enum Backing {
    Hugepages(Layout),
    Mmap,
}

impl DmaPool {
    pub(crate) fn new(bytes: usize, mode: HugepageMode) -> io::Result<Self> {
        assert!(bytes.is_power_of_two() && bytes >= MIN_BLOCK_BYTES, "pool size {bytes}");
        let (base, backing) = map_region(bytes, mode)?;
        Ok(DmaPool {
            inner: Rc::new(PoolInner {
                base,
                bytes,
                backing,
                buddy: RefCell::new(Buddy::new(bytes >> MIN_BLOCK_SHIFT)),
                waiters: WaitList::new(),
            }),
        })
    }

    fn alloc(&self, len: usize) -> Option<DmaBuf> {
        let order = order_for(len.max(1));
        let block = self.inner.buddy.borrow_mut().alloc(order)?;
        let offset = (block as usize) << MIN_BLOCK_SHIFT;
        // SAFETY: the block lies inside the region: the buddy allocator hands out blocks
        // of the region's own size class only.
        let ptr = unsafe { NonNull::new_unchecked(self.inner.base.as_ptr().add(offset)) };
        Some(DmaBuf { ptr, len, order, pool: self.inner.clone() })
    }

    fn uses_hugepages(&self) -> bool {
        matches!(self.inner.backing, Backing::Hugepages(_))
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: the region came from hugepage_rs::alloc with this layout, and no
            // DmaBuf outlives the pool (each holds an Rc to it).
            Backing::Hugepages(layout) => unsafe {
                hugepage_rs::dealloc(self.base.as_ptr(), layout)
            },
            // SAFETY: the region came from mmap with this length and is unmapped once.
            Backing::Mmap => unsafe {
                libc::munmap(self.base.as_ptr().cast(), self.bytes);
            },
        }
    }
}

fn free_hugepage_bytes() -> usize {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else { return 0 };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<usize>().ok())
    };
    match (field("HugePages_Free:"), field("Hugepagesize:")) {
        (Some(free), Some(kib)) => free * kib * 1024,
        _ => 0,
    }
}

fn map_region(bytes: usize, mode: HugepageMode) -> io::Result<(NonNull<u8>, Backing)> {
    if mode != HugepageMode::Off && free_hugepage_bytes() >= bytes {
        let layout = Layout::from_size_align(bytes, MIN_BLOCK_BYTES)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { hugepage_rs::alloc(layout) };
        if let Some(p) = NonNull::new(p) {
            return Ok((p, Backing::Hugepages(layout)));
        }
    }
    if mode == HugepageMode::On {
        return Err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!(
                "hugepages = true but {} MiB of free hugepages are not reserved for a reactor's \
                 buffer pool (reserve more in /proc/sys/vm/nr_hugepages, or set hugepages = \"auto\")",
                bytes >> 20
            ),
        ));
    }
    let p = map_aligned(bytes, HUGE_ALIGN)?;
    if mode == HugepageMode::Auto {
        // Transparent huge pages where the kernel has them (best effort: `never` in
        // /sys/kernel/mm/transparent_hugepage/enabled, or no free 2 MiB page at the first
        // touch of a chunk, leave ordinary pages). See the module doc.
        // SAFETY: advice on a mapping this function owns; it changes no contents.
        unsafe { libc::madvise(p.as_ptr().cast(), bytes, libc::MADV_HUGEPAGE) };
    }
    Ok((p, Backing::Mmap))
}

/// Huge-page alignment of the ordinary-memory region.
const HUGE_ALIGN: usize = 2 << 20;

/// An anonymous private mapping of `bytes` (a multiple of 4 KiB) aligned to `align` (a
/// power of two): mapped `align` longer, then trimmed at both ends.
fn map_aligned(bytes: usize, align: usize) -> io::Result<NonNull<u8>> {
    let len = bytes + align;
    // SAFETY: an anonymous private mapping with no address hint has no preconditions.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = p as usize;
    let aligned = start.next_multiple_of(align);
    let (head, tail) = (aligned - start, start + len - (aligned + bytes));
    // SAFETY: both ranges lie in the mapping just made, outside [aligned, aligned+bytes),
    // which is what the region keeps; nothing references them.
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((aligned + bytes) as *mut libc::c_void, tail);
        }
    }
    Ok(NonNull::new(aligned as *mut u8).expect("mmap returned null"))
}

fn order_for(len: usize) -> u8 {
    let blocks = len.div_ceil(MIN_BLOCK_BYTES);
    blocks.next_power_of_two().trailing_zeros() as u8
}

/// A buddy allocator over `units` 4 KiB units with intrusive doubly-linked free lists.
struct Buddy {
    max_order: u8,
    heads: Vec<u32>,
    next: Vec<u32>,
    prev: Vec<u32>,
    /// For the first unit of a free block: its order. `NOT_FREE` otherwise.
    free_order: Vec<u8>,
    free_units: usize,
}

impl Buddy {
    fn new(units: usize) -> Self {
        assert!(units.is_power_of_two() && units <= u32::MAX as usize);
        let max_order = units.trailing_zeros() as u8;
        let mut b = Buddy {
            max_order,
            heads: vec![NIL; max_order as usize + 1],
            next: vec![NIL; units],
            prev: vec![NIL; units],
            free_order: vec![NOT_FREE; units],
            free_units: 0,
        };
        b.push(0, max_order);
        b
    }

    fn push(&mut self, block: u32, order: u8) {
        let head = self.heads[order as usize];
        self.next[block as usize] = head;
        self.prev[block as usize] = NIL;
        if head != NIL {
            self.prev[head as usize] = block;
        }
        self.heads[order as usize] = block;
        self.free_order[block as usize] = order;
        self.free_units += 1 << order;
    }

    fn unlink(&mut self, block: u32, order: u8) {
        let (n, p) = (self.next[block as usize], self.prev[block as usize]);
        if p == NIL {
            self.heads[order as usize] = n;
        } else {
            self.next[p as usize] = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        }
        self.free_order[block as usize] = NOT_FREE;
        self.free_units -= 1 << order;
    }

    fn alloc(&mut self, order: u8) -> Option<u32> {
        if order > self.max_order {
            return None;
        }
        let mut o = order;
        while self.heads[o as usize] == NIL {
            o += 1;
            if o > self.max_order {
                return None;
            }
        }
        let block = self.heads[o as usize];
        self.unlink(block, o);
        while o > order {
            o -= 1;
            self.push(block + (1 << o), o);
        }
        Some(block)
    }

    fn free(&mut self, mut block: u32, mut order: u8) {
        debug_assert_eq!(self.free_order[block as usize], NOT_FREE, "double free of a DMA block");
        while order < self.max_order {
            let buddy = block ^ (1 << order);
            if self.free_order[buddy as usize] != order {
                break;
            }
            self.unlink(buddy, order);
            block = block.min(buddy);
            order += 1;
        }
        self.push(block, order);
    }
}

/// A buffer from the current reactor's DMA pool, at least 4096-byte aligned. Returned
/// to the pool on drop; never leaves its reactor (`!Send`).
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    order: u8,
    pool: Rc<PoolInner>,
}

impl DmaBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes available (the block size).
    pub fn capacity(&self) -> usize {
        MIN_BLOCK_BYTES << self.order
    }

    /// Changes the length within the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "DmaBuf length {len} over capacity {}", self.capacity());
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the block is at least `len` bytes, exclusively owned by this buffer,
        // and stays mapped while the pool (held by this Rc) lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmaBuf({:p}, len {}, cap {})", self.ptr, self.len, self.capacity())
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        let offset = self.ptr.as_ptr() as usize - self.pool.base.as_ptr() as usize;
        let block = (offset >> MIN_BLOCK_SHIFT) as u32;
        self.pool.buddy.borrow_mut().free(block, self.order);
        if !self.pool.waiters.is_empty() {
            self.pool.waiters.wake_all();
        }
    }
}

/// The largest buffer one request may hold: a quarter of the pool, so one huge request
/// can never starve all others.
pub fn max_len() -> usize {
    with_core(|c| c.dma.inner.bytes / 4)
}

/// Bytes free in the current reactor's pool.
pub fn free_bytes() -> usize {
    with_core(|c| c.dma.inner.buddy.borrow().free_units << MIN_BLOCK_SHIFT)
}

/// Whether the current reactor's pool is backed by hugepages.
pub fn uses_hugepages() -> bool {
    with_core(|c| c.dma.uses_hugepages())
}

/// The current reactor's region: its start address and length. Every [`DmaBuf`] of this
/// reactor lies inside it (for registering it with a device once, as io_uring's fixed
/// buffers or an IOMMU mapping).
pub fn region() -> (usize, usize) {
    with_core(|c| (c.dma.inner.base.as_ptr() as usize, c.dma.inner.bytes))
}

/// A buffer of `len` bytes, or `None` when the pool has no block that large free.
pub fn alloc(len: usize) -> Option<DmaBuf> {
    with_core(|c| c.dma.alloc(len))
}

/// The error of [`alloc_wait`] for requests the pool can never satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    pub requested: usize,
    pub max: usize,
}

/// A buffer of `len` bytes, waiting for one to be freed if the pool is exhausted.
pub async fn alloc_wait(len: usize) -> Result<DmaBuf, TooLarge> {
    let (pool, max) = with_core(|c| (c.dma.clone(), c.dma.inner.bytes / 4));
    if len > max {
        return Err(TooLarge { requested: len, max });
    }
    std::future::poll_fn(|cx| match pool.alloc(len) {
        Some(b) => Poll::Ready(Ok(b)),
        None => {
            pool.inner.waiters.register(cx.waker());
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buddy_splits_and_coalesces() {
        let mut b = Buddy::new(16);
        let a = b.alloc(0).unwrap();
        let c = b.alloc(1).unwrap();
        let d = b.alloc(2).unwrap();
        assert_eq!(b.free_units, 16 - 1 - 2 - 4);
        assert!(b.alloc(4).is_none());
        b.free(a, 0);
        b.free(c, 1);
        b.free(d, 2);
        assert_eq!(b.free_units, 16);
        assert_eq!(b.alloc(4), Some(0), "everything coalesced back into one block");
    }

    #[test]
    fn buddy_blocks_do_not_overlap() {
        let mut b = Buddy::new(64);
        let mut used = [false; 64];
        let mut held = Vec::new();
        let mut seed = 7u64;
        for _ in 0..2000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if seed >> 63 == 0 || held.is_empty() {
                let order = ((seed >> 33) % 4) as u8;
                if let Some(blk) = b.alloc(order) {
                    for u in blk..blk + (1 << order) {
                        assert!(!used[u as usize], "unit {u} handed out twice");
                        used[u as usize] = true;
                    }
                    held.push((blk, order));
                }
            } else {
                let (blk, order) = held.swap_remove((seed >> 40) as usize % held.len());
                for u in blk..blk + (1 << order) {
                    used[u as usize] = false;
                }
                b.free(blk, order);
            }
        }
        for (blk, order) in held {
            b.free(blk, order);
        }
        assert_eq!(b.free_units, 64);
    }

    #[test]
    fn orders() {
        assert_eq!(order_for(1), 0);
        assert_eq!(order_for(4096), 0);
        assert_eq!(order_for(4097), 1);
        assert_eq!(order_for(1 << 20), 8);
    }
}
