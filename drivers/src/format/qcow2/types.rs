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
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Entries per L2 table (8-byte entries).
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3
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
}

/// Why an entry is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryError {
    Reserved,
    Unaligned,
    ZeroFlagV2,
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

    pub fn encode(&self) -> u64 {
        match *self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host, copied } => {
                host.unwrap_or(0) | OFLAG_ZERO | if copied { OFLAG_COPIED } else { 0 }
            }
            L2Entry::Normal { host, copied } => host | if copied { OFLAG_COPIED } else { 0 },
            L2Entry::Compressed { .. } => panic!("compressed entries are never written"),
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
        Geometry { cluster_bits, refcount_order: 4, size: 1 << 30, version, external_data: false }
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
