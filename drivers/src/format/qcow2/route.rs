//! Routing requests to the shard that owns them, and running them there.
//!
//! A channel sends each request to the shard owning its first byte (see `image`); a
//! flush goes to the leader, which runs the barrier over all shards. A shard that gets
//! a request reaching into another shard's range serves its own part and sends each
//! other part, as a *piece*, to its owner, joining the results (a piece never spans
//! owners, so it is never split again). Shards also send each other *control* calls:
//! frees into another's allocation group, and the leader's operations (refcount blocks,
//! refcount table growth, the dirty and corrupt bits, a shard's half of the barrier).
//! Each class has its own inbox and task pool on the receiving shard, so a call never
//! waits for a pool slot held by a call that waits for it: data calls wait for pieces
//! and control calls, pieces for control calls, control calls for no other call but
//! frees, which wait for nothing remote.
//!
//! Every request, local or not, is a forwarded call (`crate::route`: the call lives in
//! the caller's future, only a pointer crosses reactors, the data is never copied); a
//! shard's dispatcher runs it in a task from a fixed pool, so the request state, which
//! is large, lives there and not in the caller's future.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use crate::driver::{BlockStatus, DriverChannel, IoFuture, ZeroFlags};
use crate::error::IoError;
use crate::route::{self, Inbox};
use crate::seg::IoSeg;

use super::direct::Direct;
use super::image::Image;
use super::shard::Shard;

pub(crate) use crate::route::encode_status;

/// Calls from channels running at once per shard.
pub(crate) const CALL_POOL: u32 = 512;
/// Pieces and control calls from other shards running at once per shard.
const PIECE_POOL: u32 = 256;
const CONTROL_POOL: u32 = 256;
/// The most shards an image may have.
pub const MAX_SHARDS: usize = 64;

/// The operation of a call. For control calls, `off` carries the argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write {
        fua: bool,
    },
    /// A write only where the image holds nothing yet (see `Shard::populate`).
    Populate,
    /// A write compressing the whole clusters it can (see `Shard::write_compressed`).
    WriteCompressed,
    Flush,
    Zero {
        len: u64,
        unmap: bool,
        fast: bool,
    },
    Discard {
        len: u64,
    },
    Status {
        len: u64,
    },
    /// Control: release a cluster of the receiver's group (`off`), durable elsewhere.
    Free {
        punch: bool,
    },
    /// Control, leader: a refcount block for table entry `off`.
    CreateRefblock,
    /// Control, leader: a refcount table of at least `off` entries.
    GrowReftable,
    /// Control, leader: the dirty bit on (`off` = 1) or off.
    DirtyBit,
    /// Control, leader: the corrupt bit.
    MarkCorrupt,
    /// Control: the receiver's flush round, for the leader's barrier.
    LocalFlush,
}

impl Op {
    /// The same operation over `len` bytes (a piece of it).
    pub(crate) fn with_len(self, len: u64) -> Op {
        match self {
            Op::Zero { unmap, fast, .. } => Op::Zero { len, unmap, fast },
            Op::Discard { .. } => Op::Discard { len },
            Op::Status { .. } => Op::Status { len },
            op => op,
        }
    }
}

/// Who sent a call, which decides the inbox and pool that run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// From a channel.
    Data,
    /// Part of a request, from the shard that split it.
    Piece,
    /// From another shard (or the leader's barrier).
    Control,
}

/// A shard's inboxes, one per class of call.
pub(crate) struct Inboxes {
    data: Rc<Inbox<Msg>>,
    piece: Rc<Inbox<Msg>>,
    control: Rc<Inbox<Msg>>,
}

impl route::Sink<Msg> for Inboxes {
    fn push(&self, p: CallPtr) {
        Inboxes::push(self, p)
    }
}

impl Inboxes {
    /// The inboxes, with a dispatcher task for each on the current reactor.
    pub(crate) fn start(shard: &Rc<Shard>) -> Rc<Inboxes> {
        let b = Rc::new(Inboxes { data: Inbox::new(), piece: Inbox::new(), control: Inbox::new() });
        for (inbox, cap) in
            [(&b.data, CALL_POOL), (&b.piece, PIECE_POOL), (&b.control, CONTROL_POOL)]
        {
            let sh = shard.clone();
            poller::spawn(route::dispatch(inbox.clone(), cap, move |p| execute(sh.clone(), p)));
        }
        b
    }

    pub(crate) fn push(&self, p: CallPtr) {
        // SAFETY: see `CallPtr`; the class was written before the pointer was sent.
        let (class, _) = unsafe { &*p.0 }.op;
        match class {
            Class::Data => self.data.push(p),
            Class::Piece => self.piece.push(p),
            Class::Control => self.control.push(p),
        }
    }

    pub(crate) fn close(&self) {
        self.data.close();
        self.piece.close();
        self.control.close();
    }
}

async fn execute(shard: Rc<Shard>, p: CallPtr) {
    // SAFETY: see `CallPtr`: valid until we complete it.
    let call = unsafe { &*p.0 };
    // SAFETY: as above.
    let segs = unsafe { call.segs() };
    let (class, op) = call.op;
    let (r, status) = match class {
        Class::Control => (shard.control(op, call.off, true).await, 0),
        Class::Data | Class::Piece => shard.serve(op, call.off, segs).await,
    };
    call.complete(r, status);
}

/// A call to a shard: who sent it (which inbox takes it) and what it asks.
pub(crate) type Msg = (Class, Op);
pub(crate) type CallPtr = route::CallPtr<Msg>;
/// Where calls to one shard go.
pub(crate) type Route = route::Route<Msg, Inboxes>;
/// A call on its way to its shard.
pub(crate) type Forward<'a> = route::Forward<'a, Msg, Inboxes>;

