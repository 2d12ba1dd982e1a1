//! virtio-blk: feature bits, request types and status codes, the configuration space,
//! and the walk of a descriptor chain into a request.
//!
//! A chain is walked by hand (not with `virtio_queue::DescriptorChain`) because
//! requests must also be rebuilt from a bare head index when in-flight requests are
//! resubmitted after a reconnect. The walk is bounded: at most the queue size of
//! descriptors (or the indirect table's size) — a looping chain ends there — and every
//! descriptor must lie inside one mapped guest memory region.

use std::sync::atomic::Ordering;

use drivers::IoSeg;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

// virtio-blk feature bits.
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_TOPOLOGY: u64 = 1 << 10;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
// Transport feature bits.
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

// Status.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// The serial number length of GET_ID.
pub const ID_BYTES: usize = 20;
/// Data segments a request may have (advertised as seg_max).
pub const SEG_MAX: u32 = 126;
/// The largest data segment (advertised as size_max): seg_max of them stay within the
/// device's largest transfer, so a driver that honours both never sends a request the
/// shared validation step refuses as too large.
pub const SIZE_MAX: u32 = 256 << 10;
const _: () = assert!(SIZE_MAX as u64 * SEG_MAX as u64 <= drivers::api::MAX_TRANSFER_BYTES as u64);
/// Segments per side (device-readable, device-writable) including header and status.
pub const MAX_SIDE_SEGS: usize = SEG_MAX as usize + 2;
/// Largest discard / write-zeroes range, in 512-byte sectors.
pub const MAX_DISCARD_SECTORS: u32 = (32 << 20) >> 9;
/// Ranges per discard / write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Bytes of the configuration space we expose.
pub const CONFIG_BYTES: usize = 60;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// The configuration space (`struct virtio_blk_config`, little-endian).
pub fn config_space(size: u64, blk_size: u32, preferred: u32, queues: u16) -> [u8; CONFIG_BYTES] {
    let mut c = [0u8; CONFIG_BYTES];
    c[0..8].copy_from_slice(&(size / 512).to_le_bytes());
    c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&blk_size.to_le_bytes());
    let exp = (preferred.max(blk_size) / blk_size).trailing_zeros() as u8;
    c[24] = exp;
    c[26..28].copy_from_slice(&1u16.to_le_bytes());
    c[32] = 1; // writeback
    c[34..36].copy_from_slice(&queues.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[44..48].copy_from_slice(&(blk_size / 512).max(1).to_le_bytes());
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// Why a chain cannot be a request (answered without touching the disk when it has a
/// usable status byte, otherwise dropped with a zero-length completion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor outside guest memory, or spanning regions.
    BadAddress,
    /// More descriptors than the queue (a loop), a bad index, or a bad indirect table.
    BadChain,
    /// More segments than seg_max.
    TooManySegments,
    /// No header or no status byte.
    Malformed,
}

