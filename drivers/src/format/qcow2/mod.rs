//! The qcow2 format driver.
//!
//! Layout, by concern:
//! - [`types`] and [`header`]: on-disk encodings and header validation;
//! - `open` and [`snapshot`]: opening and validating an image and its backing chain on
//!   the control plane; `build`: turning it into shards on their reactors;
//! - `image`: what the shards share (the L1 and refcount tables as atomics, the
//!   ownership of guest and host space, the image-wide bits);
//! - `cache`: fixed-capacity metadata caches (L2 slices, refcount-block slices);
//! - `layer`: mapping lookups and reads through the backing chain;
//! - `online`: internal snapshots created and deleted while the image is served;
//! - `refcount`: refcounts of every width;
//! - `shard`: one shard's state and the read, write, zero, discard and flush
//!   algorithms, with the crash-consistency ordering rules; the leader's operations;
//!   the barrier;
//! - `route`: channels and shards sending calls to the owning shard (zero copy);
//! - [`create`], [`check`] and [`tools`]: the image tools (create, check/repair, info,
//!   map), synchronous, for the command line.
//!
//! An open image is one shared description ([`Qcow2Device`] and `image::Image`) plus
//! one shard per serving reactor, each owning an interleaved part of the guest space
//! (by L2 table) and of the host space (by refcount block). Reads and in-place writes
//! of allocated clusters go straight to storage from any reactor through the owners'
//! published mapping hints (`hints`, `direct`); everything else runs on the shard
//! owning it, one hop there and back from another reactor.

pub mod bitmaps;
mod build;
mod cache;
mod compress;
mod direct;
#[doc(hidden)]
pub mod fuzzing;
mod hash;
pub mod header;
pub(crate) mod hints;
mod image;
mod layer;
pub mod luks;
mod luks_format;
mod online;
pub(crate) mod open;
mod overlap;
mod refcount;
pub(crate) mod route;
mod scratch;
mod shard;
pub mod snapshot;
pub mod tools;

pub use tools::{check, create, resize, snapshots};
pub mod types;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use poller::{MailSender, Mailbox, ReactorHandle};

use crate::driver::{BlockDriver, ChainLink, DeviceInfo, DriverChannel, StoredBitmap};
use crate::error::{IoError, OpenError};
use crate::io::probe::Alignment;

pub use open::OpenOptions;

use self::direct::Direct;
use self::header::Header;
use self::image::Image;
use self::route::{CallPtr, Inboxes, Route};

pub use self::route::{MAX_SHARDS, Qcow2Channel};
use self::shard::Shard;

/// Default budget of an image's L2 cache, over all its shards (QEMU's default cliff is
/// far lower: the cache covers 8 GiB of a 64 KiB-cluster image there).
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;
/// Capacity of a shard's mailbox.
const REMOTE_RING: usize = 1024;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One shard of an open image, as the control plane sees it.
struct ShardRef {
    reactor: ReactorHandle,
    tx: MailSender<CallPtr>,
}

/// An open qcow2 image (the shared description).
pub struct Qcow2Device {
    id: u64,
    path: PathBuf,
    header: Header,
    align: Alignment,
    img: Arc<Image>,
    shards: Vec<ShardRef>,
    read_only: bool,
    /// The image files, this one first; shortened when the image drops its backing.
    chain: std::sync::Mutex<Vec<ChainLink>>,
    /// The top file.
    top: Arc<crate::io::Storage>,
    /// Where the top file's data lives (it, or its data file), for channels' zero-hop
    /// path (`None`: always hop).
    direct: Option<Arc<crate::io::Storage>>,
    /// The persistent bitmaps loaded at open.
    stored: Vec<StoredBitmap>,
    /// The storage metadata tools go through when it is not the file (tests).
    meta: Option<Arc<crate::io::Storage>>,
    /// How the image was opened (to reopen it in place).
    opts: OpenOptions,
}

