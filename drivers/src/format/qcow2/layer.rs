//! The read side of an image and its backing chain.
//!
//! A [`Layer`] is one file of the chain: a qcow2 image (with its L1 table and its own L2
//! cache) or a raw file. [`Qcow2Layer::map`] answers "where does this guest range
//! live?" with a [`Run`]: a range that never crosses an L2 slice, over which every
//! cluster has the same kind — host-contiguous data, zeros, unallocated, or one
//! compressed cluster — so a run is at most one I/O.
//!
//! [`read_chain`] reads a guest range through the chain without recursion: an explicit
//! stack of frames (layer, range) of fixed depth sends unallocated runs down to the
//! next layer, and ranges beyond a (shorter) backing file read as zeros.

use std::cell::RefCell;
use std::sync::Arc;

use crate::error::IoError;
use crate::io::align::Aligned;
use crate::seg::{self, IoSeg, window};

use super::cache::{GetError, MetaCache};
use super::compress::Decompressor;
use super::hints::Publisher;
use super::image::AtomicTable;
use super::types::*;

/// The deepest backing chain accepted.
pub const MAX_CHAIN_DEPTH: usize = 64;
/// Segments a request may carry (virtqueue chains are bounded by seg_max).
pub const MAX_SEGS: usize = 260;

/// What a run of guest clusters is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunKind {
    Data { host: u64, copied: bool },
    Zero { host: Option<u64>, copied: bool },
    Unallocated,
    Compressed { host: u64, max_len: u64 },
}

/// A guest range of one kind; `host` of data runs is the host offset of the run's
/// first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub len: u64,
    pub kind: RunKind,
}

/// One qcow2 file of a chain, on one shard's reactor (its L1 table is shared by the
/// shards; its L2 cache and I/O channel are the shard's own).
pub(crate) struct Qcow2Layer {
    pub name: String,
    pub g: Geometry,
    pub io: Aligned,
    /// The external data file's channel, when guest data lives there (`data_io`).
    pub data: Option<Aligned>,
    /// `data_file_raw`: the data file must read as the image does (zeroing writes
    /// zeros there too).
    pub data_raw: bool,
    /// The LUKS master key's cipher, when the image is encrypted: data goes through a
    /// bounce buffer, encrypted per 512-byte sector with its physical sector as tweak.
    pub crypt: Option<Arc<super::luks::SectorCipher>>,
    pub l1: Arc<AtomicTable>,
    pub l2: MetaCache,
    /// log2 of L2 entries per cache slice.
    pub slice_bits: u32,
    pub decompressor: RefCell<Decompressor>,
    /// The top layer publishes what it maps for the zero-hop path (see `hints`).
    pub hints: Option<Publisher>,
}

/// One file of a backing chain.
#[allow(clippy::large_enum_variant)] // A handful per image, never moved after set-up.
pub(crate) enum Layer {
    Qcow2(Qcow2Layer),
    Raw { io: Aligned, size: u64 },
}

impl Layer {
    pub(crate) fn size(&self) -> u64 {
        match self {
            Layer::Qcow2(q) => q.g.size,
            Layer::Raw { size, .. } => *size,
        }
    }
}

/// A metadata problem found while serving I/O.
pub(crate) fn corrupt(name: &str, what: std::fmt::Arguments<'_>) -> IoError {
    tracing::error!(image = name, "qcow2 image is corrupt: {what}");
    IoError::Corrupt
}

impl Qcow2Layer {
    /// Where guest data clusters are read and written: the external data file, or
    /// the image file itself.
    pub(crate) fn data_io(&self) -> &Aligned {
        self.data.as_ref().unwrap_or(&self.io)
    }

