//! TLS for the NBD server and client, on the reactors.
//!
//! A [`Stream`] is a connected [`Socket`] (io_uring or epoll, see [`super::net`]) with,
//! once STARTTLS has been agreed, a rustls connection in front of it. rustls is driven
//! through its buffered API with buffers this module owns and sizes at upgrade:
//! ciphertext is received into a fixed buffer and handed to `read_tls`; plaintext
//! written by the caller is encrypted by rustls and moved with `write_tls` into a fixed
//! send buffer, which goes out through the same socket operations as plaintext
//! (one receive and one send in flight at most, as before). No thread, no blocking
//! call: the handshake is one more async task on the connection's reactor.
//!
//! The reader and the writer of a connection are separate tasks on one reactor; they
//! share the rustls state through a `RefCell` borrowed only between awaits. Output that
//! rustls queues while reading (a TLS 1.3 key update answer, an alert) is sent by the
//! next send, which drains everything rustls queued, in order; an alert after a fatal
//! error is also tried at once with a non-blocking `send`.
//!
//! Memory per TLS connection is bounded: the two buffers here ([`RX_BYTES`],
//! [`TX_BYTES`]), rustls's queue of encrypted output ([`TLS_QUEUE_BYTES`]) and its
//! received-plaintext limit (16 KiB, rustls's default). Cost per request: rustls 0.23
//! encrypts each record into a buffer of its own and copies each decrypted record into
//! one (both its buffered and unbuffered APIs do), so a TLS connection makes one heap
//! allocation per TLS record (up to 16 KiB of payload) in each direction; the
//! appliance's own path adds none. `tests/tests/no_alloc.rs` measures both.
//!
//! [`creds`] loads certificates and keys into rustls configurations (checking that
//! they parse, match and are within their validity period, naming the file otherwise)
//! and reads a peer certificate's common name for allow lists.

pub mod creds;

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::RawFd;

use super::net::{Socket, UringSocket};

/// Ciphertext received and not yet handed to rustls: two full TLS records.
pub const RX_BYTES: usize = 2 * MAX_RECORD_BYTES;
/// Ciphertext moved out of rustls per send: four full records.
pub const TX_BYTES: usize = 4 * MAX_RECORD_BYTES;
/// Encrypted output rustls may queue ahead of the socket (its buffer limit): what a
/// send accepts at once.
pub const TLS_QUEUE_BYTES: usize = 128 << 10;
/// The largest TLS record on the wire: 2^14 bytes of payload plus the most any cipher
/// adds (RFC 8446 5.2, RFC 5246 6.2.3).
pub const MAX_RECORD_BYTES: usize = (16 << 10) + 2048 + 5;

/// A connected socket, in plaintext or, after [`Stream::start_tls`], under TLS.
pub struct Stream {
    sock: Socket,
    tls: Option<Box<Tls>>,
}

struct Tls {
    conn: RefCell<rustls::Connection>,
    rx: RefCell<Rx>,
    tx: RefCell<Box<[u8]>>,
    /// A send is in flight (only one may be: records must go out in order).
    sending: Cell<bool>,
}

/// Received ciphertext: `buf[lo..hi]` is not yet handed to rustls.
struct Rx {
    buf: Box<[u8]>,
    lo: usize,
    hi: usize,
}

