//! qcow2 on-disk constants and table entry encodings (QEMU docs/interop/qcow2.txt).
//! Everything on disk is big-endian.

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// The smallest cluster: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// The largest cluster QEMU can open: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Widest refcount: 64 bits.
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's limit on the L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Version 2 header length.
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum version 3 header length.
pub const V3_HEADER_LEN: u32 = 104;
/// Host offsets are at most 56 bits.
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;

// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// The incompatible bits this implementation understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
// Compatible and autoclear feature bits.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

// Header field offsets rewritten in place.
pub const OFF_SIZE: u64 = 24;
pub const OFF_REFCOUNT_TABLE: u64 = 48;
pub const OFF_INCOMPATIBLE: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

// L1/L2 entry bits.
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1 << 0;
/// Bits 9-55: a cluster-aligned host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (bits 1-8 and 56-61).
pub const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters per cluster with extended L2 entries, and its log2.
pub const SUBCLUSTERS: u32 = 32;
pub const SUBCLUSTER_SHIFT: u32 = 5;
/// Every subcluster's bit.
pub const ALL_SUBCLUSTERS: u32 = u32::MAX;
/// The smallest cluster with extended L2 entries (subclusters of 512 bytes).
pub const MIN_EXTL2_CLUSTER_BITS: u32 = MIN_CLUSTER_BITS + SUBCLUSTER_SHIFT;
/// Reserved bits of a refcount table entry.
pub const REFT_RESERVED: u64 = 0x0000_0000_0000_01ff;

/// Compression of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// The geometry every table computation needs, derived from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub refcount_order: u32,
    pub size: u64,
    pub version: u32,
    /// Guest data lives in an external data file (incompatible bit 2): data clusters
    /// sit at their guest offset there and are not refcounted.
    pub external_data: bool,
    /// Extended L2 entries (incompatible bit 4): 128-bit entries, each cluster split
    /// into 32 subclusters with their own allocation and zero bits.
    pub extended_l2: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// log2 of an L2 entry's bytes: 8, or 16 with extended L2 entries.
    pub fn l2_entry_bits(&self) -> u32 {
        if self.extended_l2 { 4 } else { 3 }
    }
    /// 64-bit words per L2 entry.
    pub fn l2_words(&self) -> usize {
        1 << (self.l2_entry_bits() - 3)
    }
    /// log2 of entries per L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - self.l2_entry_bits()
    }
    /// log2 of the unit of allocation within a cluster: a subcluster (1/32 of a
    /// cluster) with extended L2 entries, else the cluster.
    pub fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 { self.cluster_bits - SUBCLUSTER_SHIFT } else { self.cluster_bits }
    }
    pub fn subcluster_size(&self) -> u64 {
        1 << self.subcluster_bits()
    }
    /// The subclusters `off..off+len` (within one cluster) touch, as a bitmask.
    pub fn subcluster_mask(&self, off: u64, len: u64) -> u32 {
        let sb = self.subcluster_bits();
        let s0 = (self.offset_in_cluster(off) >> sb) as u32;
        let s1 = ((self.offset_in_cluster(off) + len.max(1) - 1) >> sb) as u32 + 1;
        assert!(s1 <= SUBCLUSTERS && self.cluster_of(off) == self.cluster_of(off + len.max(1) - 1));
        sub_range(s0, s1)
    }
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }
    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }
    /// L1 entries needed for the virtual size.
    pub fn l1_entries_needed(&self) -> u64 {
        self.size.div_ceil(self.l2_coverage())
    }
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// Refcount entries per refcount block.
    pub fn refblock_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 { u64::MAX } else { (1u64 << self.refcount_bits()) - 1 }
    }
    pub fn cluster_of(&self, off: u64) -> u64 {
        off >> self.cluster_bits
    }
    pub fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }
    pub fn is_cluster_aligned(&self, off: u64) -> bool {
        self.offset_in_cluster(off) == 0
    }
    /// Bits of a compressed descriptor holding the host offset.
    pub fn compressed_offset_bits(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Reads from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster (v3 zero flag).
    Zero { host: Option<u64>, copied: bool },
    /// Data at a cluster-aligned host offset.
    Normal { host: u64, copied: bool },
    /// Compressed data at a byte offset, at most `max_len` bytes long.
    Compressed { host: u64, max_len: u64 },
    /// Extended L2 entries only: a cluster whose subclusters are not all in one state
    /// (bit `i` of `alloc`: subcluster `i` holds data at `host + i * subcluster size`;
    /// of `zero`: it reads as zeros; neither: it reads from below). Without a host
    /// cluster no subcluster is allocated.
    Sub { host: Option<u64>, copied: bool, alloc: u32, zero: u32 },
}