/// Runs `op` as a control call on every shard but `me`, alongside `local`; the first
/// error of any. No allocation: the calls live in an array in this future.
pub(crate) async fn broadcast(
    peers: &[Route],
    me: usize,
    op: Op,
    local: impl Future<Output = Result<(), IoError>>,
) -> Result<(), IoError> {
    let mut calls: [Option<Forward<'_>>; MAX_SHARDS] = std::array::from_fn(|_| None);
    for (k, r) in peers.iter().enumerate() {
        if k != me {
            calls[k] = Some(Forward::new(r, (Class::Control, op), 0, &[]));
        }
    }
    let mut calls = std::pin::pin!(calls);
    let mut local = std::pin::pin!(local);
    let mut local_result = None;
    let mut first_err = None;
    std::future::poll_fn(|cx| {
        if local_result.is_none()
            && let Poll::Ready(r) = local.as_mut().poll(cx)
        {
            local_result = Some(r);
        }
        let mut pending = local_result.is_none();
        // SAFETY: the array is pinned and its elements are never moved: each is polled
        // and dropped in place.
        let arr = unsafe { calls.as_mut().get_unchecked_mut() };
        for slot in arr.iter_mut() {
            if let Some(f) = slot {
                // SAFETY: as above: `f` lives in the pinned array.
                match unsafe { Pin::new_unchecked(f) }.poll(cx) {
                    Poll::Ready((r, _)) => {
                        if let Err(e) = r {
                            first_err.get_or_insert(e);
                        }
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    match (local_result, first_err) {
        (Some(Err(e)), _) | (_, Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// An image's handle on one reactor: every request is a call routed to the shard that
/// owns its first byte. Requests of no bytes complete here, before the shard (the
/// consumer API filters them too; this keeps the qcow2 engine's own callers, the crash
/// and fuzz harnesses, inside the same contract).
pub struct Qcow2Channel {
    pub(crate) routes: Vec<Route>,
    pub(crate) img: Arc<Image>,
    /// Reads and in-place writes with no hop, when the hints allow.
    pub(crate) direct: Option<Direct>,
}

impl Qcow2Channel {
    async fn call(&self, op: Op, off: u64, segs: &[IoSeg<'_>]) -> (Result<(), IoError>, u64) {
        let owner = if op == Op::Flush { 0 } else { self.img.guest_owner(off) };
        Forward::new(&self.routes[owner], (Class::Data, op), off, segs).await
    }

    pub async fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        if crate::seg::total_len(segs) == 0 {
            return Ok(());
        }
        if let Some(d) = &self.direct
            && let Some(r) = d.read(off, segs).await
        {
            return r;
        }
        self.call(Op::Read, off, segs).await.0
    }

    pub async fn write(&self, off: u64, segs: &[IoSeg<'_>], fua: bool) -> Result<(), IoError> {
        if crate::seg::total_len(segs) == 0 {
            return if fua { self.flush().await } else { Ok(()) };
        }
        if !fua
            && let Some(d) = &self.direct
            && let Some(r) = d.write(off, segs).await
        {
            return r;
        }
        self.call(Op::Write { fua }, off, segs).await.0
    }

    /// Writes `segs` at `off`, compressing the whole clusters it can (see
    /// `Shard::write_compressed`).
    pub async fn write_compressed(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        if crate::seg::total_len(segs) == 0 {
            return Ok(());
        }
        self.call(Op::WriteCompressed, off, segs).await.0
    }

    pub async fn flush(&self) -> Result<(), IoError> {
        self.call(Op::Flush, 0, &[]).await.0
    }

    pub async fn write_zeroes(
        &self,
        off: u64,
        len: u64,
        unmap: bool,
        fast: bool,
    ) -> Result<(), IoError> {
        if len == 0 {
            return Ok(());
        }
        self.call(Op::Zero { len, unmap, fast }, off, &[]).await.0
    }

    pub async fn discard(&self, off: u64, len: u64) -> Result<(), IoError> {
        if len == 0 {
            return Ok(());
        }
        self.call(Op::Discard { len }, off, &[]).await.0
    }

    /// The status of the range from `off`.
    pub async fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus, IoError> {
        if len == 0 {
            return Err(IoError::Invalid);
        }
        let (r, st) = self.call(Op::Status { len }, off, &[]).await;
        r.map(|()| route::decode_status(st))
    }

    async fn zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<(), IoError> {
        self.write_zeroes(off, len, flags.may_unmap, flags.fast_only).await?;
        if flags.fua { self.flush().await } else { Ok(()) }
    }
}

impl DriverChannel for Qcow2Channel {
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> IoFuture<'a> {
        IoFuture::new(Qcow2Channel::read(self, off, segs))
    }
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], fua: bool) -> IoFuture<'a> {
        IoFuture::new(Qcow2Channel::write(self, off, segs, fua))
    }
    fn flush(&self) -> IoFuture<'_> {
        IoFuture::new(Qcow2Channel::flush(self))
    }
    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        IoFuture::new(self.zeroes(off, len, flags))
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_> {
        IoFuture::new(Qcow2Channel::discard(self, off, len))
    }
    fn block_status(&self, off: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        IoFuture::new(Qcow2Channel::block_status(self, off, len))
    }
    fn populate<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> IoFuture<'a> {
        IoFuture::new(async move {
            if crate::seg::total_len(segs) == 0 {
                return Ok(());
            }
            self.call(Op::Populate, off, segs).await.0
        })
    }
    fn write_compressed<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> IoFuture<'a> {
        IoFuture::new(Qcow2Channel::write_compressed(self, off, segs))
    }
}
