//! The receive buffer of a connection's reader, and where its bytes come from.
//!
//! Request headers (and small payloads) are parsed out of a 64 KiB buffer; a large
//! write payload is received straight into its DMA buffer. The bytes come from the
//! socket in one of two ways:
//! - **stream**: one multishot receive into the connection's provided buffers
//!   (`drivers::io::net::RecvStream`), so no receive is queued per read; header bytes
//!   are copied from a filled buffer into the parse buffer a header at a time and
//!   payload bytes straight into their DMA buffers, so each byte is copied once, as
//!   with a single receive;
//! - **direct**: one receive per read, into the parse buffer or, for a large payload,
//!   into its DMA buffer without a copy in between.
//!
//! A connection starts in stream mode when the ring offers it and switches to direct
//! mode at the first request with a payload: the stream's receive is cancelled, what it
//! already received is drained in order, and only then does a direct receive start.
//! After [`RESUME_AFTER`] requests in a row without a payload the stream resumes. So the
//! stream carries request headers (reads, flushes, block status), where it saves a
//! receive per read, and writes come by direct receive: through the stream, a payload
//! of [`DIRECT_PAYLOAD`] bytes or more is copied once more (the kernel copies it into
//! a provided buffer first), and 4k writes at QD32 ran 0.84–0.98x as fast (a
//! completion per arrival where one receive per tick takes what several brought).
//!
//! Every receive bumps the connection's progress counter (read by the watchdog).

use drivers::io::net::{Received, RecvStream, Segment};

use super::conn::Conn;
use super::proto;

/// The receive buffer for request headers (and small payload fragments).
const RX_BUF: usize = 64 << 10;

/// A write payload at least this large is received straight into its DMA buffer: after
/// one, the next receive into the buffer takes only a request header, so the payload
/// that follows it is not copied in here first and then again (into a buffer the disk
/// has just read, cold in the cache: for 64 KiB writes over NBD that second copy was
/// the reactor's largest cost).
const DIRECT_PAYLOAD: u64 = 16 << 10;

/// Requests without a payload after which a direct-mode connection goes back to its
/// stream.
const RESUME_AFTER: u32 = 64;

enum Mode {
    Stream,
    /// The stream's receive cancelled; its remaining segments are taken first.
    Draining,
    Direct,
}

/// Bytes read but not yet parsed, and their source.
pub(super) struct Rx {
    buf: Box<[u8]>,
    pub(super) lo: usize,
    hi: usize,
    /// The most the next direct receive takes (a request header after a large
    /// payload, the whole free space otherwise).
    limit: usize,
    stream: Option<RecvStream>,
    mode: Mode,
    /// The stream segment being taken, and how much of it has been.
    seg: Option<(Segment, usize)>,
    /// Requests since the last payload.
    small_run: u32,
}

impl Rx {
    pub(super) fn new(stream: Option<RecvStream>) -> Rx {
        let mode = if stream.is_some() { Mode::Stream } else { Mode::Direct };
        Rx {
            buf: vec![0u8; RX_BUF].into_boxed_slice(),
            lo: 0,
            hi: 0,
            limit: RX_BUF,
            stream,
            mode,
            seg: None,
            small_run: 0,
        }
    }

    pub(super) fn available(&self) -> usize {
        self.hi - self.lo
    }

    pub(super) fn parsed(&self) -> &[u8] {
        &self.buf[self.lo..self.hi]
    }

    /// Notes the payload of the request just parsed: any payload goes to direct mode
    /// (a large one also makes the next direct receive take only a header); a run of
    /// requests without one resumes the stream.
    pub(super) fn payload_ahead(&mut self, len: u64, hlen: usize) {
        self.limit = if len >= DIRECT_PAYLOAD { hlen } else { RX_BUF };
        if len > 0 {
            self.small_run = 0;
            if let (Mode::Stream, Some(s)) = (&self.mode, &self.stream) {
                s.stop();
                self.mode = Mode::Draining;
            }
            return;
        }
        self.small_run = self.small_run.saturating_add(1);
        if let (Mode::Direct, Some(s)) = (&self.mode, &self.stream)
            && self.small_run >= RESUME_AFTER
        {
            s.start();
            self.mode = Mode::Stream;
        }
    }