/// The state of one subcluster (or of a whole cluster without subclusters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubState {
    Data,
    Zero,
    Unallocated,
}

/// Why an entry is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryError {
    Reserved,
    Unaligned,
    ZeroFlagV2,
    /// A subcluster both allocated and reading as zeros.
    SubclusterBoth,
    /// Allocated subclusters without a host cluster.
    SubclusterNoHost,
}

impl L2Entry {
    pub fn decode(raw: u64, g: &Geometry) -> Result<L2Entry, EntryError> {
        if raw & OFLAG_COMPRESSED != 0 && g.external_data {
            // Images with an external data file hold no compressed clusters.
            return Err(EntryError::Reserved);
        }
        if raw & OFLAG_COMPRESSED != 0 {
            let bits = g.compressed_offset_bits();
            let host = raw & ((1u64 << bits) - 1);
            let sectors = ((raw & !OFLAG_COPIED & !OFLAG_COMPRESSED) >> bits) + 1;
            if raw & OFLAG_COPIED != 0 || host > MAX_HOST_OFFSET {
                return Err(EntryError::Reserved);
            }
            let max_len = sectors * 512 - (host & 511);
            return Ok(L2Entry::Compressed { host, max_len });
        }
        if raw & L2_STD_RESERVED != 0 {
            return Err(EntryError::Reserved);
        }
        let copied = raw & OFLAG_COPIED != 0;
        let host = raw & OFFSET_MASK;
        if host != 0 && !g.is_cluster_aligned(host) {
            return Err(EntryError::Unaligned);
        }
        if raw & OFLAG_ZERO != 0 {
            if g.version < 3 {
                return Err(EntryError::ZeroFlagV2);
            }
            return Ok(L2Entry::Zero { host: (host != 0).then_some(host), copied });
        }
        if host == 0 {
            // COPIED with offset 0 is guest cluster 0 in an external data file.
            return match (copied, g.external_data) {
                (false, _) => Ok(L2Entry::Unallocated),
                (true, true) => Ok(L2Entry::Normal { host, copied }),
                (true, false) => Err(EntryError::Reserved),
            };
        }
        Ok(L2Entry::Normal { host, copied })
    }

    /// Decodes an entry of either width: `w1` is the subcluster bitmap of an
    /// extended entry (ignored otherwise).
    pub fn decode2(w0: u64, w1: u64, g: &Geometry) -> Result<L2Entry, EntryError> {
        if !g.extended_l2 {
            return L2Entry::decode(w0, g);
        }
        if w0 & OFLAG_COMPRESSED != 0 {
            // Compressed clusters have no subclusters: the bitmap is reserved.
            return if w1 != 0 { Err(EntryError::Reserved) } else { L2Entry::decode(w0, g) };
        }
        // Bit 0 (the zero flag of standard entries) is reserved: the bitmap says it.
        if w0 & (L2_STD_RESERVED | OFLAG_ZERO) != 0 {
            return Err(EntryError::Reserved);
        }
        let copied = w0 & OFLAG_COPIED != 0;
        let host = w0 & OFFSET_MASK;
        if host != 0 && !g.is_cluster_aligned(host) {
            return Err(EntryError::Unaligned);
        }
        if host == 0 && copied && !g.external_data {
            return Err(EntryError::Reserved);
        }
        let has_host = host != 0 || copied;
        let (alloc, zero) = (w1 as u32, (w1 >> 32) as u32);
        if alloc & zero != 0 {
            return Err(EntryError::SubclusterBoth);
        }
        if !has_host && alloc != 0 {
            return Err(EntryError::SubclusterNoHost);
        }
        Ok(L2Entry::from_bitmaps(has_host.then_some(host), copied, alloc, zero))
    }