/// A buffered handle on the image for control-plane metadata work (the image's own
/// handle may be O_DIRECT, with aligned buffers).
fn meta_file(path: &Path, read_only: bool) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).write(!read_only).open(path)
}

impl std::fmt::Debug for Qcow2Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Device")
            .field("path", &self.path)
            .field("shards", &self.shards.len())
            .finish()
    }
}

/// What a reactor keeps per image it holds a shard of.
struct Host {
    shard: Rc<Shard>,
    inboxes: Rc<Inboxes>,
    _mailbox: Mailbox,
}

thread_local! {
    static HOSTS: RefCell<HashMap<u64, Host>> = RefCell::new(HashMap::new());
}

fn local_shard(id: u64) -> Option<Rc<Shard>> {
    HOSTS.with(|h| h.borrow().get(&id).map(|h| h.shard.clone()))
}

impl Qcow2Device {
    /// Opens an image on the control plane with one shard on each of `reactors` (the
    /// first leads; at most [`MAX_SHARDS`]).
    pub fn open(
        path: &Path,
        opts: OpenOptions,
        reactors: &[ReactorHandle],
    ) -> Result<Arc<Qcow2Device>, OpenError> {
        if reactors.is_empty() || reactors.len() > MAX_SHARDS {
            return Err(OpenError::invalid(
                path,
                format!("an image has 1 to {MAX_SHARDS} shards, not {}", reactors.len()),
            ));
        }
        if !opts.read_only {
            match &opts.storage {
                Some(s) => check::repair_if_dirty_io(path, &**s)?,
                None => check::repair_if_dirty(path)?,
            }
        }
        let mut img = open::open_image(path, &opts)?;
        let stored = match &opts.storage {
            Some(s) => bitmaps::load_all(&**s, path, &mut img.top.header, opts.read_only)?,
            None if img.top.header.autoclear & types::AUTOCLEAR_BITMAPS != 0 => {
                // Through a buffered handle: the image's own may be O_DIRECT.
                let f = meta_file(path, opts.read_only).map_err(|e| OpenError::io(path, e))?;
                bitmaps::load_all(&f, path, &mut img.top.header, opts.read_only)?
            }
            None => Vec::new(),
        };
        let header = img.top.header.clone();
        // Guest data goes to the data file when there is one: both alignments hold.
        let align = match &img.top.data {
            Some(d) => {
                let (a, b) = (img.top.storage.alignment(), d.alignment());
                Alignment { mem: a.mem.max(b.mem), request: a.request.max(b.request) }
            }
            None => img.top.storage.alignment(),
        };
        // Encrypted data, in this image or below it, is whole sectors.
        let encrypted = img.top.crypt.is_some()
            || img
                .backing
                .iter()
                .any(|b| matches!(b, open::OpenedLayer::Qcow2(q) if q.crypt.is_some()));
        let align = match encrypted {
            true => Alignment { request: align.request.max(luks::SECTOR), ..align },
            false => align,
        };
        let chain = chain_of(&img);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let read_only = opts.read_only;
        let parts = Arc::new(build::Parts::new(img, &opts, reactors.len()));
        let top = parts.top_storage();
        let direct = (opts.zero_hop && !parts.top_encrypted()).then(|| parts.top_data_storage());
        let mut shards = Vec::with_capacity(reactors.len());
        for (k, r) in reactors.iter().enumerate() {
            let p = parts.clone();
            let tx = r
                .call(move || build::start_shard(id, &p, k))
                .map_err(|m| OpenError::invalid(path, format!("cannot set up the image: {m}")));
            match tx {
                Ok(tx) => shards.push(ShardRef { reactor: r.clone(), tx }),
                Err(e) => {
                    release(id, &shards);
                    return Err(e);
                }
            }
        }
        // Every shard learns the way to every other.
        for (k, s) in shards.iter().enumerate() {
            let txs: Vec<MailSender<CallPtr>> = shards.iter().map(|s| s.tx.clone()).collect();
            s.reactor.call(move || build::connect(id, k, txs));
        }
        let img = parts.image.clone();
        Ok(Arc::new(Qcow2Device {
            id,
            path: path.to_path_buf(),
            header,
            align,
            img,
            shards,
            read_only,
            chain: std::sync::Mutex::new(chain),
            top,
            direct,
            stored,
            meta: opts.storage.clone(),
            opts,
        }))
    }

