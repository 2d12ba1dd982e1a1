//! The qcow2 format driver.
//!
//! Layout, by concern:
//! - [`types`] and [`header`]: on-disk encodings and header validation;
//! - `open` and [`snapshot`]: opening and validating an image and its backing chain on
//!   the control plane;
//! - `cache`: fixed-capacity metadata caches (L2 slices, refcount-block slices);
//! - `layer`: mapping lookups and reads through the backing chain;
//! - `refcount`: refcounts of every width;
//! - `shard`: the owner reactor's state and the write, zero, discard and flush
//!   algorithms, with the crash-consistency ordering rules;
//! - `remote`: forwarding requests from other reactors to the owner;
//! - [`create`], [`check`] and [`tools`]: the image tools (create, check/repair, info,
//!   map), synchronous, for the command line.
//!
//! The image state is one read-mostly description ([`Qcow2Device`], shared) plus a
//! shard that one reactor owns. Today each image has one shard, on the reactor chosen
//! at open; requests arriving on other reactors are forwarded to it (zero copy).
//! Splitting the guest space over several shards changes where a request goes, not
//! how the shard serves it.

mod cache;
mod compress;
#[doc(hidden)]
pub mod fuzzing;
mod hash;
pub mod header;
mod layer;
pub(crate) mod open;
mod overlap;
mod refcount;
pub(crate) mod route;
mod shard;
pub mod snapshot;
pub mod tools;

pub use tools::{check, create, resize};
pub mod types;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use poller::{MailSender, Mailbox, ReactorHandle};

use crate::driver::{BlockDriver, DeviceInfo, DriverChannel};
use crate::error::{IoError, OpenError};
use crate::io::align::Aligned;
use crate::io::probe::Alignment;

pub use open::OpenOptions;

use self::cache::MetaCache;
use self::compress::Decompressor;
use self::header::Header;
use self::layer::{Layer, Qcow2Layer};
use self::open::{OpenedImage, OpenedLayer, OpenedQcow2};
use self::refcount::Refcounts;
use self::route::{CallPtr, Inbox, Route};

pub use self::route::Qcow2Channel;
use self::shard::Shard;
use self::types::{REFT_RESERVED, decode_l1};

/// Default budget of an image's L2 cache (QEMU's default cliff is far lower: the
/// cache covers 8 GiB of a 64 KiB-cluster image there).
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;
/// Budget of a backing file's L2 cache.
const BACKING_L2_CACHE_BYTES: u64 = 4 << 20;
/// Capacity of an image's forwarding mailbox.
const REMOTE_RING: usize = 1024;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// An open qcow2 image (the shared description).
pub struct Qcow2Device {
    id: u64,
    path: PathBuf,
    header: Header,
    align: Alignment,
    owner: ReactorHandle,
    tx: MailSender<CallPtr>,
    read_only: bool,
    chain_len: usize,
}

impl std::fmt::Debug for Qcow2Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Device").field("path", &self.path).field("owner", &self.owner).finish()
    }
}

/// What an owner reactor keeps per image.
struct Host {
    shard: Rc<Shard>,
    inbox: Rc<Inbox>,
    _mailbox: Mailbox,
}

thread_local! {
    static HOSTS: RefCell<HashMap<u64, Host>> = RefCell::new(HashMap::new());
}

fn slice_bits_for(cluster_bits: u32) -> u32 {
    // Slices of at most 4 KiB (512 entries): small misses, aligned writebacks.
    (cluster_bits.min(12)) - 3
}

/// A qcow2 layer's state: its L1 table (moved in, not copied: a copy would make every
/// page of a large, mostly empty table resident) and an L2 cache of at most
/// `cache_bytes`, smaller when the image needs less.
fn build_layer(q: &mut OpenedQcow2, cache_bytes: u64) -> Result<Qcow2Layer, IoError> {
    let g = q.header.geometry();
    let slice_bits = slice_bits_for(g.cluster_bits);
    let slice_bytes = 8usize << slice_bits;
    let coverage = 1u64 << (g.cluster_bits + slice_bits);
    let needed = g.size.div_ceil(coverage).max(1);
    let capacity = needed.min((cache_bytes / slice_bytes as u64).max(16)).max(16) as usize;
    Ok(Qcow2Layer {
        name: q.path.display().to_string(),
        g,
        io: Aligned::new(q.storage.channel()?),
        l1: RefCell::new(std::mem::take(&mut q.l1)),
        l2: MetaCache::new(slice_bytes, capacity)?,
        slice_bits,
        decompressor: RefCell::new(Decompressor::new(q.header.compression())?),
    })
}