    /// A stream segment with bytes left to take: `Some(true)`; `Some(false)` when the
    /// bytes come by direct receive; `None` at end of stream or on error.
    async fn segment(&mut self, c: &Conn) -> Option<bool> {
        loop {
            let Some(stream) = &self.stream else { return Some(false) };
            if let Some((s, off)) = &self.seg {
                if *off < s.len() {
                    return Some(true);
                }
                let (s, _) = self.seg.take().expect("checked above");
                stream.recycle(s);
            }
            if matches!(self.mode, Mode::Direct) {
                return Some(false);
            }
            match stream.next().await {
                Ok(Received::Data(s)) => {
                    c.progress.set(c.progress.get() + 1);
                    c.multishot_received();
                    self.seg = Some((s, 0));
                }
                Ok(Received::Stopped) => self.mode = Mode::Direct,
                Ok(Received::Closed) | Err(_) => return None,
            }
        }
    }

    /// Reads more bytes, at most `want` of them from a stream segment; false at end
    /// of stream or on error.
    pub(super) async fn fill(&mut self, c: &Conn, want: usize) -> bool {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.buf.len() - self.hi < proto::EXTENDED_REQUEST_LEN {
            self.buf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
        match self.segment(c).await {
            None => false,
            Some(true) => {
                let end = self.buf.len().min(self.hi + want.max(1));
                self.hi += from_segment(&self.stream, &mut self.seg, &mut self.buf[self.hi..end]);
                true
            }
            Some(false) => {
                let end = self.buf.len().min(self.hi + self.limit);
                match c.sock.read(&mut self.buf[self.hi..end]).await {
                    Ok(0) | Err(_) => false,
                    Ok(n) => {
                        self.hi += n;
                        c.progress.set(c.progress.get() + 1);
                        true
                    }
                }
            }
        }
    }

    /// Moves up to `dst.len()` buffered bytes into `dst`; returns how many.
    fn take(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.available());
        dst[..n].copy_from_slice(&self.buf[self.lo..self.lo + n]);
        self.lo += n;
        n
    }

    /// Receives `buf` whole: what the parse buffer holds, then the rest from a
    /// stream segment or straight from the socket. False at end of stream.
    pub(super) async fn receive(&mut self, c: &Conn, buf: &mut [u8]) -> bool {
        let mut have = self.take(buf);
        while have < buf.len() {
            match self.segment(c).await {
                None => return false,
                Some(true) => have += from_segment(&self.stream, &mut self.seg, &mut buf[have..]),
                Some(false) => match c.sock.read(&mut buf[have..]).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => {
                        have += n;
                        c.progress.set(c.progress.get() + 1);
                    }
                },
            }
        }
        true
    }

    /// Discards `len` payload bytes; false if the stream ends first.
    pub(super) async fn skip(&mut self, c: &Conn, mut len: u64) -> bool {
        self.limit = self.buf.len();
        loop {
            let n = (len.min(self.available() as u64)) as usize;
            self.lo += n;
            len -= n as u64;
            if len == 0 {
                return true;
            }
            if !self.fill(c, len.min(RX_BUF as u64) as usize).await {
                return false;
            }
        }
    }
}

/// Copies up to `dst.len()` bytes of the current stream segment into `dst`.
fn from_segment(
    stream: &Option<RecvStream>,
    seg: &mut Option<(Segment, usize)>,
    dst: &mut [u8],
) -> usize {
    let (Some(stream), Some((s, off))) = (stream, seg) else { return 0 };
    let src = &stream.bytes(s)[*off..];
    let n = dst.len().min(src.len());
    dst[..n].copy_from_slice(&src[..n]);
    *off += n;
    n
}