    /// The bitmaps the image stored, as loaded at open.
    pub fn stored_bitmaps(&self) -> Vec<StoredBitmap> {
        self.stored.clone()
    }

    /// Closes (see [`Qcow2Device::close`]), then stores `list` as the image's
    /// persistent bitmaps (see `bitmaps::store`). A read-only image stores nothing.
    pub fn close_storing(&self, list: &[StoredBitmap]) -> Result<(), IoError> {
        self.close()?;
        if self.read_only {
            return Ok(());
        }
        let to: Vec<bitmaps::ToStore<'_>> = list
            .iter()
            .map(|b| bitmaps::ToStore {
                name: &b.name,
                map: &b.map,
                auto: b.auto,
                inconsistent: b.inconsistent,
            })
            .collect();
        let r = match &self.meta {
            Some(s) => bitmaps::store(&**s, &self.path, &to),
            None => meta_file(&self.path, false)
                .map_err(|e| OpenError::io(&self.path, e))
                .and_then(|f| bitmaps::store(&f, &self.path, &to)),
        };
        r.map_err(|e| {
            tracing::error!(image = %self.path.display(), "storing the persistent bitmaps failed: {e}");
            IoError::Os(libc::EIO)
        })?;
        if !list.is_empty() {
            tracing::info!(image = %self.path.display(), bitmaps = list.len(), "persistent bitmaps stored");
        }
        Ok(())
    }

    /// The image files, this one first.
    pub fn chain(&self) -> Vec<ChainLink> {
        self.chain.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// See [`BlockDriver::drop_backing`]. The header change is one write of the header
    /// area (as QEMU's header updates are), after a flush that makes every copied
    /// cluster and its metadata durable, and is synced before any shard stops reading
    /// the chain.
    pub fn drop_backing(&self) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        let id = self.id;
        self.owner().block_on(move || async move {
            match local_shard(id) {
                Some(sh) => sh.barrier().await,
                None => Err(IoError::Shutdown),
            }
        })?;
        let eio = |e: std::io::Error| IoError::Os(e.raw_os_error().unwrap_or(libc::EIO));
        // Through a buffered handle: the image's own is O_DIRECT, with aligned buffers.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&self.path).map_err(eio)?;
        let cs = self.header.cluster_size() as usize;
        let first = open::read_at(&f, 0, cs).map_err(eio)?;
        let mut h = header::Header::parse(&first, self.top.size()).map_err(|e| {
            layer::corrupt(&self.path.display().to_string(), format_args!("header: {}", e.0))
        })?;
        h.backing_file = None;
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
        h.extensions.retain(|e| e.kind != types::EXT_BACKING_FORMAT);
        let mut new = vec![0u8; cs];
        h.write_to(&mut new).map_err(|_| IoError::Invalid)?;
        // The header area only (the rest of the first cluster is the old name's bytes,
        // unreferenced now): one aligned write.
        let a = self.align.request.max(512);
        let end = (header_area_end(&first).max(header_area_end(&new)) as usize).div_ceil(a) * a;
        open::MetaIo::meta_write(&f, &new[..end.min(cs)], 0).map_err(eio)?;
        f.sync_all().map_err(eio)?;
        for s in &self.shards {
            s.reactor.call(move || {
                if let Some(sh) = local_shard(id) {
                    sh.drop_backing();
                }
            });
        }
        self.chain.lock().unwrap_or_else(|p| p.into_inner()).truncate(1);
        tracing::info!(image = %self.path.display(), "the image no longer has a backing file");
        Ok(())
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
        self.chain.lock().unwrap_or_else(|p| p.into_inner()).len() - 1
    }