/// A TLS failure as an I/O error, keeping rustls's reason in the message.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// Writes into a slice, reporting how much fit (rustls keeps the rest queued).
struct SliceWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Write for SliceWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut total = 0;
        for b in bufs {
            let n = self.write(b)?;
            total += n;
            if n < b.len() {
                break;
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream {
    /// A plaintext stream on `sock`.
    pub fn plain(sock: Socket) -> Stream {
        Stream { sock, tls: None }
    }

    /// Puts TLS in front of the socket: from now on every byte goes through `conn`.
    /// Call [`Stream::handshake`] next.
    pub fn start_tls(&mut self, mut conn: rustls::Connection) {
        debug_assert!(self.tls.is_none(), "STARTTLS twice");
        conn.set_buffer_limit(Some(TLS_QUEUE_BYTES));
        self.tls = Some(Box::new(Tls {
            conn: RefCell::new(conn),
            rx: RefCell::new(Rx { buf: vec![0u8; RX_BYTES].into_boxed_slice(), lo: 0, hi: 0 }),
            tx: RefCell::new(vec![0u8; TX_BYTES].into_boxed_slice()),
            sending: Cell::new(false),
        }));
    }

    /// A stream whose TLS handshake was done elsewhere (the NBD client's blocking
    /// handshake), continuing on this reactor's socket. Bytes rustls has already
    /// decrypted or queued stay with `conn`.
    pub fn with_tls(sock: Socket, conn: rustls::Connection) -> Stream {
        let mut s = Stream::plain(sock);
        s.start_tls(conn);
        s
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn fd(&self) -> RawFd {
        self.sock.fd()
    }

    /// The socket, when bytes go to it as they are (no TLS) through the reactor's
    /// ring and it can send without copying ([`UringSocket::zero_copy`]).
    pub fn zero_copy_socket(&self) -> Option<&UringSocket> {
        self.uring_socket().filter(|s| s.zero_copy())
    }

    /// The socket, when bytes go to it as they are (no TLS) through the reactor's ring.
    pub fn uring_socket(&self) -> Option<&UringSocket> {
        match &self.sock {
            Socket::Uring(s) if self.tls.is_none() => Some(s),
            _ => None,
        }
    }

    /// The peer certificate's subject common name, once a TLS handshake with a client
    /// certificate is done.
    pub fn peer_common_name(&self) -> Option<String> {
        let tls = self.tls.as_ref()?;
        let conn = tls.conn.borrow();
        let cert = conn.peer_certificates()?.first()?;
        creds::common_name(cert.as_ref())
    }

    /// Runs the TLS handshake to its end. On failure the alert rustls chose is sent
    /// before the error returns, so the peer learns why.
    pub async fn handshake(&self) -> io::Result<()> {
        let Some(tls) = &self.tls else { return Ok(()) };
        loop {
            self.flush(tls).await?;
            if !tls.conn.borrow().is_handshaking() {
                return Ok(());
            }
            match self.receive(tls).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection during the TLS handshake",
                    ));
                }
                Err(e) => {
                    let _ = self.flush(tls).await;
                    return Err(e);
                }
            }
        }
    }

    /// Receives what is available: at least one byte, or 0 at end of stream (a TLS
    /// close_notify, or the socket closing).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else { return self.sock.read(buf).await };
        loop {
            let got = tls.conn.borrow_mut().reader().read(buf);
            match got {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.receive(tls).await {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    self.alert_now(tls);
                    return Err(e);
                }
            }
        }
    }

    /// Hands buffered ciphertext to rustls, receiving more first when none is
    /// buffered. False at end of stream.
    // The receive buffer stays borrowed across the socket read: only the connection's
    // reader task receives, so no other borrow of `rx` can happen meanwhile (a second
    // one would panic, not corrupt).
    #[allow(clippy::await_holding_refcell_ref)]
    async fn receive(&self, tls: &Tls) -> io::Result<bool> {
        let mut rx = tls.rx.borrow_mut();
        if rx.lo == rx.hi {
            let n = self.sock.read(&mut rx.buf[..]).await?;
            if n == 0 {
                return Ok(false);
            }
            rx.lo = 0;
            rx.hi = n;
        }
        let mut conn = tls.conn.borrow_mut();
        let used = conn.read_tls(&mut &rx.buf[rx.lo..rx.hi])?;
        if used == 0 {
            // rustls takes bytes whenever it has room; none taken means a record it
            // cannot hold, which processing below reports (or a peer that must stop).
            conn.process_new_packets().map_err(tls_error)?;
            return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS: record too large"));
        }
        rx.lo += used;
        conn.process_new_packets().map_err(tls_error)?;
        Ok(true)
    }

    /// Sends some of `bufs`; returns how many bytes (of plaintext) were taken. Under
    /// TLS they are encrypted and sent before this returns.
    pub async fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(tls) = &self.tls else { return self.sock.send(bufs).await };
        let mut taken = tls.conn.borrow_mut().writer().write_vectored(bufs)?;
        if taken == 0 && bufs.iter().any(|b| !b.is_empty()) {
            // rustls's queue was full of earlier output: send that, then try again.
            self.flush(tls).await?;
            taken = tls.conn.borrow_mut().writer().write_vectored(bufs)?;
        }
        self.flush(tls).await?;
        Ok(taken)
    }

    /// Sends all of `buf`.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.send(&[IoSlice::new(buf)]).await? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => buf = &buf[n..],
            }
        }
        Ok(())
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

    /// Ends TLS cleanly (close_notify), best effort; plaintext streams have nothing to
    /// say.
    pub async fn close(&self) {
        if let Some(tls) = &self.tls {
            tls.conn.borrow_mut().send_close_notify();
            let _ = self.flush(tls).await;
        }
    }

    /// Sends everything rustls has queued.
    async fn flush(&self, tls: &Tls) -> io::Result<()> {
        if tls.sending.replace(true) {
            // The other task is sending; it drains the queue, this output included.
            return Ok(());
        }
        let r = self.flush_queued(tls).await;
        tls.sending.set(false);
        r
    }

    // The send buffer stays borrowed across the socket send: `sending` admits one
    // flusher at a time, so no other borrow of `tx` can happen meanwhile.
    #[allow(clippy::await_holding_refcell_ref)]
    async fn flush_queued(&self, tls: &Tls) -> io::Result<()> {
        let mut tx = tls.tx.borrow_mut();
        loop {
            let len = {
                let mut conn = tls.conn.borrow_mut();
                if !conn.wants_write() {
                    return Ok(());
                }
                let mut w = SliceWriter { buf: &mut tx[..], len: 0 };
                conn.write_tls(&mut w)?;
                w.len
            };
            let mut off = 0;
            while off < len {
                match self.sock.send(&[IoSlice::new(&tx[off..len])]).await? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    n => off += n,
                }
            }
        }
    }

    /// After a fatal TLS error while reading: tries to send rustls's alert at once,
    /// without waiting (unless a send is in flight, which would interleave).
    fn alert_now(&self, tls: &Tls) {
        if !tls.sending.get() {
            self.send_queued_now(tls);
        }
    }

    /// A last word without waiting (a client's `NBD_CMD_DISC` as it closes): sent with
    /// one non-blocking `send`, encrypted and followed by a close_notify under TLS.
    /// Best effort: nothing is sent while a send is in flight or the socket is full.
    pub fn send_now(&self, data: &[u8]) {
        let Some(tls) = &self.tls else {
            send_nonblocking(self.fd(), data);
            return;
        };
        if tls.sending.get() {
            return;
        }
        {
            let mut conn = tls.conn.borrow_mut();
            let _ = conn.writer().write_all(data);
            conn.send_close_notify();
        }
        self.send_queued_now(tls);
    }

    fn send_queued_now(&self, tls: &Tls) {
        let mut out = [0u8; 512];
        let mut w = SliceWriter { buf: &mut out, len: 0 };
        if tls.conn.borrow_mut().write_tls(&mut w).is_err() || w.len == 0 {
            return;
        }
        let len = w.len;
        send_nonblocking(self.fd(), &out[..len]);
    }
}

/// One non-blocking `send`, its result ignored (callers are best effort).
fn send_nonblocking(fd: RawFd, data: &[u8]) {
    // SAFETY: a non-blocking send from a live buffer on a socket the caller owns.
    unsafe {
        libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
}