fn build_shard(mut img: OpenedImage, opts: &OpenOptions) -> Result<Shard, IoError> {
    let g = img.top.header.geometry();
    let l2_bytes = opts.l2_cache_bytes.unwrap_or(DEFAULT_L2_CACHE_BYTES);
    let mut chain = vec![Layer::Qcow2(build_layer(&mut img.top, l2_bytes)?)];
    let top = &img.top;
    for b in &mut img.backing {
        chain.push(match b {
            OpenedLayer::Qcow2(q) => Layer::Qcow2(build_layer(q, BACKING_L2_CACHE_BYTES)?),
            OpenedLayer::Raw { storage, .. } => {
                Layer::Raw { io: Aligned::new(storage.channel()?), size: storage.size() }
            }
        });
    }
    let rc_bytes = opts.refcount_cache_bytes.unwrap_or((l2_bytes / 4).max(256 << 10));
    let rc = Refcounts::new(
        g,
        std::mem::take(&mut img.reftable),
        top.header.refcount_table_offset,
        top.header.refcount_table_clusters,
        rc_bytes,
    )?;
    let shard = Shard::new(
        top.path.display().to_string(),
        chain,
        rc,
        opts.read_only,
        top.header.lazy_refcounts(),
        top.header.incompatible,
        top.file_size,
    );
    shard.set_l1_offset(top.header.l1_table_offset);
    mark_metadata(&shard, &img);
    Ok(shard)
}

