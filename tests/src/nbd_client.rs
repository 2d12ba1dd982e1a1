//! A deliberately small, blocking NBD client for protocol tests: it can send well-formed
//! and malformed messages byte by byte and read back whatever the server answers.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_EXTENDED_HEADERS: u32 = 11;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// A reply as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success, else the NBD errno.
    pub error: u32,
    /// Read data (concatenated OFFSET_DATA payloads) or other payload.
    pub data: Vec<u8>,
    /// A simple reply (not structured chunks).
    pub simple: bool,
}

/// An NBD client connection.
pub struct Client {
    pub s: UnixStream,
    pub structured: bool,
    pub extended: bool,
    pub size: u64,
    pub flags: u16,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Client {
    /// Connects and reads the server greeting; sends the client flags.
    pub fn greet(sock: &Path) -> io::Result<Client> {
        let mut s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        assert_eq!(be64(&g[8..16]), IHAVEOPT, "server greeting");
        s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        Ok(Client { s, structured: false, extended: false, size: 0, flags: 0 })
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }

    /// Reads one option reply: (type, payload).
    pub fn option_reply(&mut self) -> io::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        assert_eq!(be64(&h[..8]), 0x0003_e889_0455_65a9, "option reply magic");
        let kind = be32(&h[12..16]);
        let len = be32(&h[16..20]) as usize;
        let mut p = vec![0u8; len];
        self.s.read_exact(&mut p)?;
        Ok((kind, p))
    }

    /// Full handshake with NBD_OPT_GO, optionally negotiating structured replies,
    /// extended headers and base:allocation.
    pub fn connect(
        sock: &Path,
        export: &str,
        structured: bool,
        extended: bool,
    ) -> io::Result<Client> {
        let mut c = Self::greet(sock)?;
        if extended {
            c.send_option(OPT_EXTENDED_HEADERS, &[])?;
            assert_eq!(c.option_reply()?.0, REP_ACK);
            c.extended = true;
            c.structured = true;
        } else if structured {
            c.send_option(OPT_STRUCTURED_REPLY, &[])?;
            assert_eq!(c.option_reply()?.0, REP_ACK);
            c.structured = true;
        }
        if c.structured {
            let mut d = Vec::new();
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&15u32.to_be_bytes());
            d.extend_from_slice(b"base:allocation");
            c.send_option(10, &d)?;
            loop {
                let (k, _) = c.option_reply()?;
                if k == REP_ACK {
                    break;
                }
            }
        }
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        c.send_option(OPT_GO, &d)?;
        loop {
            let (k, p) = c.option_reply()?;
            match k {
                REP_ACK => break,
                REP_INFO if p.len() >= 12 && u16::from_be_bytes([p[0], p[1]]) == 0 => {
                    c.size = be64(&p[2..10]);
                    c.flags = u16::from_be_bytes([p[10], p[11]]);
                }
                REP_INFO => {}
                other => {
                    return Err(io::Error::other(format!(
                        "GO refused with {other:#x}: {}",
                        String::from_utf8_lossy(&p)
                    )));
                }
            }
        }
        Ok(c)
    }

    /// Sends a request header (and payload).
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut b = Vec::with_capacity(32 + payload.len());
        if self.extended {
            b.extend_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
        } else {
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        if self.extended {
            b.extend_from_slice(&len.to_be_bytes());
        } else {
            b.extend_from_slice(&(len as u32).to_be_bytes());
        }
        b.extend_from_slice(payload);
        self.s.write_all(&b)
    }

    /// Reads one complete reply. For simple replies to reads, `read_len` says how many
    /// data bytes follow a successful reply.
    pub fn reply(&mut self, read_len: usize) -> io::Result<Reply> {
        self.reply_for(|_| read_len)
    }

    /// Like [`Client::reply`], for pipelined mixes: `read_len` maps a reply's cookie to
    /// the data length that follows a successful simple reply.
    pub fn reply_for(&mut self, read_len: impl Fn(u64) -> usize) -> io::Result<Reply> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m)?;
        match be32(&m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h)?;
                let error = be32(&h[..4]);
                let mut data = Vec::new();
                let read_len = read_len(be64(&h[4..12]));
                if error == 0 && read_len > 0 {
                    data = vec![0u8; read_len];
                    self.s.read_exact(&mut data)?;
                }
                Ok(Reply { cookie: be64(&h[4..12]), error, data, simple: true })
            }
            magic @ (STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC) => {
                let mut reply = Reply { cookie: 0, error: 0, data: Vec::new(), simple: false };
                let mut magic = magic;
                loop {
                    let ext = magic == EXTENDED_REPLY_MAGIC;
                    let mut h = vec![0u8; if ext { 28 } else { 16 }];
                    self.s.read_exact(&mut h)?;
                    let flags = u16::from_be_bytes([h[0], h[1]]);
                    let kind = u16::from_be_bytes([h[2], h[3]]);
                    reply.cookie = be64(&h[4..12]);
                    let len =
                        if ext { be64(&h[20..28]) as usize } else { be32(&h[12..16]) as usize };
                    let mut p = vec![0u8; len];
                    self.s.read_exact(&mut p)?;
                    match kind {
                        1 => reply.data.extend_from_slice(&p[8..]),
                        k if k & 0x8000 != 0 => reply.error = be32(&p[..4]),
                        0 => {}
                        _ => reply.data.extend_from_slice(&p),
                    }
                    if flags & 1 != 0 {
                        return Ok(reply);
                    }
                    self.s.read_exact(&mut m)?;
                    magic = be32(&m);
                }
            }
            other => Err(io::Error::other(format!("bad reply magic {other:#x}"))),
        }
    }

    pub fn read(&mut self, cookie: u64, offset: u64, len: usize) -> io::Result<Reply> {
        self.request(CMD_READ, 0, cookie, offset, len as u64, &[])?;
        self.reply(len)
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> io::Result<Reply> {
        self.request(CMD_WRITE, 0, cookie, offset, data.len() as u64, data)?;
        self.reply(0)
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, 0, &[]);
    }
}
