//! Replies of the transmission phase, encoded in place: a fixed header array and an
//! optional data buffer per reply, so queueing one costs no allocation. The one place
//! a device error becomes an NBD error is [`Reply::io_error`].

use drivers::IoError;
use poller::DmaBuf;

use super::budget::Ticket;
use super::proto::{self, ReplyMode, Request};

/// Room for the largest reply header: an extended chunk header, an error payload and
/// its message.
pub const HDR_CAP: usize = 128;

/// One queued reply: header bytes, an optional data buffer, and the admission ticket
/// released once the reply is sent.
pub struct Reply {
    pub hdr: [u8; HDR_CAP],
    pub hdr_len: u16,
    pub data: Option<DmaBuf>,
    pub failed: bool,
    pub ticket: Option<Ticket>,
}

impl Reply {
    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.hdr_len as usize + self.data.as_ref().map_or(0, DmaBuf::len)
    }

    fn blank() -> Reply {
        Reply { hdr: [0u8; HDR_CAP], hdr_len: 0, data: None, failed: false, ticket: None }
    }

    /// Success without data. With structured replies a read must be answered with
    /// chunks (doc/proto.md), so an empty read gets a lone `NONE` chunk; other commands
    /// get simple replies unless extended headers were negotiated.
    pub fn ok(mode: ReplyMode, req: &Request) -> Reply {
        let mut r = Self::blank();
        let chunk = match mode {
            ReplyMode::Extended => true,
            ReplyMode::Structured => req.kind == proto::CMD_READ,
            ReplyMode::Simple => false,
        };
        r.hdr_len = if chunk {
            proto::encode_chunk(
                &mut r.hdr,
                mode,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                req.cookie,
                req.offset,
                0,
            )
        } else {
            proto::encode_simple(&mut r.hdr, 0, req.cookie)
        } as u16;
        r
    }

    /// An error reply with an NBD errno and, in structured modes, a message.
    pub fn error(mode: ReplyMode, req: &Request, nbd_errno: u32, msg: &str) -> Reply {
        let mut r = Self::blank();
        r.failed = true;
        if mode == ReplyMode::Simple {
            r.hdr_len = proto::encode_simple(&mut r.hdr, nbd_errno, req.cookie) as u16;
            return r;
        }
        let msg = &msg.as_bytes()[..msg.len().min(HDR_CAP - 32 - 6)];
        let n = proto::encode_chunk(
            &mut r.hdr,
            mode,
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_ERROR,
            req.cookie,
            req.offset,
            6 + msg.len() as u64,
        );
        r.hdr[n..n + 4].copy_from_slice(&nbd_errno.to_be_bytes());
        r.hdr[n + 4..n + 6].copy_from_slice(&(msg.len() as u16).to_be_bytes());
        r.hdr[n + 6..n + 6 + msg.len()].copy_from_slice(msg);
        r.hdr_len = (n + 6 + msg.len()) as u16;
        r
    }

    /// The one place a device error becomes an NBD error (doc/proto.md, "Error
    /// values"): past the end is ENOSPC for writes and EINVAL otherwise.
    pub fn io_error(mode: ReplyMode, req: &Request, e: IoError) -> Reply {
        let writes = matches!(req.kind, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES);
        let (code, msg) = match e {
            IoError::OutOfRange if writes => {
                (proto::ENOSPC, "request beyond the end of the export")
            }
            IoError::OutOfRange => (proto::EINVAL, "request beyond the end of the export"),
            IoError::Invalid => (proto::EINVAL, "malformed request"),
            IoError::TooLarge => (proto::EINVAL, "request larger than the maximum block size"),
            IoError::ReadOnly => (proto::EPERM, "export is read-only"),
            IoError::NoSpace => (proto::ENOSPC, "no space left for the image"),
            IoError::NotSupported => (proto::ENOTSUP, "operation not supported by this export"),
            IoError::Corrupt => (proto::EIO, "image is corrupt; see the server log"),
            IoError::Shutdown => (proto::ESHUTDOWN, "server is shutting down"),
            IoError::Os(errno) => (proto::errno_to_nbd(errno), "I/O error on the server"),
        };
        Self::error(mode, req, code, msg)
    }

    /// A successful read: a simple reply or one `OFFSET_DATA` chunk, then the data.
    pub fn read_data(mode: ReplyMode, req: &Request, buf: DmaBuf) -> Reply {
        let mut r = Self::blank();
        r.hdr_len = match mode {
            ReplyMode::Simple => proto::encode_simple(&mut r.hdr, 0, req.cookie),
            mode => {
                let n = proto::encode_chunk(
                    &mut r.hdr,
                    mode,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    req.offset,
                    8 + buf.len() as u64,
                );
                r.hdr[n..n + 8].copy_from_slice(&req.offset.to_be_bytes());
                n + 8
            }
        } as u16;
        r.data = Some(buf);
        r
    }

    /// Chunks encoded whole (headers and payloads) in `buf`: a block-status reply
    /// with one chunk per metadata context.
    pub fn chunks(buf: DmaBuf) -> Reply {
        let mut r = Self::blank();
        r.data = Some(buf);
        r
    }
}
