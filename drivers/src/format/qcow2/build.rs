//! From an opened image to its shards: the shared parts (built once on the control
//! plane: the tables become atomics, moved, not copied) and, on each serving reactor,
//! a shard with its own caches, channels, inboxes and mailbox.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use poller::MailSender;

use crate::error::IoError;
use crate::io::Storage;
use crate::io::align::Aligned;

use super::cache::MetaCache;
use super::compress::Decompressor;
use super::header::Header;
use super::hints::{Lease, MapHints, Publisher};
use super::image::{AtomicTable, Image, RefTable};
use super::layer::{Layer, Qcow2Layer};
use super::open::{OpenOptions, OpenedImage, OpenedLayer};
use super::overlap::MetaMap;
use super::refcount::Refcounts;
use super::route::{CallPtr, Inboxes, Route};
use super::shard::Shard;
use super::snapshot::SnapshotInfo;
use super::types::Compression;
use super::types::{Geometry, INCOMPAT_DIRTY, REFT_RESERVED, decode_l1};
use super::{DEFAULT_L2_CACHE_BYTES, HOSTS, Host, REMOTE_RING};

/// Bytes of L2 cache budget per mapping hint slot: the hints cost at most a quarter of
/// the L2 cache (a slot is 16 bytes).
const HINT_COST: u64 = 64;
/// Budget of a backing file's L2 cache, per shard.
const BACKING_L2_CACHE_BYTES: u64 = 4 << 20;

/// A qcow2 file of the chain, as the shards share it.
pub(super) struct LayerParts {
    path: PathBuf,
    storage: Arc<Storage>,
    /// The external data file, if guest data lives there.
    data: Option<Arc<Storage>>,
    data_raw: bool,
    crypt: Option<Arc<super::luks::SectorCipher>>,
    g: Geometry,
    compression: Compression,
    l1: Arc<AtomicTable>,
}

pub(super) enum BackingParts {
    Qcow2(LayerParts),
    Raw(Arc<Storage>),
}

/// What every shard of an image is built from.
pub(super) struct Parts {
    pub image: Arc<Image>,
    top: LayerParts,
    header: Header,
    backing: Vec<BackingParts>,
    snapshots: (u64, Vec<SnapshotInfo>),
    read_only: bool,
    l2_bytes: u64,
    rc_bytes: u64,
}

fn layer_parts(q: super::open::OpenedQcow2) -> LayerParts {
    LayerParts {
        path: q.path,
        storage: q.storage,
        data: q.data,
        data_raw: q.header.data_file_raw(),
        crypt: q.crypt,
        g: q.header.geometry(),
        compression: q.header.compression(),
        l1: Arc::new(AtomicTable::from_vec(q.l1)),
    }
}

