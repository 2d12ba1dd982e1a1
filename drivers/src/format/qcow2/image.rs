//! What the shards of one image share: the description every shard reads without a
//! lock, and the few words that more than one shard changes.
//!
//! # Ownership
//! An image is split over `n` shards, one per serving reactor.
//! - *Guest space*: by L2 table, interleaved: the table with L1 index `i` (and so every
//!   guest cluster it maps, its cached slices and its copy on write) belongs to shard
//!   `i % n`. A table is the unit whose creation and copy on write is one metadata
//!   object, so no L2 change ever needs two shards. With 64 KiB clusters a table maps
//!   512 MiB, so random I/O over any disk of a few GiB spreads evenly; an image with
//!   fewer tables than shards leaves some shards idle (they still serve nothing wrong).
//! - *Host space*: by allocation group, the clusters one refcount block covers,
//!   interleaved: group `t` (refcount table entry `t`) belongs to shard `t % n`. A shard
//!   allocates (data clusters, its L2 tables) only in its groups and is the only one
//!   that reads or writes their refcount blocks; a free in another shard's group is a
//!   message to its owner. The file is sparse where a shard has not allocated yet.
//! - *Global structures* (the header, the refcount table and its growth, new refcount
//!   blocks, the dirty and corrupt bits) change only on the leader, shard 0, through
//!   messages from the others. L1 entries are written by the owner of their table
//!   (storage serialises read-modify-write of a shared sector, so two shards writing
//!   neighbouring 8-byte entries never undo each other).
//!
//! Tables read by every shard are arrays of atomics: the L1 table (each entry written
//! only by the shard that owns it), the refcount table (written only by the leader,
//! preallocated to its maximum size so it never moves; untouched pages cost nothing).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use super::hints::{Lease, MapHints};
use super::types::{Geometry, MAX_REFTABLE_BYTES};

/// A table of 64-bit entries that several reactors read and one writes per entry.
pub(crate) struct AtomicTable {
    entries: Box<[AtomicU64]>,
}

const _: () = assert!(
    std::mem::size_of::<AtomicU64>() == std::mem::size_of::<u64>()
        && std::mem::align_of::<AtomicU64>() == std::mem::align_of::<u64>()
);

impl AtomicTable {
    /// Takes `v` over without copying it (a large, mostly empty L1 table stays mostly
    /// non-resident).
    pub(crate) fn from_vec(v: Vec<u64>) -> AtomicTable {
        let raw = Box::into_raw(v.into_boxed_slice());
        // SAFETY: AtomicU64 has the size, alignment and bit validity of u64 (asserted
        // above), and the box is uniquely owned: reinterpreting it is sound.
        let entries = unsafe { Box::from_raw(raw as *mut [AtomicU64]) };
        AtomicTable { entries }
    }

    /// `v`, followed by zeros up to `capacity` entries (allocated zeroed: pages never
    /// written are never resident).
    pub(crate) fn with_capacity(v: &[u64], capacity: usize) -> AtomicTable {
        let mut t = vec![0u64; capacity.max(v.len())];
        t[..v.len()].copy_from_slice(v);
        AtomicTable::from_vec(t)
    }

    /// `n` zero entries, allocated zeroed (never resident until written).
    pub(crate) fn zeroed(n: usize) -> AtomicTable {
        AtomicTable::from_vec(vec![0u64; n])
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entry `i` itself, for callers with their own ordering protocol.
    pub(crate) fn slot(&self, i: usize) -> &AtomicU64 {
        &self.entries[i]
    }

    pub(crate) fn get(&self, i: usize) -> Option<u64> {
        // Acquire: pairs with `set`; whatever was written before the entry was
        // published (the table it points at, synced) is visible.
        self.entries.get(i).map(|e| e.load(Ordering::Acquire))
    }

    pub(crate) fn set(&self, i: usize, v: u64) {
        self.entries[i].store(v, Ordering::Release);
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().map(|e| e.load(Ordering::Acquire))
    }
}

/// The refcount table as every shard sees it; only the leader changes it.
pub(crate) struct RefTable {
    pub entries: AtomicTable,
    /// Entries of the table on disk (the rest of `entries` is zero).
    pub len: AtomicU64,
    pub offset: AtomicU64,
    pub clusters: AtomicU32,
}

impl RefTable {
    pub(crate) fn new(table: &[u64], offset: u64, clusters: u32) -> RefTable {
        let max = (MAX_REFTABLE_BYTES / 8) as usize;
        RefTable {
            entries: AtomicTable::with_capacity(table, max),
            len: AtomicU64::new(table.len() as u64),
            offset: AtomicU64::new(offset),
            clusters: AtomicU32::new(clusters),
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Entry `ti`, or `None` beyond the table.
    pub(crate) fn entry(&self, ti: u64) -> Option<u64> {
        if ti >= self.len() {
            return None;
        }
        self.entries.get(ti as usize)
    }
}

/// The shared state of an open image.
pub(crate) struct Image {
    pub name: String,
    pub g: Geometry,
    /// Shards serving the image.
    pub n: usize,
    /// The top layer's L1 table.
    pub l1: std::sync::Arc<AtomicTable>,
    pub l1_table_offset: u64,
    pub reftable: RefTable,
    /// Clusters of the file at open: everything past them that no shard allocated
    /// since reads as zeros.
    pub open_end: u64,
    /// One past the last cluster anything ever held (at open, or allocated since by
    /// any shard): an entry pointing past it is corrupt.
    pub host_end: AtomicU64,
    pub corrupt: AtomicBool,
    pub dirty_bit_on_disk: AtomicBool,
    /// The header's incompatible features (written by the leader).
    pub incompatible: AtomicU64,
    /// Mappings any reactor may use without asking the owner (see `hints`).
    pub hints: MapHints,
    /// Holds frees back while zero-hop I/O may still target the cluster.
    pub lease: Lease,
    /// Bumped whenever a cluster becomes metadata (writable hints of older
    /// generations are not used).
    pub meta_gen: AtomicU64,
    /// Closed: channels' zero-hop path stops (requests then meet the closed shards).
    pub closed: AtomicBool,
}

impl Image {
    /// The shard owning guest offset `off` (its L2 table's, interleaved).
    pub(crate) fn guest_owner(&self, off: u64) -> usize {
        if self.n == 1 {
            return 0;
        }
        ((off >> self.table_bits()) % self.n as u64) as usize
    }

    /// log2 of the guest bytes an L2 table maps: the unit of guest ownership.
    pub(crate) fn table_bits(&self) -> u32 {
        self.g.cluster_bits + self.g.l2_bits()
    }

    /// The shard owning host cluster `c` (its allocation group's).
    pub(crate) fn group_owner(&self, c: u64) -> usize {
        if self.n == 1 {
            return 0;
        }
        ((c >> self.group_bits()) % self.n as u64) as usize
    }

    /// log2 of clusters per allocation group (one refcount block's coverage).
    pub(crate) fn group_bits(&self) -> u32 {
        self.g.refblock_entries().trailing_zeros()
    }

    pub(crate) fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Acquire)
    }

    pub(crate) fn set_corrupt(&self) {
        self.corrupt.store(true, Ordering::Release);
    }

    pub(crate) fn host_end(&self) -> u64 {
        self.host_end.load(Ordering::Acquire)
    }

    pub(crate) fn note_end(&self, end: u64) {
        if end > self.host_end() {
            self.host_end.fetch_max(end, Ordering::AcqRel);
        }
    }

    /// The metadata generation, as hints keep it.
    pub(crate) fn meta_generation(&self) -> u16 {
        self.meta_gen.load(Ordering::Acquire) as u16
    }
}