    /// The entry of a cluster at `host` (none: no host cluster) whose subclusters
    /// have these bitmaps, in its uniform form where it has one.
    pub fn from_bitmaps(host: Option<u64>, copied: bool, alloc: u32, zero: u32) -> L2Entry {
        assert!(alloc & zero == 0, "subclusters both allocated and zero: {alloc:#x}");
        assert!(host.is_some() || alloc == 0, "allocated subclusters without a cluster");
        match (host, alloc, zero) {
            (Some(host), ALL_SUBCLUSTERS, _) => L2Entry::Normal { host, copied },
            (host, 0, ALL_SUBCLUSTERS) => L2Entry::Zero { host, copied: copied && host.is_some() },
            (None, 0, 0) => L2Entry::Unallocated,
            (host, alloc, zero) => L2Entry::Sub { host, copied, alloc, zero },
        }
    }

    /// The subcluster bitmaps (allocated, zero) of any entry but a compressed one.
    pub fn bitmaps(&self) -> (u32, u32) {
        match *self {
            L2Entry::Unallocated => (0, 0),
            L2Entry::Zero { .. } => (0, ALL_SUBCLUSTERS),
            L2Entry::Normal { .. } | L2Entry::Compressed { .. } => (ALL_SUBCLUSTERS, 0),
            L2Entry::Sub { alloc, zero, .. } => (alloc, zero),
        }
    }

    /// The host cluster of a standard entry (data, preallocated zeros or subclusters).
    pub fn host_cluster(&self) -> Option<u64> {
        match *self {
            L2Entry::Normal { host, .. } => Some(host),
            L2Entry::Zero { host, .. } | L2Entry::Sub { host, .. } => host,
            L2Entry::Unallocated | L2Entry::Compressed { .. } => None,
        }
    }

    /// Whether the entry's cluster is COPIED (its refcount is one).
    pub fn copied(&self) -> bool {
        match *self {
            L2Entry::Normal { copied, .. }
            | L2Entry::Zero { copied, .. }
            | L2Entry::Sub { copied, .. } => copied,
            L2Entry::Unallocated | L2Entry::Compressed { .. } => false,
        }
    }

    /// The state of subcluster `i` (of the cluster, without subclusters).
    pub fn sub_state(&self, i: u32) -> SubState {
        let (alloc, zero) = self.bitmaps();
        if alloc & (1 << i) != 0 {
            SubState::Data
        } else if zero & (1 << i) != 0 {
            SubState::Zero
        } else {
            SubState::Unallocated
        }
    }

    /// The end of the run of subclusters from `s0` in `s0`'s state.
    pub fn sub_run_end(&self, s0: u32) -> u32 {
        let state = self.sub_state(s0);
        (s0 + 1..SUBCLUSTERS).find(|&s| self.sub_state(s) != state).unwrap_or(SUBCLUSTERS)
    }

    /// Encodes an entry of either width (`.1` is the bitmap of an extended entry).
    pub fn encode2(&self, g: &Geometry) -> (u64, u64) {
        if !g.extended_l2 {
            return (self.encode(), 0);
        }
        let (alloc, zero) = self.bitmaps();
        let w0 = match self.host_cluster() {
            Some(h) => h | if self.copied() { OFLAG_COPIED } else { 0 },
            None => 0,
        };
        (w0, u64::from(alloc) | u64::from(zero) << 32)
    }

    pub fn encode(&self) -> u64 {
        match *self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host, copied } => {
                host.unwrap_or(0) | OFLAG_ZERO | if copied { OFLAG_COPIED } else { 0 }
            }
            L2Entry::Normal { host, copied } => host | if copied { OFLAG_COPIED } else { 0 },
            L2Entry::Compressed { .. } => panic!("compressed entries are never written"),
            L2Entry::Sub { .. } => panic!("subcluster entries in a standard L2 table"),
        }
    }
}