    /// The leader's reactor.
    pub fn owner(&self) -> &ReactorHandle {
        &self.shards[0].reactor
    }

    /// Shards serving the image.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The handle for the current reactor: to the local shard's inboxes, to the others
    /// through their mailboxes.
    pub fn channel(self: &Arc<Self>) -> Result<Qcow2Channel, IoError> {
        let local =
            HOSTS.with(|h| h.borrow().get(&self.id).map(|h| (h.shard.idx, h.inboxes.clone())));
        let routes = self
            .shards
            .iter()
            .enumerate()
            .map(|(k, s)| match &local {
                Some((idx, inboxes)) if *idx == k => Route::Local(inboxes.clone()),
                _ => Route::Remote(s.tx.clone()),
            })
            .collect();
        let direct = self.direct.as_ref().and_then(|s| Direct::new(&self.img, s, !self.read_only));
        Ok(Qcow2Channel { routes, img: self.img.clone(), direct })
    }

    /// Cache statistics summed over the shards: (L2 hits, L2 misses, refcount hits,
    /// refcount misses, clusters allocated). Control plane.
    pub fn stats(&self) -> (u64, u64, u64, u64, u64) {
        let mut t = (0, 0, 0, 0, 0);
        for s in &self.shards {
            let id = self.id;
            let (a, b, c, d, e) =
                s.reactor.call(move || local_shard(id).map(|s| s.stats()).unwrap_or_default());
            t = (t.0 + a, t.1 + b, t.2 + c, t.3 + d, t.4 + e);
        }
        t
    }

    /// Requests channels served without a hop to the owning shard (see `hints`).
    pub fn zero_hop_ios(&self) -> u64 {
        self.img.lease.served_total()
    }

    /// Writes everything back on every shard, clears the dirty bit, and releases the
    /// shards. Control plane; no request may be in flight.
    pub fn close(&self) -> Result<(), IoError> {
        self.img.closed.store(true, Ordering::Release);
        let r = self.close_shards();
        release(self.id, &self.shards);
        r
    }

    fn close_shards(&self) -> Result<(), IoError> {
        let id = self.id;
        if !self.shards.iter().all(|s| s.reactor.call(move || local_shard(id).is_some())) {
            return Ok(()); // Closed before.
        }
        // Rounds on every shard until all are clean at once: a round may send frees
        // to shards whose round already ran.
        let mut clean = false;
        for _ in 0..shard::CLOSE_ROUNDS + self.shards.len() {
            for s in &self.shards {
                s.reactor.block_on(move || async move {
                    match local_shard(id) {
                        Some(sh) => sh.close_round().await,
                        None => Ok(()),
                    }
                })?;
            }
            clean = self
                .shards
                .iter()
                .all(|s| s.reactor.call(move || local_shard(id).is_none_or(|sh| sh.is_clean())));
            if clean {
                break;
            }
        }
        if !clean {
            tracing::warn!(image = %self.path.display(), "metadata still dirty after the shutdown rounds; the image is left marked dirty");
            return Ok(());
        }
        self.shards[0].reactor.block_on(move || async move {
            match local_shard(id) {
                Some(sh) => sh.finish_close().await,
                None => Ok(()),
            }
        })
    }
}

/// Stops and drops the shards of image `id` (their queued calls finish first).
fn release(id: u64, shards: &[ShardRef]) {
    for s in shards {
        s.reactor.block_on(move || async move {
            let host = HOSTS.with(|h| h.borrow_mut().remove(&id));
            let Some(host) = host else { return };
            host.inboxes.close();
            host.shard.stop_barrier();
            drop(host);
        });
    }
}

/// The qcow2 format driver: an open image behind the implementor API.
pub struct Qcow2Driver {
    dev: Arc<Qcow2Device>,
    info: DeviceInfo,
}