/// Fills the shard's metadata map (see `overlap`). Metadata structures that overlap
/// one another make the image corrupt: reads go on, writes are refused.
fn mark_metadata(shard: &Shard, img: &OpenedImage) {
    let h = &img.top.header;
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
    if h.l1_size > 0 {
        mark("the L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8, false);
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    mark("the refcount table", h.refcount_table_offset, rt_bytes, false);
    for &e in shard.rc.table.borrow().iter() {
        let b = e & !REFT_RESERVED;
        if b != 0 {
            mark("a refcount block", b, cs, false);
        }
    }
    for &e in shard.top().l1.borrow().iter() {
        if let Ok((l2, _)) = decode_l1(e, &g)
            && l2 != 0
        {
            mark("an L2 table", l2, cs, false);
        }
    }
    let (snap_bytes, snaps) = &img.snapshots;
    if *snap_bytes > 0 {
        mark("the snapshot table", h.snapshots_offset, *snap_bytes, true);
    }
    for s in snaps {
        if s.l1_size > 0 {
            mark("a snapshot's L1 table", s.l1_offset, u64::from(s.l1_size) * 8, true);
        }
    }
    if !overlaps.is_empty() {
        shard.mark_corrupt_at_open(&format!(
            "metadata overlaps other metadata: {}",
            overlaps.join(", ")
        ));
    }
}

impl Qcow2Device {
    /// Opens an image on the control plane and sets up its shard on `owner`.
    pub fn open(
        path: &Path,
        opts: OpenOptions,
        owner: ReactorHandle,
    ) -> Result<Arc<Qcow2Device>, OpenError> {
        if !opts.read_only {
            match &opts.storage {
                Some(s) => check::repair_if_dirty_io(path, &**s)?,
                None => check::repair_if_dirty(path)?,
            }
        }
        let mut img = open::open_image(path, &opts)?;
        if !opts.read_only && img.top.header.autoclear & types::AUTOCLEAR_BITMAPS != 0 {
            // Through a buffered handle: the image's own may be O_DIRECT.
            match &opts.storage {
                Some(s) => check::invalidate_bitmaps(path, &**s, &img.top.header)?,
                None => {
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(path)
                        .map_err(|e| OpenError::io(path, e))?;
                    check::invalidate_bitmaps(path, &f, &img.top.header)?
                }
            };
            img.top.header.autoclear &= !types::AUTOCLEAR_BITMAPS;
        }
        let header = img.top.header.clone();
        let align = img.top.storage.alignment();
        let chain_len = 1 + img.backing.len();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let read_only = opts.read_only;
        let p = path.to_path_buf();
        let tx = owner
            .call(move || -> Result<MailSender<CallPtr>, String> {
                let shard = Rc::new(build_shard(img, &opts).map_err(|e| e.to_string())?);
                let inbox = Inbox::new();
                let i2 = inbox.clone();
                let (mailbox, tx) = poller::mailbox(REMOTE_RING, move |p: CallPtr| i2.push(p));
                poller::spawn(route::dispatch(shard.clone(), inbox.clone()));
                HOSTS.with(|h| h.borrow_mut().insert(id, Host { shard, inbox, _mailbox: mailbox }));
                Ok(tx)
            })
            .map_err(|m| OpenError::invalid(&p, format!("cannot set up the image: {m}")))?;
        Ok(Arc::new(Qcow2Device {
            id,
            path: path.to_path_buf(),
            header,
            align,
            owner,
            tx,
            read_only,
            chain_len,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn alignment(&self) -> Alignment {
        self.align
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn backing_depth(&self) -> usize {
        self.chain_len - 1
    }

    pub fn owner(&self) -> &ReactorHandle {
        &self.owner
    }

    /// The handle for the current reactor: to the shard's inbox on the owner, through
    /// its mailbox elsewhere.
    pub fn channel(self: &Arc<Self>) -> Result<Qcow2Channel, IoError> {
        let local = HOSTS.with(|h| h.borrow().get(&self.id).map(|h| h.inbox.clone()));
        Ok(Qcow2Channel(match local {
            Some(inbox) => Route::Local(inbox),
            None => Route::Remote(self.tx.clone()),
        }))
    }

    /// Cache statistics: (L2 hits, L2 misses, refcount hits, refcount misses,
    /// clusters allocated). Control plane.
    pub fn stats(&self) -> (u64, u64, u64, u64, u64) {
        let id = self.id;
        self.owner.call(move || {
            HOSTS.with(|h| h.borrow().get(&id).map(|h| h.shard.stats()).unwrap_or_default())
        })
    }

    /// Writes everything back, clears the dirty bit, and releases the shard.
    /// Control plane; no request may be in flight.
    pub fn close(&self) -> Result<(), IoError> {
        let id = self.id;
        self.owner.block_on(move || async move {
            let host = HOSTS.with(|h| h.borrow_mut().remove(&id));
            let Some(host) = host else { return Ok(()) };
            host.inbox.close();
            let r = host.shard.close().await;
            drop(host);
            r
        })
    }
}

/// The qcow2 format driver: an open image behind the implementor API.
pub struct Qcow2Driver {
    dev: Arc<Qcow2Device>,
    info: DeviceInfo,
}

impl Qcow2Driver {
    /// Opens an image (see [`Qcow2Device::open`]).
    pub fn open(path: &Path, opts: OpenOptions, owner: ReactorHandle) -> Result<Self, OpenError> {
        let read_only = opts.read_only;
        let dev = Qcow2Device::open(path, opts, owner)?;
        let info = DeviceInfo::new(dev.header().size, dev.alignment(), read_only);
        Ok(Qcow2Driver { dev, info })
    }

    pub fn device(&self) -> &Arc<Qcow2Device> {
        &self.dev
    }
}

impl BlockDriver for Qcow2Driver {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self) -> Result<Box<dyn DriverChannel>, IoError> {
        Ok(Box::new(self.dev.channel()?))
    }

    fn close(&self) -> Result<(), IoError> {
        self.dev.close()
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        let (l2h, l2m, rch, rcm, alloc) = self.dev.stats();
        vec![
            ("qcow2_l2_cache_hits", l2h),
            ("qcow2_l2_cache_misses", l2m),
            ("qcow2_refcount_cache_hits", rch),
            ("qcow2_refcount_cache_misses", rcm),
            ("qcow2_clusters_allocated", alloc),
        ]
    }
}