/// The raw L2 entry of a compressed cluster whose `len` bytes start at byte `host`:
/// the offset, and the count of 512-byte sectors after the first that the bytes reach.
pub fn compressed_entry(host: u64, len: u64, g: &Geometry) -> u64 {
    let bits = g.compressed_offset_bits();
    assert!(len > 0 && host + len <= 1u64 << bits, "compressed data at {host:#x}+{len}");
    let extra = ((host + len - 1) >> 9) - (host >> 9);
    assert!(extra < 1u64 << (62 - bits), "compressed data of {len} bytes");
    OFLAG_COMPRESSED | (extra << bits) | host
}

/// The host clusters a compressed cluster's bytes touch: (first cluster offset, count).
pub fn compressed_clusters(host: u64, max_len: u64, g: &Geometry) -> (u64, u64) {
    let first = host & !(g.cluster_size() - 1);
    let last = (host + max_len - 1) & !(g.cluster_size() - 1);
    (first, ((last - first) >> g.cluster_bits) + 1)
}

/// Decodes an L1 entry: the L2 table offset (0 = none) and its COPIED flag.
pub fn decode_l1(raw: u64, g: &Geometry) -> Result<(u64, bool), EntryError> {
    if raw & L1_RESERVED != 0 {
        return Err(EntryError::Reserved);
    }
    let off = raw & OFFSET_MASK;
    if !g.is_cluster_aligned(off) {
        return Err(EntryError::Unaligned);
    }
    Ok((off, raw & OFLAG_COPIED != 0))
}

/// Reads refcount entry `i` of a refcount block (or slice) of `order`.
pub fn get_refcount(block: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[i / per_byte];
            u64::from((byte >> ((i % per_byte) * bits)) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().expect("4 bytes"))),
        _ => u64::from_be_bytes(block[8 * i..8 * i + 8].try_into().expect("8 bytes")),
    }
}

/// Writes refcount entry `i`. `v` must fit the width.
pub fn set_refcount(block: &mut [u8], i: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((v as u8) << shift) & mask);
        }
        3 => block[i] = v as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

/// The raw words of L2 entry `i` of a table (or slice) `b`: (entry, bitmap; 0 for a
/// standard entry).
pub fn l2_raw_at(b: &[u8], i: usize, g: &Geometry) -> (u64, u64) {
    if g.extended_l2 { (be64_at(b, 2 * i), be64_at(b, 2 * i + 1)) } else { (be64_at(b, i), 0) }
}

/// Writes L2 entry `i` of a table (or slice) `b`.
pub fn set_l2_at(b: &mut [u8], i: usize, e: &L2Entry, g: &Geometry) {
    let (w0, w1) = e.encode2(g);
    if g.extended_l2 {
        set_be64_at(b, 2 * i, w0);
        set_be64_at(b, 2 * i + 1, w1);
    } else {
        set_be64_at(b, i, w0);
    }
}

/// Bits `s0..s1` of a subcluster bitmap.
pub fn sub_range(s0: u32, s1: u32) -> u32 {
    assert!(s0 < s1 && s1 <= SUBCLUSTERS, "subclusters {s0}..{s1}");
    (u32::MAX >> (SUBCLUSTERS - (s1 - s0))) << s0
}

pub fn be64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"))
}

