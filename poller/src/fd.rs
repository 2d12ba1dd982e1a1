//! Socket readiness on a reactor: one epoll instance per reactor, edge-triggered.
//!
//! Sockets are always tried first (`recv`, `send`, `accept`); only when the kernel says
//! `EAGAIN` does the task register its waker and return `Pending`. Edge-triggered epoll
//! reports any readiness that arrives after that attempt at the next `epoll_wait`, and
//! because the attempt, the registration and event processing all happen on the reactor
//! thread, nothing can slip between them. While busy the reactor calls `epoll_wait` with
//! a zero timeout once per tick (only when sockets are registered); while adaptive-idle
//! it sleeps in the same call. The same epoll set holds "wakeup" descriptors (the
//! doorbell, I/O drivers' completion eventfds) that only end a sleep.

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::task::{Context, Poll, Waker};

use crate::reactor::{try_with_core, with_core};

/// Events returned per `epoll_wait`.
const EVENT_BATCH: usize = 256;
/// The token of wakeup descriptors.
const WAKEUP_TOKEN: u64 = u64::MAX;

pub(crate) struct FdTable {
    epfd: OwnedFd,
    events: RefCell<Vec<libc::epoll_event>>,
    sources: RefCell<Vec<Source>>,
    free: RefCell<Vec<u32>>,
    live: Cell<usize>,
}

#[derive(Default)]
struct Source {
    generation: u32,
    in_use: bool,
    /// False once a read found the socket drained (a short read or `EAGAIN`); set again
    /// by the next readable edge. While false, reads wait without a syscall.
    read_ready: bool,
    /// The peer closed or the socket failed (an `EPOLLRDHUP`/`HUP`/`ERR` edge): sticky,
    /// since no further edge will come and every read returns at once from now on.
    read_closed: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

impl FdTable {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory-safety preconditions.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(FdTable {
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: RefCell::new(vec![libc::epoll_event { events: 0, u64: 0 }; EVENT_BATCH]),
            sources: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            live: Cell::new(0),
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        cvt(unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    pub(crate) fn add_wakeup_fd(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, (libc::EPOLLIN | libc::EPOLLET) as u32, WAKEUP_TOKEN)
    }

    pub(crate) fn remove_wakeup_fd(&self, fd: RawFd) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
    }

    fn register(&self, fd: RawFd) -> io::Result<u64> {
        let index = {
            let mut sources = self.sources.borrow_mut();
            match self.free.borrow_mut().pop() {
                Some(i) => i,
                None => {
                    sources.push(Source::default());
                    (sources.len() - 1) as u32
                }
            }
        };
        let token = {
            let mut sources = self.sources.borrow_mut();
            let s = &mut sources[index as usize];
            s.in_use = true;
            s.read_ready = true;
            s.read_closed = false;
            u64::from(s.generation) << 32 | u64::from(index)
        };
        let events = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
        if let Err(e) = self.ctl(libc::EPOLL_CTL_ADD, fd, events as u32, token) {
            self.release(token);
            return Err(e);
        }
        self.live.set(self.live.get() + 1);
        Ok(token)
    }

    fn release(&self, token: u64) {
        let index = (token & 0xffff_ffff) as usize;
        let mut sources = self.sources.borrow_mut();
        if let Some(s) = sources.get_mut(index)
            && s.in_use
            && s.generation == (token >> 32) as u32
        {
            s.in_use = false;
            s.generation = s.generation.wrapping_add(1);
            s.read_waker = None;
            s.write_waker = None;
            self.free.borrow_mut().push(index as u32);
        }
    }

    fn deregister(&self, fd: RawFd, token: u64) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
        self.release(token);
        self.live.set(self.live.get().saturating_sub(1));
    }

    fn set_waker(&self, token: u64, write: bool, waker: &Waker) {
        let mut sources = self.sources.borrow_mut();
        if let Some(s) = sources.get_mut((token & 0xffff_ffff) as usize)
            && s.generation == (token >> 32) as u32
        {
            let slot = if write { &mut s.write_waker } else { &mut s.read_waker };
            match slot {
                Some(w) if w.will_wake(waker) => {}
                _ => *slot = Some(waker.clone()),
            }
        }
    }

    fn read_ready(&self, token: u64) -> bool {
        let sources = self.sources.borrow();
        match sources.get((token & 0xffff_ffff) as usize) {
            Some(s) if s.generation == (token >> 32) as u32 => s.read_ready || s.read_closed,
            _ => true,
        }
    }

    /// Marks the source drained; with `waker`, also waits for its next readable edge.
    fn clear_read(&self, token: u64, waker: Option<&Waker>) {
        {
            let mut sources = self.sources.borrow_mut();
            if let Some(s) = sources.get_mut((token & 0xffff_ffff) as usize)
                && s.generation == (token >> 32) as u32
            {
                s.read_ready = false;
            }
        }
        if let Some(w) = waker {
            self.set_waker(token, false, w);
        }
    }

    pub(crate) fn has_sources(&self) -> bool {
        self.live.get() > 0
    }

