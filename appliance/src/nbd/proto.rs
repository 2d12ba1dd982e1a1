//! NBD wire format (NetworkBlockDevice doc/proto.md): constants, request parsing and
//! reply encoding. Pure functions over byte slices, so the parsers can be fuzzed and
//! benchmarked without sockets. Everything is big-endian on the wire.

pub use drivers::io::nbd::wire::*;

/// The longest string (export name, query) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// The largest option payload we read; larger ones are a hostile client.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length (and payload length for writes).
    pub length: u64,
}

/// Why a request header could not be parsed: the stream is out of sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadMagic(pub u32);

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// The header length in the negotiated mode.
pub fn request_len(extended: bool) -> usize {
    if extended { EXTENDED_REQUEST_LEN } else { REQUEST_LEN }
}

/// Parses one request header from `b` (which holds at least `request_len` bytes).
pub fn parse_request(b: &[u8], extended: bool) -> Result<Request, BadMagic> {
    let magic = be32(b);
    let want = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
    if magic != want {
        return Err(BadMagic(magic));
    }
    let length = if extended { be64(&b[24..32]) } else { u64::from(be32(&b[24..28])) };
    Ok(Request {
        flags: be16(&b[4..6]),
        kind: be16(&b[6..8]),
        cookie: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        length,
    })
}

/// Encodes a request header (for tests and benchmarks of the parser).
pub fn encode_request(r: &Request, extended: bool, out: &mut [u8]) -> usize {
    let magic = if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC };
    out[0..4].copy_from_slice(&magic.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.kind.to_be_bytes());
    out[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
    if extended {
        out[24..32].copy_from_slice(&r.length.to_be_bytes());
        32
    } else {
        out[24..28].copy_from_slice(&(r.length as u32).to_be_bytes());
        28
    }
}

/// How replies are framed on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    Simple,
    Structured,
    Extended,
}

/// Writes a simple reply header (16 bytes).
pub fn encode_simple(out: &mut [u8], error: u32, cookie: u64) -> usize {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    16
}

/// Writes a structured (20 bytes) or extended (32 bytes) chunk header.
pub fn encode_chunk(
    out: &mut [u8],
    mode: ReplyMode,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) -> usize {
    match mode {
        ReplyMode::Extended => {
            out[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out[4..6].copy_from_slice(&flags.to_be_bytes());
            out[6..8].copy_from_slice(&kind.to_be_bytes());
            out[8..16].copy_from_slice(&cookie.to_be_bytes());
            out[16..24].copy_from_slice(&offset.to_be_bytes());
            out[24..32].copy_from_slice(&payload_len.to_be_bytes());
            32
        }
        _ => {
            out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out[4..6].copy_from_slice(&flags.to_be_bytes());
            out[6..8].copy_from_slice(&kind.to_be_bytes());
            out[8..16].copy_from_slice(&cookie.to_be_bytes());
            out[16..20].copy_from_slice(&(payload_len as u32).to_be_bytes());
            20
        }
    }
}

/// Maps an errno to the NBD error set, in this one place for the whole export.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::EIO | libc::ENXIO | libc::EBADF | libc::ENODEV => EIO,
        libc::ENOMEM => ENOMEM,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::EOPNOTSUPP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EINVAL,
    }
}

/// A simple cursor over option payloads.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub fn u16(&mut self) -> Option<u16> {
        let v = self.buf.get(..2).map(be16)?;
        self.buf = &self.buf[2..];
        Some(v)
    }
    pub fn u32(&mut self) -> Option<u32> {
        let v = self.buf.get(..4).map(be32)?;
        self.buf = &self.buf[4..];
        Some(v)
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let v = self.buf.get(..n)?;
        self.buf = &self.buf[n..];
        Some(v)
    }
    /// A u32-length-prefixed string of at most MAX_STRING bytes.
    pub fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.bytes(n)?).ok().filter(|s| !s.contains('\0'))
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data: the export name and the info types asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a str,
    pub infos: Vec<u16>,
}

pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let mut r = Reader::new(data);
    let name = r.string()?;
    let n = r.u16()? as usize;
    let mut infos = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        infos.push(r.u16()?);
    }
    r.is_empty().then_some(InfoRequest { name, infos })
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: export name and queries.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    pub name: &'a str,
    pub queries: Vec<&'a str>,
}

pub fn parse_meta_request(data: &[u8]) -> Option<MetaRequest<'_>> {
    let mut r = Reader::new(data);
    let name = r.string()?;
    let n = r.u32()? as usize;
    if n > 1024 {
        return None;
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(r.string()?);
    }
    r.is_empty().then_some(MetaRequest { name, queries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_both_modes() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 7,
            offset: 1 << 40,
            length: 4096,
        };
        for ext in [false, true] {
            let mut b = [0u8; 32];
            let n = encode_request(&r, ext, &mut b);
            assert_eq!(n, request_len(ext));
            assert_eq!(parse_request(&b, ext), Ok(r));
            assert!(parse_request(&b, !ext).is_err(), "magic differs between modes");
        }
    }

    #[test]
    fn bad_magic_is_reported() {
        let b = [0xffu8; 32];
        assert_eq!(parse_request(&b, false), Err(BadMagic(0xffff_ffff)));
    }

    #[test]
    fn info_and_meta_requests() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vm1");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, "vm1");
        assert_eq!(r.infos, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_none(), "truncated");
        let mut extra = d.clone();
        extra.push(0);
        assert!(parse_info_request(&extra).is_none(), "trailing bytes");
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        let q = parse_meta_request(&m).unwrap();
        assert_eq!(q.queries, vec!["base:allocation"]);
        let mut huge = Vec::new();
        huge.extend_from_slice(&(u32::MAX).to_be_bytes());
        assert!(parse_meta_request(&huge).is_none());
    }
}
