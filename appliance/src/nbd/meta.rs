//! Metadata contexts (doc/proto.md, "Metadata querying"; QEMU's docs/interop/nbd.txt):
//! which a client may list and select for an export, and how `NBD_CMD_BLOCK_STATUS`
//! answers each.
//!
//! An export offers `base:allocation` (holes and zeros), `qemu:allocation-depth`
//! (0 unallocated, 1 the disk's own image, 2 and on its backing chain) and one
//! `qemu:dirty-bitmap:NAME` per named bitmap of the disk (bit 0 set where the bitmap is
//! dirty). `NBD_OPT_LIST_META_CONTEXT` also takes namespace queries (`base:`, `qemu:`,
//! `qemu:dirty-bitmap:`) and no query at all (everything); `NBD_OPT_SET_META_CONTEXT`
//! selects exact names only, and the contexts' ids are their positions plus one.
//!
//! A block-status reply is one chunk per selected context, in id order, the last
//! flagged done, all encoded in one DMA buffer sized at negotiation (no allocation per
//! request beyond that buffer from the pool).

use std::sync::Arc;

use drivers::api::bitmap::DirtyBitmap;
use drivers::api::bitmaps::MAX_BITMAPS;
use drivers::{Bdev, BdevChannel, IoError};
use poller::DmaBuf;

use super::proto::{self, ReplyMode};

pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
pub const DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";
/// Contexts a connection may select: the two fixed ones and every bitmap.
pub const MAX_CONTEXTS: usize = 2 + MAX_BITMAPS;
/// Extents per context in one reply.
pub const MAX_EXTENTS: usize = 128;
/// Bytes one context's chunk takes at most: an extended chunk header, the context id,
/// the descriptor count and the descriptors.
pub const CHUNK_BYTES: usize = 32 + 8 + MAX_EXTENTS * 16;

/// One metadata context of an export.
#[derive(Clone)]
pub enum Context {
    Base,
    Depth,
    /// A named bitmap of the disk (the name without the namespace).
    Dirty(String, Arc<DirtyBitmap>),
}

impl Context {
    pub fn name(&self) -> String {
        match self {
            Context::Base => proto::BASE_ALLOCATION.to_string(),
            Context::Depth => ALLOCATION_DEPTH.to_string(),
            Context::Dirty(n, _) => format!("{DIRTY_BITMAP}{n}"),
        }
    }
}

/// Every context `bdev` offers now.
fn offered(bdev: &Bdev) -> Vec<Context> {
    let mut v = vec![Context::Base, Context::Depth];
    // An inconsistent bitmap's bits are not trusted: it is not offered.
    let usable = bdev.bitmaps().all().into_iter().filter(|b| !b.inconsistent);
    v.extend(usable.map(|b| Context::Dirty(b.name, b.map)));
    v
}

/// Whether `query` names `c`: exactly, or (listing only) by its namespace.
fn matches(c: &Context, query: &str, list: bool) -> bool {
    if query == c.name() {
        return true;
    }
    list && match c {
        Context::Base => query == "base:",
        Context::Depth => query == "qemu:",
        Context::Dirty(..) => query == "qemu:" || query == DIRTY_BITMAP,
    }
}

/// The contexts of `bdev` that `queries` select, in the order offered; listing with no
/// query selects them all.
pub fn select(bdev: &Bdev, queries: &[&str], list: bool) -> Vec<Context> {
    let mut v: Vec<Context> = offered(bdev)
        .into_iter()
        .filter(|c| (list && queries.is_empty()) || queries.iter().any(|q| matches(c, q, list)))
        .collect();
    v.truncate(MAX_CONTEXTS);
    v
}

/// The buffer a block-status reply needs for `n` contexts.
pub fn reply_bytes(n: usize) -> usize {
    n.max(1) * CHUNK_BYTES
}

