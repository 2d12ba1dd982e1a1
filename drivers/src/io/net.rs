//! Socket I/O on the reactor's io_uring ring, for transports that want it.
//!
//! A receive or a `sendmsg` is one more entry in the ring that already carries the
//! reactor's disk I/O, so the tick's single `io_uring_enter` submits both, and a socket
//! that has no data yet costs nothing until it has: the kernel arms its own poll and
//! posts the completion when the peer writes. This replaces a readiness poll
//! (`epoll_wait`) plus one `read` or `sendmsg` system call per operation.
//!
//! Operations that wait on a peer take their slots from a table of their own (a silent
//! client must not hold a slot a disk needs), do not keep an adaptive reactor awake (a
//! client may be silent forever) and are cancelled, not waited for, when their future
//! is dropped. A [`UringSocket`] is the right to one receive and one send in flight:
//! at most [`MAX_SOCKETS`] exist per reactor, so the table never runs out, and a
//! transport that cannot get one uses readiness polling for that socket instead.
//!
//! [`Socket`] is what transports hold: a [`UringSocket`] when the ring can take it,
//! else the socket on the reactor's epoll set with one system call per operation.
//!
//! A ring socket is put in blocking mode: io_uring tries each operation without blocking
//! and, when it would block, waits through its own poll rather than failing with
//! `EAGAIN`.

use std::cell::Cell;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use config::SocketIo;
use poller::Async;

use super::engine::{EngineRef, IoOp, check, uring};

/// Sockets per reactor that may use the ring at once.
pub const MAX_SOCKETS: u32 = 512;

thread_local! {
    static LEASED: Cell<u32> = const { Cell::new(0) };
}

/// Whether this reactor's io_uring takes socket operations (Linux 5.6 and later);
/// false also when no ring can be set up at all.
pub fn supported() -> bool {
    uring::sockets_supported()
}

/// A socket whose receives and sends go through this reactor's io_uring. Must be used
/// and dropped on the reactor that made it.
pub struct UringSocket {
    fd: OwnedFd,
    engine: EngineRef,
}

impl UringSocket {
    /// Takes `fd` onto the ring, or gives it back when the ring lacks socket
    /// operations or this reactor already has [`MAX_SOCKETS`] on it.
    pub fn new(fd: OwnedFd) -> Result<UringSocket, (OwnedFd, io::Error)> {
        if !supported() {
            let e = io::Error::new(io::ErrorKind::Unsupported, "no socket operations on io_uring");
            return Err((fd, e));
        }
        if LEASED.get() >= MAX_SOCKETS {
            let e = io::Error::new(io::ErrorKind::OutOfMemory, "every io_uring socket slot taken");
            return Err((fd, e));
        }
        let engine = match uring::current() {
            Ok(u) => EngineRef::Uring(u),
            Err(e) => return Err((fd, e)),
        };
        if let Err(e) = set_blocking(fd.as_raw_fd()) {
            return Err((fd, e));
        }
        LEASED.set(LEASED.get() + 1);
        Ok(UringSocket { fd, engine })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Receives what is available into `buf`: at least one byte, or 0 at end of stream.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let op = IoOp::Recv { fd: self.fd(), ptr: buf.as_mut_ptr(), len };
        check(self.engine.submit(op).await)
    }

    /// Sends some of `bufs` with one `sendmsg` (`MSG_NOSIGNAL`: a vanished peer is
    /// `EPIPE`); returns how many bytes went out.
    pub async fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let msg = libc::msghdr {
            msg_name: std::ptr::null_mut(),
            msg_namelen: 0,
            // IoSlice is ABI-compatible with iovec.
            msg_iov: bufs.as_ptr() as *mut libc::iovec,
            msg_iovlen: bufs.len().min(libc::UIO_MAXIOV as usize),
            msg_control: std::ptr::null_mut(),
            msg_controllen: 0,
            msg_flags: 0,
        };
        // `msg` and `bufs` outlive the operation: the future borrows them until it
        // completes, and its drop cancels and waits for it.
        check(self.engine.submit(IoOp::SendMsg { fd: self.fd(), msg: &msg }).await)
    }
}

impl Drop for UringSocket {
    fn drop(&mut self) {
        LEASED.set(LEASED.get() - 1);
    }
}

fn set_blocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own have no memory-safety
    // preconditions.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A connected stream socket on the current reactor, its bytes moved as `SocketIo`
/// says (see the module doc).
pub enum Socket {
    Epoll(Async<OwnedFd>),
    Uring(UringSocket),
}

impl Socket {
    /// The socket for `sock` (registered with the reactor's epoll set), moved to the
    /// ring when `io` allows and the ring can take it.
    pub fn new(sock: Async<OwnedFd>, io: SocketIo) -> io::Result<Socket> {
        if io == SocketIo::Epoll {
            return Ok(Socket::Epoll(sock));
        }
        match UringSocket::new(sock.into_inner()) {
            Ok(s) => Ok(Socket::Uring(s)),
            Err((fd, e)) => {
                if io == SocketIo::IoUring {
                    tracing::warn!(
                        "nbd.socket_io = \"io_uring\", but this connection uses epoll: {e}"
                    );
                }
                Ok(Socket::Epoll(Async::new(fd)?))
            }
        }
    }

    pub fn fd(&self) -> RawFd {
        match self {
            Socket::Epoll(s) => s.get_ref().as_raw_fd(),
            Socket::Uring(s) => s.fd(),
        }
    }

    /// Receives what is available: at least one byte, or 0 at end of stream.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Epoll(s) => s.read(buf).await,
            Socket::Uring(s) => s.recv(buf).await,
        }
    }

    /// Sends some of `bufs`; returns how many bytes went out.
    pub async fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Epoll(s) => {
                std::future::poll_fn(|cx| s.poll_io(cx, true, |fd| poller::fd::writev_fd(fd, bufs)))
                    .await
            }
            Socket::Uring(s) => s.send_vectored(bufs).await,
        }
    }

    /// Receives exactly `buf.len()` bytes; `UnexpectedEof` if the stream ends first.
    pub async fn read_exact(&self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read(buf).await? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }
}