pub fn set_be64_at(b: &mut [u8], i: usize, v: u64) {
    b[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(cluster_bits: u32, version: u32) -> Geometry {
        Geometry {
            cluster_bits,
            refcount_order: 4,
            size: 1 << 30,
            version,
            external_data: false,
            extended_l2: false,
        }
    }

    #[test]
    fn extended_entries_round_trip_and_reject_garbage() {
        let g = Geometry { extended_l2: true, ..geo(16, 3) };
        assert_eq!(g.l2_bits(), 12);
        assert_eq!(g.subcluster_size(), 2048);
        assert_eq!(g.subcluster_mask(2048, 4096), 0b110);
        assert_eq!(g.subcluster_mask((5 << 16) + 1, 1), 1);
        assert_eq!(sub_range(0, 32), u32::MAX);
        let h = Some(7 << 16);
        for e in [
            L2Entry::Unallocated,
            L2Entry::Zero { host: None, copied: false },
            L2Entry::Zero { host: h, copied: true },
            L2Entry::Normal { host: 7 << 16, copied: true },
            L2Entry::Sub { host: h, copied: true, alloc: 0b101, zero: 0b10 },
            L2Entry::Sub { host: h, copied: false, alloc: 0, zero: 0 },
            L2Entry::Sub { host: None, copied: false, alloc: 0, zero: 0b1000 },
        ] {
            let (w0, w1) = e.encode2(&g);
            assert_eq!(L2Entry::decode2(w0, w1, &g), Ok(e), "{e:?}");
        }
        let both = 1u64 | (1 << 32);
        assert_eq!(L2Entry::decode2(7 << 16, both, &g), Err(EntryError::SubclusterBoth));
        assert_eq!(L2Entry::decode2(0, 1, &g), Err(EntryError::SubclusterNoHost));
        assert_eq!(L2Entry::decode2((7 << 16) | 1, 0, &g), Err(EntryError::Reserved));
        assert_eq!(L2Entry::decode2(OFLAG_COMPRESSED | 512, 1, &g), Err(EntryError::Reserved));
        let e = L2Entry::Sub { host: h, copied: true, alloc: 1, zero: 2 };
        assert_eq!(
            (e.sub_state(0), e.sub_state(1), e.sub_state(2)),
            (SubState::Data, SubState::Zero, SubState::Unallocated)
        );
    }

    #[test]
    fn l2_entries_round_trip_and_reject_garbage() {
        let g = geo(16, 3);
        for e in [
            L2Entry::Unallocated,
            L2Entry::Zero { host: None, copied: false },
            L2Entry::Zero { host: Some(5 << 16), copied: true },
            L2Entry::Normal { host: 7 << 16, copied: true },
            L2Entry::Normal { host: 7 << 16, copied: false },
        ] {
            assert_eq!(L2Entry::decode(e.encode(), &g), Ok(e));
        }
        assert_eq!(L2Entry::decode((7 << 16) | 512, &g), Err(EntryError::Unaligned));
        assert_eq!(L2Entry::decode((7 << 16) | 2, &g), Err(EntryError::Reserved));
        assert_eq!(L2Entry::decode(OFLAG_COPIED, &g), Err(EntryError::Reserved));
        assert_eq!(L2Entry::decode(1, &geo(16, 2)), Err(EntryError::ZeroFlagV2));
    }

    #[test]
    fn compressed_descriptor() {
        let g = geo(16, 3);
        let bits = g.compressed_offset_bits();
        assert_eq!(bits, 54);
        let raw = OFLAG_COMPRESSED | (2u64 << bits) | 0x1_0100;
        assert_eq!(
            L2Entry::decode(raw, &g),
            Ok(L2Entry::Compressed { host: 0x1_0100, max_len: 3 * 512 - 256 })
        );
        assert_eq!(compressed_clusters(0x1_ff00, 512, &g), (0x1_0000, 2));
    }

    #[test]
    fn refcounts_of_every_width() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let n = (64 * 8) >> order;
            let max = if order == 6 { u64::MAX } else { (1u64 << (1 << order)) - 1 };
            for i in 0..n {
                set_refcount(&mut b, i, order, (i as u64 * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&b, i, order),
                    (i as u64 * 7 + 3) & max,
                    "order {order} entry {i}"
                );
            }
        }
        // Sub-byte widths: bit 0 is the least significant bit.
        let mut b = [0u8; 1];
        set_refcount(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        set_refcount(&mut b, 3, 1, 2);
        assert_eq!(b[0], 0b1000_0001);
    }
}
