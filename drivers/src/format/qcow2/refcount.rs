//! Refcounts: the refcount table (shared by the shards, see `image`) and the refcount
//! blocks of one shard's allocation groups (through its own [`MetaCache`] of slices),
//! for every width from 1 to 64 bits.
//!
//! This module reads and changes refcounts in the cache. Where new refcount blocks go,
//! and when dirty slices reach the disk, is the shard's business (`shard.rs`), because
//! that is where the ordering rules live.

use std::sync::Arc;

use crate::io::align::Aligned;

use super::cache::{GetError, MetaCache, Pin};
use super::image::Image;
use super::types::*;

pub(crate) struct Refcounts {
    pub g: Geometry,
    /// The image, whose refcount table entries (raw, with reserved bits checked at
    /// open) every shard reads.
    pub img: Arc<Image>,
    pub cache: MetaCache,
    /// log2 of refcount entries per cache slice.
    slice_entry_bits: u32,
    /// log2 of slices per refcount block.
    slices_per_block_bits: u32,
}

/// Where a cluster's refcount lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RefLoc {
    /// Refcount table index.
    pub table_index: u64,
    /// Cache key of the slice.
    pub key: u64,
    /// Host offset of the slice.
    pub host: u64,
    /// Entry index within the slice.
    pub entry: usize,
}

impl Refcounts {
    pub(crate) fn new(img: Arc<Image>, cache_bytes: u64) -> std::io::Result<Self> {
        let g = img.g;
        let slice_bytes = g.cluster_size().min(4096) as usize;
        let slice_entry_bits = ((slice_bytes as u64 * 8) >> g.refcount_order).trailing_zeros();
        let slices_per_block_bits = (g.cluster_size() / slice_bytes as u64).trailing_zeros();
        let capacity = (cache_bytes / slice_bytes as u64).max(16) as usize;
        Ok(Refcounts {
            g,
            img,
            cache: MetaCache::new(slice_bytes, capacity)?,
            slice_entry_bits,
            slices_per_block_bits,
        })
    }

    pub(crate) fn table_len(&self) -> u64 {
        self.img.reftable.len()
    }

    /// Refcount table entry `ti` (0 beyond the table).
    pub(crate) fn entry(&self, ti: u64) -> u64 {
        self.img.reftable.entry(ti).unwrap_or(0)
    }

    /// Clusters one refcount block covers.
    pub(crate) fn block_entries(&self) -> u64 {
        self.g.refblock_entries()
    }

    /// Where `cluster`'s refcount lives: `None` if beyond the table, `Some(Err(ti))`
    /// if its table entry `ti` has no block yet.
    pub(crate) fn locate(&self, cluster: u64) -> Option<Result<RefLoc, u64>> {
        let per_block_bits = self.block_entries().trailing_zeros();
        let ti = cluster >> per_block_bits;
        let raw = self.img.reftable.entry(ti)?;
        let block = raw & !REFT_RESERVED;
        if block == 0 {
            return Some(Err(ti));
        }
        let within = cluster & (self.block_entries() - 1);
        let slice = within >> self.slice_entry_bits;
        let key = (ti << self.slices_per_block_bits) | slice;
        let host = block + slice * self.cache.slice_bytes() as u64;
        let entry = (within & ((1 << self.slice_entry_bits) - 1)) as usize;
        Some(Ok(RefLoc { table_index: ti, key, host, entry }))
    }

    pub(crate) async fn pin(&self, io: &Aligned, loc: &RefLoc) -> Result<Pin<'_>, GetError> {
        self.cache.get(io, loc.key, || loc.host, false).await
    }

    /// Reads the refcount at `loc` in a pinned slice.
    pub(crate) fn read(&self, pin: &Pin<'_>, loc: &RefLoc) -> u64 {
        get_refcount(pin.bytes(), loc.entry, self.g.refcount_order)
    }

    /// Sets the refcount at `loc`; false if it does not fit the width.
    pub(crate) fn write(&self, pin: &Pin<'_>, loc: &RefLoc, v: u64) -> bool {
        if v > self.g.refcount_max() {
            return false;
        }
        let order = self.g.refcount_order;
        pin.modify(|b| set_refcount(b, loc.entry, order, v));
        true
    }
}