    /// Reads guest data from host offset `host` into `w` (decrypted, if encrypted).
    pub(crate) async fn read_data(&self, host: u64, w: &[IoSeg<'_>]) -> Result<(), IoError> {
        let Some(c) = &self.crypt else { return self.data_io().read(host, w).await };
        let len = seg::total_len(w);
        let mut b = self.bounce(host, len).await?;
        self.data_io().read(host, &[IoSeg::from_dma(&mut b)]).await?;
        c.decrypt(b.as_mut_slice(), host / super::luks::SECTOR as u64);
        // SAFETY: `b` holds `len` bytes, the length of `w`.
        unsafe { seg::copy_into_segs(w, 0, b.as_slice().as_ptr(), len) };
        Ok(())
    }

    /// Writes guest data `w` at host offset `host` (encrypted, if encrypted: `w` is
    /// left as it was).
    pub(crate) async fn write_data(&self, host: u64, w: &[IoSeg<'_>]) -> Result<(), IoError> {
        let Some(c) = &self.crypt else { return self.data_io().write(host, w, false).await };
        let len = seg::total_len(w);
        let mut b = self.bounce(host, len).await?;
        // SAFETY: `b` holds `len` bytes, the length of `w`.
        unsafe { seg::copy_from_segs(w, 0, b.as_mut_slice().as_mut_ptr(), len) };
        c.encrypt(b.as_mut_slice(), host / super::luks::SECTOR as u64);
        self.data_io().write(host, &[IoSeg::from_dma(&mut b)], false).await
    }

    /// A buffer for `len` bytes of encrypted data at `host`: whole sectors only (the
    /// device's alignment is at least a sector for encrypted images).
    async fn bounce(&self, host: u64, len: usize) -> Result<poller::dma::DmaBuf, IoError> {
        let s = super::luks::SECTOR;
        if !host.is_multiple_of(s as u64) || !len.is_multiple_of(s) {
            return Err(IoError::Invalid);
        }
        poller::dma::alloc_wait(len).await.map_err(|_| IoError::TooLarge)
    }

    /// Makes the data durable, then the image file: the data file's writes before any
    /// metadata that points at them (ordering rule 1 across the two files).
    pub(crate) async fn flush_all(&self) -> Result<(), IoError> {
        if let Some(d) = &self.data {
            d.flush().await?;
        }
        self.io.flush().await
    }
    /// The cache key and host offset of the L2 slice holding `guest_off`, or `None`
    /// when its L2 table is unallocated.
    pub(crate) fn slice_of(&self, guest_off: u64) -> Result<Option<(u64, u64)>, IoError> {
        let g = &self.g;
        let l1i = (guest_off >> (g.cluster_bits + g.l2_bits())) as usize;
        let raw = match self.l1.get(l1i) {
            Some(r) => r,
            None => {
                return Err(corrupt(
                    &self.name,
                    format_args!("offset {guest_off} beyond the L1 table"),
                ));
            }
        };
        let (l2_off, _) = decode_l1(raw, g).map_err(|e| {
            corrupt(&self.name, format_args!("L1 entry {l1i} ({raw:#x}) is invalid: {e:?}"))
        })?;
        if l2_off == 0 {
            return Ok(None);
        }
        let key = guest_off >> (g.cluster_bits + self.slice_bits);
        let slices_per_table = 1u64 << (g.l2_bits() - self.slice_bits);
        let slice_bytes = 1u64 << (self.slice_bits + g.l2_entry_bits());
        Ok(Some((key, l2_off + (key % slices_per_table) * slice_bytes)))
    }

    /// Where the L2 slice `key` lives now, if its table is allocated (a table copied
    /// on write moves).
    pub(crate) fn slice_host(&self, key: u64) -> Option<u64> {
        let g = &self.g;
        let slices_per_table = 1u64 << (g.l2_bits() - self.slice_bits);
        let raw = self.l1.get((key / slices_per_table) as usize)?;
        let (l2_off, _) = decode_l1(raw, g).ok()?;
        let slice_bytes = 1u64 << (self.slice_bits + g.l2_entry_bits());
        (l2_off != 0).then_some(l2_off + (key % slices_per_table) * slice_bytes)
    }

    /// Guest bytes one cache slice covers.
    pub(crate) fn slice_coverage(&self) -> u64 {
        1 << (self.g.cluster_bits + self.slice_bits)
    }

    /// Maps `guest_off..guest_off+max` (at least one byte) to its first run.
    /// `Full` means the cache needs a flush (only the writable top layer has dirty
    /// slices; for the others the caller just waits).
    pub(crate) async fn map(&self, guest_off: u64, max: u64) -> Result<Run, GetError> {
        let g = self.g;
        let cs = g.cluster_size();
        let slice_end = (guest_off | (self.slice_coverage() - 1)) + 1;
        let max = max.min(slice_end - guest_off).min(g.size.saturating_sub(guest_off)).max(1);
        let Some((key, host)) = self.slice_of(guest_off)? else {
            return Ok(Run { len: max, kind: RunKind::Unallocated });
        };
        let pin =
            self.l2.get(&self.io, key, || self.slice_host(key).unwrap_or(host), false).await?;
        let mask = (1u64 << self.slice_bits) - 1;
        let first = ((guest_off >> g.cluster_bits) & mask) as usize;
        let in_cluster = g.offset_in_cluster(guest_off);
        let decode = |i: usize| -> Result<L2Entry, IoError> {
            let c = (guest_off >> g.cluster_bits) + (i - first) as u64;
            self.check_entry(c, pin.l2_entry(i, &g))
        };
        let e0 = decode(first)?;
        let kind = match e0 {
            L2Entry::Unallocated => RunKind::Unallocated,
            L2Entry::Zero { host, copied } => RunKind::Zero { host, copied },
            L2Entry::Normal { host, copied } => RunKind::Data { host: host + in_cluster, copied },
            L2Entry::Compressed { host, max_len } => {
                return Ok(Run {
                    len: (cs - in_cluster).min(max),
                    kind: RunKind::Compressed { host, max_len },
                });
            }
            // Subclusters of mixed states: a run of one state, within the cluster.
            L2Entry::Sub { .. } => return Ok(sub_run(&g, e0, guest_off, max)),
        };
        let mut len = cs - in_cluster;
        let mut i = first + 1;
        while len < max && i <= mask as usize {
            let e = decode(i)?;
            let same = match (e0, e) {
                (L2Entry::Unallocated, L2Entry::Unallocated) => true,
                (L2Entry::Zero { copied: a, host: h0 }, L2Entry::Zero { copied: b, host: h1 }) => {
                    a == b && h0.is_some() == h1.is_some()
                }
                (
                    L2Entry::Normal { host: h0, copied: a },
                    L2Entry::Normal { host: h1, copied: b },
                ) => a == b && h1 == h0 + (i - first) as u64 * cs,
                _ => false,
            };
            if !same {
                break;
            }
            len += cs;
            i += 1;
        }
        let len = len.min(max);
        if let (Some(p), RunKind::Data { host, copied }) = (&self.hints, kind) {
            p.data_run(guest_off, host, len, copied);
        }
        // Zero runs keep the first cluster's preallocation only when one cluster long.
        let kind = match kind {
            RunKind::Zero { host, copied } if len > cs - in_cluster => {
                RunKind::Zero { host: host.filter(|_| false), copied }
            }
            k => k,
        };
        Ok(Run { len, kind })
    }

    /// Validates L2 entry `c` as decoded from its raw words.
    fn check_entry(
        &self,
        c: u64,
        (raw, e): ((u64, u64), Result<L2Entry, EntryError>),
    ) -> Result<L2Entry, IoError> {
        let g = self.g;
        let e = e.map_err(|e| {
            corrupt(
                &self.name,
                format_args!("L2 entry for guest cluster {c} ({raw:#x?}) is invalid: {e:?}"),
            )
        })?;
        if self.crypt.is_some() && matches!(e, L2Entry::Compressed { .. }) {
            return Err(corrupt(
                &self.name,
                format_args!("guest cluster {c} is compressed in an encrypted image"),
            ));
        }
        // In an external data file a cluster lives at its guest offset.
        if let Some(host) = e.host_cluster()
            && g.external_data
            && host != c << g.cluster_bits
        {
            return Err(corrupt(
                &self.name,
                format_args!(
                    "L2 entry for guest cluster {c} ({raw:#x?}) is not at its guest offset in the data file"
                ),
            ));
        }
        Ok(e)
    }

    /// Like [`Self::map`], for read-only use: waits out a full cache instead of failing.
    pub(crate) async fn map_ro(&self, guest_off: u64, max: u64) -> Result<Run, IoError> {
        loop {
            match self.map(guest_off, max).await {
                Ok(r) => return Ok(r),
                Err(GetError::Io(e)) => return Err(e),
                Err(GetError::Full) => self.l2.wait_change().await,
            }
        }
    }

    /// Reads and decompresses the compressed cluster at `host` into `out` (one cluster).
    pub(crate) async fn read_compressed(
        &self,
        host: u64,
        max_len: u64,
        out: &mut [u8],
    ) -> Result<(), IoError> {
        let mut buf =
            poller::dma::alloc_wait(max_len as usize).await.map_err(|_| IoError::TooLarge)?;
        self.io.read(host, &[IoSeg::from_dma(&mut buf)]).await?;
        if self.decompressor.borrow_mut().decompress(buf.as_slice(), out) {
            Ok(())
        } else {
            Err(corrupt(
                &self.name,
                format_args!("compressed cluster at host offset {host:#x} does not decompress"),
            ))
        }
    }
}

/// The run from `off` (at most `max` bytes, within its cluster) of a cluster whose
/// subclusters are in mixed states: the subclusters in the first one's state.
fn sub_run(g: &Geometry, e: L2Entry, off: u64, max: u64) -> Run {
    let sb = g.subcluster_bits();
    let in_cluster = g.offset_in_cluster(off);
    let s0 = (in_cluster >> sb) as u32;
    let state = e.sub_state(s0);
    let s1 = e.sub_run_end(s0);
    let len = ((u64::from(s1) << sb) - in_cluster).min(max);
    let kind = match state {
        SubState::Data => RunKind::Data {
            host: e.host_cluster().expect("allocated subclusters have a host") + in_cluster,
            copied: e.copied(),
        },
        SubState::Zero => RunKind::Zero { host: None, copied: false },
        SubState::Unallocated => RunKind::Unallocated,
    };
    Run { len, kind }
}

struct Frame {
    layer: usize,
    pos: u64,
    end: u64,
}

/// Reads guest range `off..off+len` of layer `start` (and below) into `segs`, which
/// hold exactly `len` bytes.
pub(crate) async fn read_chain(
    chain: &[Layer],
    start: usize,
    off: u64,
    segs: &[IoSeg<'_>],
) -> Result<(), IoError> {
    let len = seg::total_len(segs) as u64;
    let mut stack: [Option<Frame>; MAX_CHAIN_DEPTH] = [const { None }; MAX_CHAIN_DEPTH];
    stack[0] = Some(Frame { layer: start, pos: off, end: off + len });
    let mut depth = 1;
    let mut win = super::scratch::SegBuf::take();
    while depth > 0 {
        let f = stack[depth - 1].as_mut().expect("frame");
        if f.pos >= f.end {
            stack[depth - 1] = None;
            depth -= 1;
            continue;
        }
        let (layer_i, pos, end) = (f.layer, f.pos, f.end);
        let out_skip = (pos - off) as usize;
        let layer = &chain[layer_i];
        // Beyond this layer's size: zeros.
        if pos >= layer.size() {
            seg::zero_segs(segs, out_skip, (end - pos) as usize);
            f.pos = end;
            continue;
        }
        match layer {
            Layer::Raw { io, size } => {
                let n = (end.min(*size) - pos) as usize;
                let w = window(segs, out_skip, n, win.arr())?;
                io.read(pos, w).await?;
                f.pos += n as u64;
            }
            Layer::Qcow2(q) => {
                let run = q.map_ro(pos, end - pos).await?;
                let n = run.len;
                f.pos += n;
                match run.kind {
                    RunKind::Data { host, .. } => {
                        let w = window(segs, out_skip, n as usize, win.arr())?;
                        q.read_data(host, w).await?;
                    }
                    RunKind::Zero { .. } => seg::zero_segs(segs, out_skip, n as usize),
                    RunKind::Unallocated => {
                        if layer_i + 1 < chain.len() {
                            if depth == MAX_CHAIN_DEPTH {
                                return Err(IoError::TooLarge);
                            }
                            stack[depth] = Some(Frame { layer: layer_i + 1, pos, end: pos + n });
                            depth += 1;
                        } else {
                            seg::zero_segs(segs, out_skip, n as usize);
                        }
                    }
                    RunKind::Compressed { host, max_len } => {
                        let cs = q.g.cluster_size() as usize;
                        let mut cluster =
                            poller::dma::alloc_wait(cs).await.map_err(|_| IoError::TooLarge)?;
                        q.read_compressed(host, max_len, cluster.as_mut_slice()).await?;
                        let in_cluster = q.g.offset_in_cluster(pos) as usize;
                        // SAFETY: `cluster` holds `cs >= in_cluster + n` bytes.
                        unsafe {
                            seg::copy_into_segs(
                                segs,
                                out_skip,
                                cluster.as_ptr().add(in_cluster),
                                n as usize,
                            )
                        };
                    }
                }
            }
        }
    }
    Ok(())
}

/// The allocation status of `off..off+max` through the chain from layer `start`:
/// (length, data?, zero?). Unallocated everywhere reads as zeros.
/// The status of `off..` through `chain[start..]`: (length, data, zero, depth), depth
/// counted from the top of the whole chain (1) and 0 where no image holds the bytes.
pub(crate) async fn status_chain(
    chain: &[Layer],
    start: usize,
    off: u64,
    max: u64,
) -> Result<(u64, bool, bool, u8), IoError> {
    let mut len = max;
    for (i, layer) in chain.iter().enumerate().skip(start) {
        let depth = (i + 1) as u8;
        if off >= layer.size() {
            return Ok((len, false, true, 0));
        }
        match layer {
            Layer::Raw { size, .. } => return Ok((len.min(size - off), true, false, depth)),
            Layer::Qcow2(q) => {
                let run = q.map_ro(off, len).await?;
                len = run.len;
                match run.kind {
                    RunKind::Data { .. } | RunKind::Compressed { .. } => {
                        return Ok((len, true, false, depth));
                    }
                    RunKind::Zero { .. } => return Ok((len, false, true, depth)),
                    RunKind::Unallocated => continue,
                }
            }
        }
    }
    Ok((len, false, true, 0))
}