impl Qcow2Driver {
    /// Opens an image with a shard on each of `reactors` (see [`Qcow2Device::open`]).
    pub fn open(
        path: &Path,
        opts: OpenOptions,
        reactors: &[ReactorHandle],
    ) -> Result<Self, OpenError> {
        let read_only = opts.read_only;
        let dev = Qcow2Device::open(path, opts, reactors)?;
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

    fn stored_bitmaps(&self) -> Vec<StoredBitmap> {
        self.dev.stored_bitmaps()
    }

    fn bitmap_store_refusal(&self) -> Option<String> {
        if self.dev.read_only {
            Some("the disk is read-only".into())
        } else if self.dev.header.version < 3 {
            Some("compat=0.10 (version 2) images cannot store bitmaps".into())
        } else {
            None
        }
    }

    fn close_storing(&self, bitmaps: &[StoredBitmap]) -> Result<(), IoError> {
        self.dev.close_storing(bitmaps)
    }

    fn chain(&self) -> Vec<ChainLink> {
        self.dev.chain()
    }

    fn drop_backing(&self) -> Result<(), IoError> {
        self.dev.drop_backing()
    }

    fn lock_images(&self) -> Result<(), OpenError> {
        self.dev.top.lock_image()
    }

    fn compresses(&self) -> bool {
        !self.dev.read_only
    }

    fn internal_snapshots(&self) -> Option<&dyn crate::driver::InternalSnapshots> {
        Some(self)
    }

    fn resizable(&self) -> Option<&dyn crate::driver::Resizable> {
        Some(self)
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        let (l2h, l2m, rch, rcm, alloc) = self.dev.stats();
        vec![
            ("qcow2_l2_cache_hits", l2h),
            ("qcow2_l2_cache_misses", l2m),
            ("qcow2_refcount_cache_hits", rch),
            ("qcow2_refcount_cache_misses", rcm),
            ("qcow2_clusters_allocated", alloc),
            ("qcow2_zero_hop_ios", self.dev.zero_hop_ios()),
        ]
    }
}

/// The files of an opened image's chain, its own first.
fn chain_of(img: &open::OpenedImage) -> Vec<ChainLink> {
    let mut v = vec![ChainLink { path: img.top.path.clone(), format: "qcow2" }];
    for b in &img.backing {
        v.push(match b {
            open::OpenedLayer::Qcow2(q) => ChainLink { path: q.path.clone(), format: "qcow2" },
            open::OpenedLayer::Raw { storage } => ChainLink {
                path: storage.path().map(Path::to_path_buf).unwrap_or_default(),
                format: "raw",
            },
        });
    }
    v
}

/// Where a serialised header's used bytes end: past its extensions and backing name.
pub(crate) fn header_area_end(cluster: &[u8]) -> u64 {
    let name_off = u64::from_be_bytes(cluster[8..16].try_into().unwrap_or_default());
    let name_len = u64::from(u32::from_be_bytes(cluster[16..20].try_into().unwrap_or_default()));
    if name_off != 0 {
        return name_off + name_len;
    }
    // No name: the end of the extensions (each is 8 bytes of header and padded data).
    let version = u32::from_be_bytes(cluster[4..8].try_into().unwrap_or_default());
    let mut off = if version >= 3 {
        u64::from(u32::from_be_bytes(cluster[100..104].try_into().unwrap_or_default()))
    } else {
        72
    };
    while (off as usize) + 8 <= cluster.len() {
        let kind = u32::from_be_bytes(
            cluster[off as usize..off as usize + 4].try_into().unwrap_or_default(),
        );
        let len = u64::from(u32::from_be_bytes(
            cluster[off as usize + 4..off as usize + 8].try_into().unwrap_or_default(),
        ));
        off += 8 + len.div_ceil(8) * 8;
        if kind == 0 {
            break;
        }
    }
    off.min(cluster.len() as u64)
}
