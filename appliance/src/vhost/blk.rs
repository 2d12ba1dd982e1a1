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
/// Segments a chain may have: seg_max data segments, the header and the status byte, and
/// room for a driver that splits either of those over two descriptors.
pub const MAX_SEGS: usize = SEG_MAX as usize + 4;
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

/// A parsed request; segments point into guest memory. One array holds both sides, the
/// device-readable segments first: a request is built where it is parsed and moved once
/// into its task, so its size is what each request copies.
#[derive(Clone, Copy)]
pub struct BlkReq {
    pub head: u16,
    pub kind: u32,
    pub sector: u64,
    segs: [IoSeg<'static>; MAX_SEGS],
    /// `segs[..split]` are device-readable, `segs[split..end]` device-writable.
    split: usize,
    end: usize,
    /// The status byte (the last device-writable byte).
    pub status: *mut u8,
}

impl BlkReq {
    pub fn data_out(&self) -> &[IoSeg<'static>] {
        &self.segs[..self.split]
    }
    pub fn data_in(&self) -> &[IoSeg<'static>] {
        &self.segs[self.split..self.end]
    }

    /// Removes the 16-byte header from the front of the readable side, in place.
    fn take_header(&mut self) -> Result<[u8; 16], ChainError> {
        let mut hdr = [0u8; 16];
        let mut got = 0;
        let mut whole = 0;
        for s in &mut self.segs[..self.split] {
            let n = s.len().min(16 - got);
            // SAFETY: `s` covers `s.len()` mapped bytes.
            unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), hdr.as_mut_ptr().add(got), n) };
            got += n;
            if n == s.len() {
                whole += 1;
            } else {
                *s = s.slice(n, s.len() - n);
            }
            if got == 16 {
                break;
            }
        }
        if got < 16 {
            return Err(ChainError::Malformed);
        }
        self.segs.copy_within(whole..self.end, 0);
        self.split -= whole;
        self.end -= whole;
        Ok(hdr)
    }

    /// Removes the status byte from the back of the writable side, in place.
    fn take_status(&mut self) -> Result<*mut u8, ChainError> {
        if self.end == self.split {
            return Err(ChainError::Malformed);
        }
        let tail = self.segs[self.end - 1];
        // SAFETY: the segment is at least one byte long.
        let status = unsafe { tail.as_ptr().add(tail.len() - 1) };
        if tail.len() > 1 {
            self.segs[self.end - 1] = tail.slice(0, tail.len() - 1);
        } else {
            self.end -= 1;
        }
        Ok(status)
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

impl Desc {
    fn from_le(b: [u8; 16]) -> Desc {
        Desc {
            addr: u64::from_le_bytes(b[0..8].try_into().expect("8")),
            len: u32::from_le_bytes(b[8..12].try_into().expect("4")),
            flags: u16::from_le_bytes(b[12..14].try_into().expect("2")),
            next: u16::from_le_bytes(b[14..16].try_into().expect("2")),
        }
    }
}

/// A descriptor table (a queue's, or a request's indirect one): its guest address and
/// size in descriptors, and where it is mapped when it lies in one guest memory region
/// (always, for the drivers seen), so a descriptor is read without looking its address
/// up again. Valid with the memory it was made from, which [`parse`] must be given (a
/// queue keeps that memory for as long as it runs).
#[derive(Clone, Copy)]
pub struct DescTable {
    addr: u64,
    size: u32,
    host: Option<std::ptr::NonNull<u8>>,
}

impl DescTable {
    pub fn new(mem: &GuestMemoryMmap, addr: u64, size: u32) -> DescTable {
        let bytes = size as usize * 16;
        let host = mem
            .get_slice(GuestAddress(addr), bytes)
            .ok()
            .and_then(|s| std::ptr::NonNull::new(s.ptr_guard_mut().as_ptr()));
        DescTable { addr, size, host }
    }

    /// Descriptor `idx` (below the size) of this table.
    fn read(&self, mem: &GuestMemoryMmap, idx: u32) -> Result<Desc, ChainError> {
        debug_assert!(idx < self.size);
        match self.host {
            Some(base) => {
                // SAFETY: `idx` is below the size, so the 16 bytes lie inside the table,
                // which lies inside a mapped guest region that stays mapped while the
                // queue runs (the memory table is replaced only with queues stopped). A
                // volatile read of bytes: the guest may write the table at any time, and
                // any value read is validated below.
                let b = unsafe {
                    std::ptr::read_volatile(base.as_ptr().add(idx as usize * 16).cast::<[u8; 16]>())
                };
                Ok(Desc::from_le(b))
            }
            None => mem
                .read_obj(GuestAddress(self.addr + u64::from(idx) * 16))
                .map_err(|_| ChainError::BadAddress),
        }
    }
}

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
    ring: &DescTable,
    head: u16,
    indirect_ok: bool,
) -> Result<BlkReq, ChainError> {
    let mut req = BlkReq {
        head,
        kind: 0,
        sector: 0,
        segs: [IoSeg::EMPTY; MAX_SEGS],
        split: 0,
        end: 0,
        status: std::ptr::null_mut(),
    };
    let mut table = *ring;
    let mut idx = u32::from(head);
    let mut ttl = table.size;
    let mut in_indirect = false;
    let mut seen_writable = false;
    loop {
        if ttl == 0 {
            return Err(ChainError::BadChain);
        }
        ttl -= 1;
        if idx >= table.size {
            return Err(ChainError::BadChain);
        }
        let d = table.read(mem, idx)?;
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
            // Mapped once for the request (Linux drivers put every request with more
            // than one segment in an indirect table).
            table = DescTable::new(mem, d.addr, d.len / 16);
            idx = 0;
            ttl = table.size;
            in_indirect = true;
            continue;
        }
        let ptr = host_ptr(mem, d.addr, d.len)?;
        // SAFETY: `ptr..ptr+len` lies inside a mapped guest region, which stays mapped
        // while the queue runs (the memory table is replaced only with queues stopped).
        let seg = unsafe { IoSeg::from_raw(ptr, d.len as usize) };
        let writable = d.flags & VIRTQ_DESC_F_WRITE != 0;
        if !writable && seen_writable {
            // Readable after writable: not a valid virtio-blk layout.
            return Err(ChainError::Malformed);
        }
        seen_writable |= writable;
        // Empty descriptors carry nothing: not kept.
        if !seg.is_empty() {
            if req.end == MAX_SEGS {
                return Err(ChainError::TooManySegments);
            }
            req.segs[req.end] = seg;
            req.end += 1;
            if !writable {
                req.split += 1;
            }
        }
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            break;
        }
        idx = u32::from(d.next);
    }
    // Header: the first 16 readable bytes; status: the last writable byte.
    let hdr = req.take_header()?;
    req.kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4"));
    req.sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8"));
    req.status = req.take_status()?;
    Ok(req)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest memory of one 64 KiB region with the descriptors `descs` (address, length,
    /// writable) chained from index 0 of a table at 0, and `header` at 0x1000.
    fn chain(descs: &[(u64, u32, bool)], header: &[u8]) -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 10)]).expect("memory");
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let mut flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
            if writable {
                flags |= VIRTQ_DESC_F_WRITE;
            }
            let d = Desc { addr, len, flags, next: i as u16 + 1 };
            mem.write_obj(d, GuestAddress(i as u64 * 16)).expect("descriptor");
        }
        mem.write_slice(header, GuestAddress(0x1000)).expect("header");
        mem
    }

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn lens(segs: &[IoSeg<'_>]) -> Vec<usize> {
        segs.iter().map(|s| s.len()).collect()
    }

    #[test]
    fn header_and_status_in_their_own_descriptors() {
        let mem = chain(
            &[(0x1000, 16, false), (0x2000, 4096, true), (0x3000, 1, true)],
            &header(T_IN, 7),
        );
        let r = parse(&mem, &DescTable::new(&mem, 0, 8), 0, false).expect("valid chain");
        assert_eq!((r.kind, r.sector), (T_IN, 7));
        assert!(r.data_out().is_empty());
        assert_eq!(lens(r.data_in()), [4096]);
        let base = mem.get_host_address(GuestAddress(0x3000)).expect("mapped");
        assert_eq!(r.status, base);
    }

    #[test]
    fn header_split_and_shared_with_data_status_shared_with_data() {
        // 10 + 6 header bytes, the second descriptor running on into 512 bytes of data;
        // an empty descriptor in between; the status byte at the end of the data.
        let mut h = [0u8; 0x40];
        h[..10].copy_from_slice(&header(T_OUT, 9)[..10]);
        h[0x20..0x26].copy_from_slice(&header(T_OUT, 9)[10..]);
        let mem = chain(
            &[(0x1000, 10, false), (0x1400, 0, false), (0x1020, 6 + 512, false), (0x3000, 1, true)],
            &h,
        );
        let r = parse(&mem, &DescTable::new(&mem, 0, 8), 0, false).expect("valid chain");
        assert_eq!((r.kind, r.sector), (T_OUT, 9));
        assert_eq!(lens(r.data_out()), [512]);
        assert_eq!(
            r.data_out()[0].as_ptr(),
            mem.get_host_address(GuestAddress(0x1026)).expect("mapped")
        );
        assert!(r.data_in().is_empty());

        let mem = chain(
            &[(0x1000, 16, false), (0x2000, 0, true), (0x2000, 513, true), (0x3000, 0, true)],
            &header(T_IN, 1),
        );
        let r = parse(&mem, &DescTable::new(&mem, 0, 8), 0, false).expect("valid chain");
        assert_eq!(lens(r.data_in()), [512]);
        assert_eq!(r.status, mem.get_host_address(GuestAddress(0x2200)).expect("mapped"));
    }

    #[test]
    fn malformed_chains_are_refused() {
        let h = header(T_IN, 0);
        // Readable after writable, even after an empty writable one.
        let mem = chain(
            &[(0x1000, 16, false), (0x2000, 0, true), (0x2000, 512, false), (0x3000, 1, true)],
            &h,
        );
        assert_eq!(
            parse(&mem, &DescTable::new(&mem, 0, 8), 0, false).err(),
            Some(ChainError::Malformed)
        );
        // A short header, and no status byte.
        let mem = chain(&[(0x1000, 15, false), (0x3000, 1, true)], &h);
        assert_eq!(
            parse(&mem, &DescTable::new(&mem, 0, 8), 0, false).err(),
            Some(ChainError::Malformed)
        );
        let mem = chain(&[(0x1000, 16, false), (0x2000, 0, true)], &h);
        assert_eq!(
            parse(&mem, &DescTable::new(&mem, 0, 8), 0, false).err(),
            Some(ChainError::Malformed)
        );
    }

    #[test]
    fn a_table_running_out_of_guest_memory_is_read_descriptor_by_descriptor() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 10)]).expect("memory");
        let at = (64 << 10) - 16;
        let d = Desc { addr: 0x1000, len: 16, flags: VIRTQ_DESC_F_NEXT, next: 1 };
        mem.write_obj(d, GuestAddress(at)).expect("descriptor");
        let table = DescTable::new(&mem, at, 8);
        assert!(table.host.is_none());
        assert_eq!(parse(&mem, &table, 0, false).err(), Some(ChainError::BadAddress));
    }

    #[test]
    fn more_segments_than_the_request_holds_are_refused() {
        let n = MAX_SEGS + 1;
        let mut descs = vec![(0x1000, 16, false)];
        descs.extend((1..n).map(|i| (0x2000 + i as u64 * 8, 8, true)));
        let mem = chain(&descs, &header(T_IN, 0));
        assert_eq!(
            parse(&mem, &DescTable::new(&mem, 0, 1024), 0, false).err(),
            Some(ChainError::TooManySegments)
        );
        descs.pop();
        let mem = chain(&descs, &header(T_IN, 0));
        let r =
            parse(&mem, &DescTable::new(&mem, 0, 1024), 0, false).expect("MAX_SEGS segments fit");
        assert_eq!(r.data_in().len(), MAX_SEGS - 1);
    }

    #[test]
    fn indirect_tables_are_walked_and_refused_when_not_negotiated_or_nested() {
        // The request's three descriptors at 0x8000; the ring's descriptor 0 points there.
        let mem = chain(
            &[(0x1000, 16, false), (0x2000, 4096, true), (0x3000, 1, true)],
            &header(T_IN, 5),
        );
        for i in 0..3u64 {
            let d: Desc = mem.read_obj(GuestAddress(i * 16)).expect("descriptor");
            mem.write_obj(d, GuestAddress(0x8000 + i * 16)).expect("copy");
        }
        let ind = Desc { addr: 0x8000, len: 48, flags: VIRTQ_DESC_F_INDIRECT, next: 0 };
        mem.write_obj(ind, GuestAddress(0)).expect("ring descriptor");
        let ring = DescTable::new(&mem, 0, 8);
        let r = parse(&mem, &ring, 0, true).expect("valid indirect chain");
        assert_eq!((r.kind, r.sector), (T_IN, 5));
        assert_eq!(lens(r.data_in()), [4096]);
        assert_eq!(parse(&mem, &ring, 0, false).err(), Some(ChainError::BadChain));
        // An indirect descriptor inside the table, and a table past guest memory.
        mem.write_obj(ind, GuestAddress(0x8010)).expect("nested");
        assert_eq!(parse(&mem, &ring, 0, true).err(), Some(ChainError::BadChain));
        let far = Desc { addr: 1 << 30, ..ind };
        mem.write_obj(far, GuestAddress(0)).expect("ring descriptor");
        assert_eq!(parse(&mem, &ring, 0, true).err(), Some(ChainError::BadAddress));
    }
}