impl Parts {
    pub(super) fn new(img: OpenedImage, opts: &OpenOptions, n: usize) -> Parts {
        let h = img.top.header.clone();
        let g = h.geometry();
        let file_clusters = img.top.file_size.div_ceil(g.cluster_size());
        let top = layer_parts(img.top);
        let image = Arc::new(Image {
            name: top.path.display().to_string(),
            g,
            n,
            l1: top.l1.clone(),
            l1_table_offset: h.l1_table_offset,
            reftable: RefTable::new(
                &img.reftable,
                h.refcount_table_offset,
                h.refcount_table_clusters,
            ),
            open_end: file_clusters,
            host_end: AtomicU64::new(file_clusters),
            corrupt: AtomicBool::new(false),
            dirty_bit_on_disk: AtomicBool::new(h.incompatible & INCOMPAT_DIRTY != 0),
            incompatible: AtomicU64::new(h.incompatible),
            hints: MapHints::new(
                g.size.div_ceil(g.cluster_size()),
                g.l2_bits(),
                n,
                opts.l2_cache_bytes.unwrap_or(DEFAULT_L2_CACHE_BYTES) / HINT_COST,
            ),
            lease: Lease::new(),
            meta_gen: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let backing = img
            .backing
            .into_iter()
            .map(|b| match b {
                OpenedLayer::Qcow2(q) => BackingParts::Qcow2(layer_parts(q)),
                OpenedLayer::Raw { storage } => BackingParts::Raw(storage),
            })
            .collect();
        let l2_bytes = opts.l2_cache_bytes.unwrap_or(DEFAULT_L2_CACHE_BYTES);
        let rc_bytes = opts.refcount_cache_bytes.unwrap_or((l2_bytes / 4).max(256 << 10));
        Parts {
            image,
            top,
            header: h,
            backing,
            snapshots: img.snapshots,
            read_only: opts.read_only,
            // Each shard caches its own part of the image.
            l2_bytes: l2_bytes / n as u64,
            rc_bytes: rc_bytes / n as u64,
        }
    }
}

impl Parts {
    /// The top file's storage.
    pub(super) fn top_storage(&self) -> Arc<Storage> {
        self.top.storage.clone()
    }

    /// Whether the top layer's data is encrypted (no zero-hop path: data needs the
    /// cipher).
    pub(super) fn top_encrypted(&self) -> bool {
        self.top.crypt.is_some()
    }

    /// Where the top layer's guest data lives: its external data file, or the file.
    pub(super) fn top_data_storage(&self) -> Arc<Storage> {
        self.top.data.clone().unwrap_or_else(|| self.top.storage.clone())
    }
}

fn slice_bits_for(g: &Geometry) -> u32 {
    // Slices of at most 4 KiB (512 standard entries): small misses, aligned writebacks.
    g.cluster_bits.min(12) - g.l2_entry_bits()
}

/// A qcow2 layer on this reactor: the shared L1 table and a cache of at most
/// `cache_bytes` (smaller when the part of the image a shard owns needs less).
fn build_layer(
    p: &LayerParts,
    cache_bytes: u64,
    shards: u64,
    hints: Option<Publisher>,
) -> Result<Qcow2Layer, IoError> {
    let g = p.g;
    let slice_bits = slice_bits_for(&g);
    let slice_bytes = 1usize << (slice_bits + g.l2_entry_bits());
    let coverage = 1u64 << (g.cluster_bits + slice_bits);
    let needed = g.size.div_ceil(coverage).div_ceil(shards).max(1);
    let capacity = needed.min((cache_bytes / slice_bytes as u64).max(16)).max(16) as usize;
    Ok(Qcow2Layer {
        name: p.path.display().to_string(),
        g,
        io: Aligned::new(p.storage.channel()?),
        data: p.data.as_ref().map(|d| d.channel().map(Aligned::new)).transpose()?,
        data_raw: p.data_raw,
        crypt: p.crypt.clone(),
        l1: p.l1.clone(),
        l2: MetaCache::new(slice_bytes, capacity)?,
        slice_bits,
        decompressor: std::cell::RefCell::new(Decompressor::new(p.compression)?),
        hints,
    })
}

fn build_shard(p: &Parts, idx: usize) -> Result<Shard, IoError> {
    let n = p.image.n as u64;
    let meta = Rc::new(MetaMap::default());
    let publisher = Publisher { img: p.image.clone(), meta: meta.clone() };
    let mut chain = vec![Layer::Qcow2(build_layer(&p.top, p.l2_bytes, n, Some(publisher))?)];
    for b in &p.backing {
        chain.push(match b {
            BackingParts::Qcow2(q) => {
                Layer::Qcow2(build_layer(q, BACKING_L2_CACHE_BYTES, 1, None)?)
            }
            BackingParts::Raw(storage) => {
                Layer::Raw { io: Aligned::new(storage.channel()?), size: storage.size() }
            }
        });
    }
    let rc = Refcounts::new(p.image.clone(), p.rc_bytes)?;
    let shard = Shard::new(idx, chain, rc, meta, p.read_only, p.header.lazy_refcounts());
    mark_metadata(&shard, p);
    Ok(shard)
}

/// Fills the shard's metadata map (see `overlap`) with every structure of the image at
/// open. Metadata structures that overlap one another make the image corrupt: reads
/// go on, writes are refused.
fn mark_metadata(shard: &Shard, p: &Parts) {
    let h = &p.header;
    let g = h.geometry();
    let cb = g.cluster_bits;
    let cs = g.cluster_size();
    let clusters = |bytes: u64| bytes.div_ceil(cs).max(1);
    let mut overlaps: Vec<String> = Vec::new();
    let mut mark = |what: &str, off: u64, bytes: u64, fixed: bool| {
        if shard.meta.any(off >> cb, clusters(bytes)) {
            overlaps.push(format!("{what} at {off:#x}"));
        }
        if fixed {
            shard.meta.mark_fixed(off >> cb, clusters(bytes));
        } else {
            shard.meta.mark(off >> cb, clusters(bytes));
        }
    };
    mark("the header", 0, cs, false);
    if let Some(e) =
        h.extension(super::types::EXT_CRYPTO).filter(|e| h.crypt_method != 0 && e.len() >= 16)
    {
        let off = u64::from_be_bytes(e[..8].try_into().expect("8"));
        let len = u64::from_be_bytes(e[8..16].try_into().expect("8"));
        mark("the encryption header", off, len, false);
    }
    if h.l1_size > 0 {
        mark("the L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8, false);
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    mark("the refcount table", h.refcount_table_offset, rt_bytes, false);
    let rt = &p.image.reftable;
    for ti in 0..rt.len() {
        let b = rt.entry(ti).unwrap_or(0) & !REFT_RESERVED;
        if b != 0 {
            mark("a refcount block", b, cs, false);
        }
    }
    for e in p.image.l1.iter() {
        if let Ok((l2, _)) = decode_l1(e, &g)
            && l2 != 0
        {
            mark("an L2 table", l2, cs, false);
        }
    }
    let (snap_bytes, snaps) = &p.snapshots;
    if *snap_bytes > 0 {
        mark("the snapshot table", h.snapshots_offset, *snap_bytes, true);
    }
    for s in snaps {
        if s.l1_size > 0 {
            mark("a snapshot's L1 table", s.l1_offset, u64::from(s.l1_size) * 8, true);
        }
    }
    if !overlaps.is_empty() {
        if shard.is_leader() {
            shard.mark_corrupt_at_open(&format!(
                "metadata overlaps other metadata: {}",
                overlaps.join(", ")
            ));
        } else {
            p.image.set_corrupt();
        }
    }
}

/// Builds shard `idx` of image `id` on the current reactor and starts serving its
/// inboxes; returns the sender of its mailbox.
pub(super) fn start_shard(id: u64, p: &Parts, idx: usize) -> Result<MailSender<CallPtr>, String> {
    let shard = Rc::new(build_shard(p, idx).map_err(|e| e.to_string())?);
    let inboxes = Inboxes::start(&shard);
    let i2 = inboxes.clone();
    let (mailbox, tx) = poller::mailbox(REMOTE_RING, move |c: CallPtr| i2.push(c));
    if shard.is_leader() && p.image.n > 1 {
        poller::spawn(shard.clone().run_barrier());
    }
    HOSTS.with(|h| h.borrow_mut().insert(id, Host { shard, inboxes, _mailbox: mailbox }));
    Ok(tx)
}

/// Gives shard `idx` (on the current reactor) its routes to every shard.
pub(super) fn connect(id: u64, idx: usize, txs: Vec<MailSender<CallPtr>>) {
    HOSTS.with(|h| {
        let h = h.borrow();
        let Some(host) = h.get(&id) else { return };
        let routes = txs
            .into_iter()
            .enumerate()
            .map(
                |(k, tx)| {
                    if k == idx { Route::Local(host.inboxes.clone()) } else { Route::Remote(tx) }
                },
            )
            .collect();
        let _ = host.shard.peers.set(routes);
    });
}
