//! Serving calls: a request split at the owners' boundaries (this shard's part run
//! here, the others sent as pieces), the control calls other shards send, and the
//! leader's flush barrier over every shard.

use std::rc::Rc;

use super::super::route::{self, Class, Forward, Op, encode_status};
use super::*;
use crate::driver::BlockStatus;

impl Shard {
    /// Serves a data call or a piece: (result, status word).
    pub(crate) async fn serve(
        &self,
        op: Op,
        off: u64,
        segs: &[IoSeg<'_>],
    ) -> (Result<(), IoError>, u64) {
        match op {
            Op::Flush => (self.barrier().await, 0),
            Op::Status { len } => {
                // The answer stops at the end of this shard's range; the caller asks
                // again from there.
                let len = self.piece_len(off, len);
                let owner = self.img.guest_owner(off);
                if owner != self.idx {
                    return self.peer_call(owner, Class::Piece, Op::Status { len }, off, &[]).await;
                }
                match self.signal_if_corrupt(self.block_status(off, len).await).await {
                    Ok((l, data, zero, depth)) => {
                        (Ok(()), encode_status(BlockStatus { len: l, hole: !data, zero, depth }))
                    }
                    Err(e) => (Err(e), 0),
                }
            }
            _ => (self.serve_split(op, off, segs).await, 0),
        }
    }

    /// Bytes from `off` (at most `len`) within one owner's range.
    fn piece_len(&self, off: u64, len: u64) -> u64 {
        if self.img.n == 1 {
            return len;
        }
        let unit = 1u64 << self.img.table_bits();
        (unit - (off & (unit - 1))).min(len)
    }

    async fn serve_split(&self, op: Op, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let total = match op {
            Op::Read | Op::Write { .. } | Op::Populate | Op::WriteCompressed => {
                seg::total_len(segs) as u64
            }
            Op::Zero { len, .. } | Op::Discard { len } => len,
            _ => return Err(IoError::Invalid),
        };
        if self.piece_len(off, total) == total && self.img.guest_owner(off) == self.idx {
            return self.run_local(op, off, segs).await;
        }
        let mut win = crate::format::qcow2::scratch::SegBuf::take();
        let mut done = 0u64;
        while done < total {
            let pos = off + done;
            let n = self.piece_len(pos, total - done);
            let w: &[IoSeg<'_>] = if segs.is_empty() {
                &[]
            } else {
                window(segs, done as usize, n as usize, win.arr())?
            };
            let piece = op.with_len(n);
            let owner = self.img.guest_owner(pos);
            if owner == self.idx {
                self.run_local(piece, pos, w).await?;
            } else {
                self.peer_call(owner, Class::Piece, piece, pos, w).await.0?;
            }
            done += n;
        }
        Ok(())
    }

    async fn run_local(&self, op: Op, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        debug_assert_eq!(self.img.guest_owner(off), self.idx);
        match op {
            Op::Read => self.read(off, segs).await,
            Op::Write { fua } => self.signal_if_corrupt(self.write(off, segs, fua).await).await,
            Op::Populate => self.signal_if_corrupt(self.populate(off, segs).await).await,
            Op::WriteCompressed => {
                self.signal_if_corrupt(self.write_compressed(off, segs).await).await
            }
            Op::Zero { len, unmap, fast } => {
                self.signal_if_corrupt(self.write_zeroes(off, len, unmap, fast).await).await
            }
            Op::Discard { len } => self.signal_if_corrupt(self.discard(off, len).await).await,
            _ => Err(IoError::Invalid),
        }
    }

    /// A call to shard `k` (which may be this one, through its own inbox).
    pub(super) async fn peer_call(
        &self,
        k: usize,
        class: Class,
        op: Op,
        off: u64,
        segs: &[IoSeg<'_>],
    ) -> (Result<(), IoError>, u64) {
        let Some(r) = self.peers.get().and_then(|p| p.get(k)) else {
            return (Err(IoError::Shutdown), 0);
        };
        Forward::new(r, (class, op), off, segs).await
    }

    /// One of the leader's operations: run here on the leader, else sent to it.
    pub(super) async fn leader_op(&self, op: Op, arg: u64) -> Result<(), IoError> {
        if self.is_leader() {
            return self.control(op, arg, false).await;
        }
        self.peer_call(0, Class::Control, op, arg, &[]).await.0
    }

    /// Runs a control operation. `remote`: sent by another shard (which holds none of
    /// this shard's locks; a local caller of the allocation paths already holds
    /// `alloc_lock`).
    pub(crate) async fn control(&self, op: Op, arg: u64, remote: bool) -> Result<(), IoError> {
        match op {
            Op::Free { punch } => self.free_cluster(arg, punch).await,
            Op::LocalFlush => self.flush_round(false).await,
            Op::CreateRefblock | Op::GrowReftable => {
                let _a = if remote { Some(self.alloc_lock.lock().await) } else { None };
                if op == Op::CreateRefblock {
                    self.create_refblock(arg).await
                } else {
                    self.grow_refcount_table(arg).await
                }
            }
            Op::DirtyBit => self.set_dirty_bit(arg != 0).await,
            Op::MarkCorrupt => self.mark_corrupt().await,
            _ => Err(IoError::Invalid),
        }
    }

    /// A guest flush: every write completed before it is durable when it returns. With
    /// several shards the leader runs it as a barrier over all (coalescing concurrent
    /// flushes into rounds, see `run_barrier`).
    pub(crate) async fn barrier(&self) -> Result<(), IoError> {
        if self.read_only {
            return Ok(());
        }
        if self.img.n == 1 {
            return self.flush_round(false).await;
        }
        if !self.is_leader() {
            return self.peer_call(0, Class::Piece, Op::Flush, 0, &[]).await.0;
        }
        let fs = &self.global_flush;
        let me = fs.requested.get() + 1;
        fs.requested.set(me);
        self.global_kick.wake_one();
        loop {
            if fs.completed.get() >= me {
                return fs.result.get();
            }
            fs.done.wait().await;
        }
    }

    /// The leader's barrier task: each round covers every flush requested before it
    /// started, and runs a flush round on all shards at once (each makes its own writes
    /// durable: its clusters are only in its own L2 tables, see the module docs).
    pub(crate) async fn run_barrier(self: Rc<Self>) {
        let fs = &self.global_flush;
        loop {
            while fs.completed.get() >= fs.requested.get() {
                if self.closing.get() {
                    return;
                }
                self.global_kick.wait().await;
            }
            let covers = fs.requested.get();
            let peers = self.peers.get().map_or(&[][..], Vec::as_slice);
            let r =
                route::broadcast(peers, self.idx, Op::LocalFlush, self.flush_round(false)).await;
            fs.completed.set(covers);
            fs.result.set(r);
            fs.done.wake_all();
        }
    }

    /// Stops the barrier task (at close, once no request is in flight).
    pub(crate) fn stop_barrier(&self) {
        self.closing.set(true);
        self.global_kick.wake_all();
    }
}