/// Encodes the block-status reply to a request of `off..off+len` (`one`: at most one
/// extent per context) into `buf`: one chunk per context, the last one done.
pub async fn block_status(
    ch: &BdevChannel,
    contexts: &[Context],
    mode: ReplyMode,
    cookie: u64,
    (off, len, one): (u64, u64, bool),
    buf: &mut DmaBuf,
) -> Result<(), IoError> {
    let ext = mode == ReplyMode::Extended;
    let hdr = if ext { 32 } else { 20 };
    buf.set_len(buf.capacity());
    assert!(buf.len() >= reply_bytes(contexts.len()), "block-status buffer too small");
    let mut at = 0;
    for (i, c) in contexts.iter().enumerate() {
        let mut e = Extents::new(ext, one);
        let body = &mut buf.as_mut_slice()[at + hdr..at + CHUNK_BYTES];
        fill(ch, c, off, off + len, &mut e, body).await?;
        let plen = e.finish(body, i as u32 + 1);
        let done = if i + 1 == contexts.len() { proto::REPLY_FLAG_DONE } else { 0 };
        let kind =
            if ext { proto::REPLY_TYPE_BLOCK_STATUS_EXT } else { proto::REPLY_TYPE_BLOCK_STATUS };
        let b = buf.as_mut_slice();
        let n = proto::encode_chunk(&mut b[at..], mode, done, kind, cookie, off, plen as u64);
        debug_assert_eq!(n, hdr);
        at += hdr + plen;
    }
    buf.set_len(at);
    Ok(())
}

/// Adds the extents of `c` over `off..end` until `end` or the extents are full.
async fn fill(
    ch: &BdevChannel,
    c: &Context,
    mut off: u64,
    end: u64,
    e: &mut Extents,
    body: &mut [u8],
) -> Result<(), IoError> {
    while off < end && !e.full() {
        let (len, flags) = match c {
            Context::Base | Context::Depth => {
                let st = ch.block_status(off, end - off).await?;
                let flags = match c {
                    Context::Base => {
                        (if st.hole { proto::STATE_HOLE } else { 0 })
                            | (if st.zero { proto::STATE_ZERO } else { 0 })
                    }
                    _ => u32::from(st.depth),
                };
                (st.len, flags)
            }
            Context::Dirty(_, map) => {
                let (dirty, len) = map.extent(off, end - off);
                (len, u32::from(dirty))
            }
        };
        let len = len.clamp(1, end - off);
        e.add(body, len, flags);
        off += len;
    }
    Ok(())
}

/// The descriptors of one chunk: runs of equal flags merged, at most `limit`.
struct Extents {
    ext: bool,
    limit: usize,
    count: usize,
    pending: Option<(u64, u32)>,
}

impl Extents {
    fn new(ext: bool, one: bool) -> Self {
        Extents { ext, limit: if one { 1 } else { MAX_EXTENTS }, count: 0, pending: None }
    }

    /// Bytes before the descriptors: the context id, and the count when extended.
    fn head(&self) -> usize {
        if self.ext { 8 } else { 4 }
    }

    fn full(&self) -> bool {
        self.count == self.limit
    }

    fn emit(&mut self, b: &mut [u8], len: u64, flags: u32) {
        let p = self.head() + self.count * if self.ext { 16 } else { 8 };
        if self.ext {
            b[p..p + 8].copy_from_slice(&len.to_be_bytes());
            b[p + 8..p + 16].copy_from_slice(&u64::from(flags).to_be_bytes());
        } else {
            // Requests are at most 4 GiB - 1 without extended headers.
            b[p..p + 4].copy_from_slice(&(len as u32).to_be_bytes());
            b[p + 4..p + 8].copy_from_slice(&flags.to_be_bytes());
        }
        self.count += 1;
    }

    fn add(&mut self, b: &mut [u8], len: u64, flags: u32) {
        self.pending = match self.pending {
            Some((l, f)) if f == flags => Some((l + len, f)),
            Some((l, f)) => {
                self.emit(b, l, f);
                if self.full() { None } else { Some((len, flags)) }
            }
            None => Some((len, flags)),
        };
    }

    /// Writes the head; returns the payload's length.
    fn finish(mut self, b: &mut [u8], id: u32) -> usize {
        if let Some((l, f)) = self.pending.take()
            && !self.full()
        {
            self.emit(b, l, f);
        }
        b[0..4].copy_from_slice(&id.to_be_bytes());
        if self.ext {
            b[4..8].copy_from_slice(&(self.count as u32).to_be_bytes());
        }
        self.head() + self.count * if self.ext { 16 } else { 8 }
    }
}