/// A parsed request; segments point into guest memory.
#[derive(Clone, Copy)]
pub struct BlkReq {
    pub head: u16,
    pub kind: u32,
    pub sector: u64,
    pub out: [IoSeg<'static>; MAX_SIDE_SEGS],
    pub n_out: usize,
    pub inn: [IoSeg<'static>; MAX_SIDE_SEGS],
    pub n_inn: usize,
    /// The status byte (the last device-writable byte).
    pub status: *mut u8,
}

impl BlkReq {
    pub fn data_out(&self) -> &[IoSeg<'static>] {
        &self.out[..self.n_out]
    }
    pub fn data_in(&self) -> &[IoSeg<'static>] {
        &self.inn[..self.n_inn]
    }
}

/// A split-ring descriptor.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

// SAFETY: plain old data; any bit pattern is valid.
unsafe impl vm_memory::ByteValued for Desc {}

fn host_ptr(mem: &GuestMemoryMmap, addr: u64, len: u32) -> Result<*mut u8, ChainError> {
    if len == 0 {
        return Ok(std::ptr::NonNull::<u8>::dangling().as_ptr());
    }
    let s = mem.get_slice(GuestAddress(addr), len as usize).map_err(|_| ChainError::BadAddress)?;
    Ok(s.ptr_guard_mut().as_ptr())
}

/// Walks the chain at `head` into readable and writable segments, then splits off the
/// 16-byte header (from the readable side) and the status byte (the writable side's
/// last byte). Descriptor boundaries are not assumed (virtio framing rules).
pub fn parse(
    mem: &GuestMemoryMmap,
    desc_table: u64,
    queue_size: u16,
    head: u16,
    indirect_ok: bool,
) -> Result<BlkReq, ChainError> {
    let mut req = BlkReq {
        head,
        kind: 0,
        sector: 0,
        out: [IoSeg::EMPTY; MAX_SIDE_SEGS],
        n_out: 0,
        inn: [IoSeg::EMPTY; MAX_SIDE_SEGS],
        n_inn: 0,
        status: std::ptr::null_mut(),
    };
    let mut table = desc_table;
    let mut table_size = u32::from(queue_size);
    let mut idx = u32::from(head);
    let mut ttl = table_size;
    let mut in_indirect = false;
    loop {
        if ttl == 0 {
            return Err(ChainError::BadChain);
        }
        ttl -= 1;
        if idx >= table_size {
            return Err(ChainError::BadChain);
        }
        let d: Desc = mem
            .read_obj(GuestAddress(table + u64::from(idx) * 16))
            .map_err(|_| ChainError::BadAddress)?;
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if !indirect_ok
                || in_indirect
                || d.flags & VIRTQ_DESC_F_NEXT != 0
                || d.len == 0
                || !d.len.is_multiple_of(16)
                || d.len / 16 > 65536
            {
                return Err(ChainError::BadChain);
            }
            table = d.addr;
            table_size = d.len / 16;
            idx = 0;
            ttl = table_size;
            in_indirect = true;
            continue;
        }
        let ptr = host_ptr(mem, d.addr, d.len)?;
        // SAFETY: `ptr..ptr+len` lies inside a mapped guest region, which stays mapped
        // while the queue runs (the memory table is replaced only with queues stopped).
        let seg = unsafe { IoSeg::from_raw(ptr, d.len as usize) };
        if d.flags & VIRTQ_DESC_F_WRITE != 0 {
            if req.n_inn == MAX_SIDE_SEGS {
                return Err(ChainError::TooManySegments);
            }
            req.inn[req.n_inn] = seg;
            req.n_inn += 1;
        } else {
            if req.n_inn > 0 {
                // Readable after writable: not a valid virtio-blk layout.
                return Err(ChainError::Malformed);
            }
            if req.n_out == MAX_SIDE_SEGS {
                return Err(ChainError::TooManySegments);
            }
            req.out[req.n_out] = seg;
            req.n_out += 1;
        }
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            break;
        }
        idx = u32::from(d.next);
    }
    // Header: the first 16 readable bytes.
    let mut hdr = [0u8; 16];
    if drivers::seg::total_len(req.data_out()) < 16 {
        return Err(ChainError::Malformed);
    }
    let mut got = 0;
    let mut consumed = 0;
    for s in req.data_out() {
        let n = s.len().min(16 - got);
        // SAFETY: `s` covers `s.len()` mapped bytes.
        unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), hdr.as_mut_ptr().add(got), n) };
        got += n;
        if got == 16 {
            break;
        }
        consumed += 1;
    }
    let _ = consumed;
    req.kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4"));
    req.sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8"));
    let (out, n_out) = drop_front(&req.out[..req.n_out], 16);
    req.out = out;
    req.n_out = n_out;
    // Status: the last writable byte.
    if drivers::seg::total_len(req.data_in()) < 1 {
        return Err(ChainError::Malformed);
    }
    let (inn, n_inn, status) = drop_back(&req.inn[..req.n_inn]);
    req.inn = inn;
    req.n_inn = n_inn;
    req.status = status;
    Ok(req)
}

fn drop_front(segs: &[IoSeg<'static>], mut n: usize) -> ([IoSeg<'static>; MAX_SIDE_SEGS], usize) {
    let mut out = [IoSeg::EMPTY; MAX_SIDE_SEGS];
    let mut k = 0;
    for s in segs {
        if n >= s.len() {
            n -= s.len();
            continue;
        }
        out[k] = s.slice(n, s.len() - n);
        n = 0;
        k += 1;
    }
    (out, k)
}

fn drop_back(segs: &[IoSeg<'static>]) -> ([IoSeg<'static>; MAX_SIDE_SEGS], usize, *mut u8) {
    let mut out = [IoSeg::EMPTY; MAX_SIDE_SEGS];
    let mut k = 0;
    let mut last = segs.len();
    while last > 0 && segs[last - 1].is_empty() {
        last -= 1;
    }
    let tail = segs[last - 1];
    // SAFETY: the segment is at least one byte long.
    let status = unsafe { tail.as_ptr().add(tail.len() - 1) };
    for s in &segs[..last - 1] {
        out[k] = *s;
        k += 1;
    }
    if tail.len() > 1 {
        out[k] = tail.slice(0, tail.len() - 1);
        k += 1;
    }
    (out, k, status)
}

/// Reads `len` bytes starting `skip` bytes into `segs` (discard ranges).
pub fn read_from_segs(segs: &[IoSeg<'_>], mut skip: usize, out: &mut [u8]) -> bool {
    let mut done = 0;
    for s in segs {
        if done == out.len() {
            break;
        }
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        let n = (s.len() - skip).min(out.len() - done);
        // SAFETY: the segment covers `s.len()` mapped bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr().add(skip), out.as_mut_ptr().add(done), n)
        };
        done += n;
        skip = 0;
    }
    done == out.len()
}

/// Writes `data` at the start of `segs`; returns the bytes written.
pub fn write_to_segs(segs: &[IoSeg<'_>], data: &[u8]) -> usize {
    let mut done = 0;
    for s in segs {
        if done == data.len() {
            break;
        }
        let n = s.len().min(data.len() - done);
        // SAFETY: the segment covers `s.len()` mapped, device-writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(done), s.as_ptr(), n) };
        done += n;
    }
    done
}

/// A fence for shared-memory structures the guest or front-end reads.
pub fn fence() {
    std::sync::atomic::fence(Ordering::SeqCst);
}