    /// One `epoll_wait`; wakes tasks whose sockets became ready. Returns the number of
    /// events that woke a task.
    pub(crate) fn poll(&self, timeout_ms: i32) -> io::Result<usize> {
        let mut events = self.events.borrow_mut();
        // SAFETY: `events` holds EVENT_BATCH initialised entries the kernel may fill.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                events.as_mut_ptr(),
                EVENT_BATCH as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
        }
        let mut woke = 0;
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == WAKEUP_TOKEN {
                continue;
            }
            let flags = ev.events;
            let (r, w) = {
                let mut sources = self.sources.borrow_mut();
                match sources.get_mut((token & 0xffff_ffff) as usize) {
                    Some(s) if s.in_use && s.generation == (token >> 32) as u32 => {
                        let readable = flags
                            & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR)
                                as u32
                            != 0;
                        let writable =
                            flags & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
                        if readable {
                            s.read_ready = true;
                        }
                        let closed = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
                        if flags & closed != 0 {
                            s.read_closed = true;
                        }
                        (
                            if readable { s.read_waker.take() } else { None },
                            if writable { s.write_waker.take() } else { None },
                        )
                    }
                    _ => (None, None),
                }
            };
            if let Some(r) = r {
                r.wake();
                woke += 1;
            }
            if let Some(w) = w {
                w.wake();
                woke += 1;
            }
        }
        Ok(woke)
    }
}

/// A non-blocking descriptor registered with the current reactor's epoll set. Must be
/// created and dropped on the same reactor.
pub struct Async<T: AsRawFd> {
    io: Option<T>,
    token: u64,
}

impl<T: AsRawFd> Async<T> {
    /// Makes `io` non-blocking and registers it with the current reactor.
    pub fn new(io: T) -> io::Result<Self> {
        set_nonblocking(io.as_raw_fd())?;
        let token = with_core(|c| c.fds.register(io.as_raw_fd()))?;
        Ok(Async { io: Some(io), token })
    }

    pub fn get_ref(&self) -> &T {
        self.io.as_ref().expect("Async used after into_inner")
    }

    fn fd(&self) -> RawFd {
        self.get_ref().as_raw_fd()
    }

    /// Runs `op` until it stops failing with `EAGAIN`, waiting for readiness in between.
    pub fn poll_io<R>(
        &self,
        cx: &mut Context<'_>,
        write: bool,
        mut op: impl FnMut(RawFd) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            match op(self.fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    with_core(|c| c.fds.set_waker(self.token, write, cx.waker()));
                    return Poll::Pending;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    /// Reads what is available (at least one byte, or 0 at end of stream).
    ///
    /// A read that returns less than `buf` drained the socket (a stream socket's `read`
    /// takes all that is queued, up to the length), so the next read waits for the next
    /// readable edge instead of paying a syscall for `EAGAIN`. Edge-triggered epoll
    /// reports data queued after that read at the next `epoll_wait`, which runs on this
    /// thread after the waker is set, so nothing is missed; data queued during the read
    /// costs at most one spurious wake.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            if !with_core(|c| c.fds.read_ready(self.token)) {
                with_core(|c| c.fds.set_waker(self.token, false, cx.waker()));
                return Poll::Pending;
            }
            loop {
                match read_fd(self.fd(), buf) {
                    Ok(n) if n > 0 && n < buf.len() => {
                        with_core(|c| c.fds.clear_read(self.token, None));
                        return Poll::Ready(Ok(n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        with_core(|c| c.fds.clear_read(self.token, Some(cx.waker())));
                        return Poll::Pending;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => return Poll::Ready(other),
                }
            }
        })
        .await
    }

    /// Fills `buf` completely; `UnexpectedEof` if the peer closes first.
    pub async fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read(&mut buf[done..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }

    /// Writes some of `bufs`; returns how many bytes went out.
    pub async fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_io(cx, true, |fd| writev_fd(fd, bufs))).await
    }

    /// Writes all of `buf`.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.write_vectored(&[IoSlice::new(buf)]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Waits until the descriptor may be read (or has an error or hang-up).
    pub async fn readable(&self) -> io::Result<()> {
        let mut polled = false;
        std::future::poll_fn(|cx| {
            if polled {
                return Poll::Ready(Ok(()));
            }
            polled = true;
            let mut pfd = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd; a zero timeout never blocks.
            let n = unsafe { libc::poll(&mut pfd, 1, 0) };
            if n > 0 {
                return Poll::Ready(Ok(()));
            }
            with_core(|c| c.fds.set_waker(self.token, false, cx.waker()));
            Poll::Pending
        })
        .await
    }

    /// Deregisters and returns the descriptor.
    pub fn into_inner(mut self) -> T {
        let io = self.io.take().expect("Async used after into_inner");
        let fd = io.as_raw_fd();
        let token = self.token;
        try_with_core(|c| c.fds.deregister(fd, token));
        io
    }
}

impl<T: AsRawFd> Drop for Async<T> {
    fn drop(&mut self) {
        if let Some(io) = &self.io {
            let fd = io.as_raw_fd();
            let token = self.token;
            try_with_core(|c| c.fds.deregister(fd, token));
        }
    }
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor have no memory-safety preconditions.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// One non-blocking `read`.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Writes `bufs` to a non-blocking descriptor with one `sendmsg` (MSG_NOSIGNAL), falling
/// back to `writev` for non-sockets. `WouldBlock` when the socket is full.
pub fn writev_fd(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let count = bufs.len().min(libc::UIO_MAXIOV as usize);
    // MSG_NOSIGNAL: a vanished peer is an EPIPE error, not a process-killing SIGPIPE.
    let msg = libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        // IoSlice is ABI-compatible with iovec.
        msg_iov: bufs.as_ptr() as *mut libc::iovec,
        msg_iovlen: count,
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    };
    // SAFETY: `msg` points at `count` valid iovecs that outlive the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            // A pipe or other non-socket: plain writev.
            // SAFETY: as above.
            let n = unsafe { libc::writev(fd, bufs.as_ptr().cast(), count as i32) };
            return if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) };
        }
        Err(e)
    } else {
        Ok(n as usize)
    }
}
