//! A connection's receives as one multishot receive ([`RecvStream`]): the kernel
//! receives into the stream's own provided buffers as data arrives, one completion per
//! receive, with no receive to queue per read (`engine/multishot.rs`).
//!
//! The owner takes filled buffers in order ([`RecvStream::next`]), reads them
//! ([`RecvStream::bytes`]) and gives each back ([`RecvStream::recycle`]) before it
//! asks for the next, so a stream that ran out of buffers always has them all again
//! when it is re-armed. [`RecvStream::stop`] cancels the receive so the owner can
//! receive in another way (straight into a payload's buffer): `next` then drains what
//! already arrived and says [`Received::Stopped`] once nothing more can; only then may
//! anything else receive on the socket.

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;

use super::super::engine::multishot::{Next, Piece, Stop};
use super::super::engine::uring::{self, Uring};

thread_local! {
    /// The kernel refused a multishot receive (it has provided-buffer rings, Linux 5.19,
    /// but not multishot receives, 6.0): this reactor's sockets receive one at a time.
    static REFUSED: Cell<bool> = const { Cell::new(false) };
}

/// Bytes a [`RecvStream`] received, in one of its buffers: the owner's until given
/// back.
#[derive(Debug)]
pub struct Segment(Piece);

impl Segment {
    pub fn len(&self) -> usize {
        self.0.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }
}

/// What [`RecvStream::next`] found.
#[derive(Debug)]
pub enum Received {
    Data(Segment),
    /// The peer closed its side.
    Closed,
    /// Stopped by [`RecvStream::stop`] (or refused by the kernel), all data taken.
    Stopped,
}

/// A socket's multishot receive. Must be used and dropped on the reactor that made it.
pub struct RecvStream {
    ring: Rc<Uring>,
    index: u32,
    fd: RawFd,
    /// Whether `next` arms the receive when none is.
    wanted: Cell<bool>,
}

impl RecvStream {
    /// A stream for socket `fd` on this reactor's ring, or `None` when the kernel
    /// lacks provided-buffer rings or multishot receives, or every stream is taken.
    pub(super) fn new(fd: RawFd) -> Option<RecvStream> {
        if REFUSED.get() {
            return None;
        }
        let ring = uring::current().ok()?;
        let index = ring.acquire_stream()?;
        Some(RecvStream { ring, index, fd, wanted: Cell::new(true) })
    }

    /// The next filled buffer, in the order the bytes arrived; arms the receive when
    /// none is armed and the stream is wanted.
    pub async fn next(&self) -> io::Result<Received> {
        std::future::poll_fn(|cx| {
            loop {
                let next = match self.ring.streams.poll_next(self.index, cx) {
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                    std::task::Poll::Ready(n) => n,
                };
                let r = match next {
                    Next::Data(p) => Ok(Received::Data(Segment(p))),
                    Next::Stopped(Stop::Eof) => Ok(Received::Closed),
                    Next::Stopped(Stop::Error(e))
                        if e == libc::EINVAL && !self.ring.streams.received(self.index) =>
                    {
                        REFUSED.set(true);
                        self.wanted.set(false);
                        Ok(Received::Stopped)
                    }
                    Next::Stopped(Stop::Error(e)) => Err(io::Error::from_raw_os_error(e)),
                    Next::Stopped(_) if !self.wanted.get() => Ok(Received::Stopped),
                    Next::Stopped(_) => {
                        self.ring.arm_stream(self.index, self.fd);
                        continue;
                    }
                };
                return std::task::Poll::Ready(r);
            }
        })
        .await
    }

    /// The bytes of a segment this stream gave.
    pub fn bytes(&self, s: &Segment) -> &[u8] {
        self.ring.streams.bytes(self.index, &s.0)
    }

    /// Done with a segment: its buffer goes back to the kernel if the kernel has
    /// finished filling it (it may still be receiving into the rest of it).
    pub fn recycle(&self, s: Segment) {
        if s.0.last {
            self.ring.streams.recycle(self.index, s.0.bid);
        }
    }

    /// Stops receiving this way: cancels the receive if armed; `next` drains what
    /// arrived, then says [`Received::Stopped`].
    pub fn stop(&self) {
        self.wanted.set(false);
        self.ring.cancel_stream(self.index);
    }

    /// Receives this way again from the next `next` (unless the kernel refused).
    pub fn start(&self) {
        self.wanted.set(!REFUSED.get());
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        self.ring.release_stream(self.index);
    }
}
