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
//!
//! A socket on the ring can also receive with one multishot receive into buffers the
//! ring provides ([`RecvStream`], `net/stream.rs`), instead of one receive per read.
//!
//! A TCP socket on the ring can also send without copying (`IORING_OP_SENDMSG_ZC`,
//! [`UringSocket::send_zc`]): the kernel sends from the caller's pages, which stay its
//! own until a [`ZcNotice`] says they are free (`engine/zc.rs`). Unix sockets, and
//! kernels before 6.1, have only the copying send.

use std::cell::Cell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::Poll;

use config::SocketIo;
use poller::Async;

use super::engine::{EngineRef, IoOp, check, uring};

mod stream;
pub use stream::{Received, RecvStream, Segment};

thread_local! {
    /// The kernel refused a zero-copy send as malformed: it has the operation but not
    /// its usage report (Linux 6.1). This reactor's sockets copy from then on.
    static ZC_REFUSED: Cell<bool> = const { Cell::new(false) };
}

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

    /// This socket's receives as one multishot receive ([`RecvStream`]), or `None`
    /// when the kernel lacks them or the reactor has no stream left. While the stream
    /// is started, nothing else may receive on the socket.
    pub fn recv_stream(&self) -> Option<RecvStream> {
        RecvStream::new(self.fd())
    }

    /// Sends some of `bufs` with one `sendmsg` (`MSG_NOSIGNAL`: a vanished peer is
    /// `EPIPE`); returns how many bytes went out.
    pub async fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let msg = msghdr(bufs);
        // `msg` and `bufs` outlive the operation: the future borrows them until it
        // completes, and its drop cancels and waits for it.
        check(self.engine.submit(IoOp::SendMsg { fd: self.fd(), msg: &msg }).await)
    }

    /// Whether this socket can send without copying: TCP, on a ring whose kernel has
    /// the operation, and not refused by it since.
    pub fn zero_copy(&self) -> bool {
        uring::zero_copy_supported() && !ZC_REFUSED.get() && is_tcp(self.fd())
    }

    /// A notice for [`UringSocket::send_zc`], or `None` when the ring has none left.
    pub fn notice(&self) -> Option<ZcNotice> {
        let EngineRef::Uring(u) = &self.engine else { return None };
        let index = u.notices.acquire()?;
        Some(ZcNotice { ring: u.clone(), index })
    }

    /// Sends some of `bufs` with one zero-copy `sendmsg`; returns how many bytes the
    /// socket took. The kernel keeps sending from `bufs`' memory after this returns:
    /// it must stay untouched until [`ZcNotice::wait`] on `notice` is ready, which
    /// must be before `notice` is used again. A kernel that refuses the operation's
    /// usage report gets a copying send instead, and so does every later send of
    /// this reactor ([`UringSocket::zero_copy`] turns false).
    pub async fn send_zc(&self, bufs: &[IoSlice<'_>], notice: &ZcNotice) -> io::Result<usize> {
        assert!(!notice.armed(), "a zero-copy notice reused before its notification");
        let msg = msghdr(bufs);
        let op = IoOp::SendMsgZc { fd: self.fd(), msg: &msg, notice: notice.index };
        // As in `send_vectored`: the future borrows `msg` and `bufs` until completion.
        match self.engine.submit(op).await {
            r if r == -i64::from(libc::EINVAL) && !notice.armed() => {
                tracing::info!(
                    "this kernel refuses zero-copy sends with a usage report; sockets copy"
                );
                ZC_REFUSED.set(true);
                self.send_vectored(bufs).await
            }
            r => check(r),
        }
    }
}

/// The second completion of a zero-copy send: when it is ready, the send's buffers
/// are the caller's again. Dropped while a send is in flight, the notice's entry stays
/// taken until the kernel's notification, but the buffers must still outlive it.
pub struct ZcNotice {
    ring: Rc<uring::Uring>,
    index: u32,
}

impl ZcNotice {
    /// Whether a send on this notice may still read its buffers.
    pub fn armed(&self) -> bool {
        self.ring.notices.armed(self.index)
    }

    /// Ready when no send holds the buffers, with whether the kernel copied the last
    /// one after all (a loopback peer does that).
    pub fn wait(&self) -> impl Future<Output = bool> + '_ {
        std::future::poll_fn(move |cx| self.ring.notices.poll(self.index, cx))
    }

    /// Registers `cx` to be woken by the notification; ready as [`ZcNotice::wait`].
    pub fn poll_wait(&self, cx: &mut std::task::Context<'_>) -> Poll<bool> {
        self.ring.notices.poll(self.index, cx)
    }
}

impl Drop for ZcNotice {
    fn drop(&mut self) {
        self.ring.notices.release(self.index);
    }
}

/// Whether `fd` is a TCP socket (zero-copy sends exist only for TCP).
fn is_tcp(fd: RawFd) -> bool {
    let opt = |name: libc::c_int| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for writes of an int-sized option.
        let r =
            unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&raw mut v).cast(), &mut len) };
        (r == 0).then_some(v)
    };
    opt(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && matches!(opt(libc::SO_DOMAIN), Some(libc::AF_INET | libc::AF_INET6))
}

/// Aborts a TCP connection: the kernel drops what it still holds to send
/// (`connect(AF_UNSPEC)`, which runs `tcp_disconnect` and sends a reset), so the
/// notifications of zero-copy sends to a peer that has stopped acknowledging arrive
/// now instead of when TCP gives up retransmitting.
pub fn abort_tcp(fd: RawFd) -> io::Result<()> {
    // SAFETY: sockaddr is plain data; an AF_UNSPEC address is valid input to connect.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    let len = std::mem::size_of::<libc::sockaddr>() as libc::socklen_t;
    // SAFETY: `sa` is a valid sockaddr of `len` bytes for the duration of the call.
    if unsafe { libc::connect(fd, &sa, len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A `sendmsg` header for `bufs`.
fn msghdr(bufs: &[IoSlice<'_>]) -> libc::msghdr {
    libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        // IoSlice is ABI-compatible with iovec.
        msg_iov: bufs.as_ptr() as *mut libc::iovec,
        msg_iovlen: bufs.len().min(libc::UIO_MAXIOV as usize),
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
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
