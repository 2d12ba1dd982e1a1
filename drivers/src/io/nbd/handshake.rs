//! The client side of the NBD handshake (fixed newstyle, `NBD_OPT_GO`), done with a
//! blocking socket on the control plane (or a reconnecting helper thread) before the
//! socket is handed to its reactor. Every reply the server sends is bounded and
//! checked; a refusal comes back with the server's own message.
//!
//! For `nbds://` URIs the client sends `NBD_OPT_STARTTLS` first, runs the TLS
//! handshake (rustls, blocking, under the same timeout) and haggles inside TLS; the
//! rustls connection then goes to the reactor with the socket ([`Connected`]).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection};

use super::uri::{Address, NbdUri};
use super::wire::*;

/// How long a connection and its handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest option reply we read.
const MAX_REPLY: u32 = 64 << 10;

/// What the server said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Block size constraints (1, 4096 and 32 MiB when the server gives none).
    pub min_block: u32,
    pub max_block: u32,
}

impl Export {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

trait Stream: Read + Write {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()>;
    fn into_fd(self: Box<Self>) -> OwnedFd;
}

impl Stream for std::net::TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn into_fd(self: Box<Self>) -> OwnedFd {
        (*self).into()
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn into_fd(self: Box<Self>) -> OwnedFd {
        (*self).into()
    }
}

fn dial(uri: &NbdUri) -> Result<Box<dyn Stream>, String> {
    match &uri.address {
        Address::Unix(p) => std::os::unix::net::UnixStream::connect(p)
            .map(|s| Box::new(s) as Box<dyn Stream>)
            .map_err(|e| format!("cannot connect to {}: {e}", p.display())),
        Address::Tcp { host, port } => {
            use std::net::ToSocketAddrs;
            let addrs = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {host}: {e}"))?;
            let mut last = format!("{host} has no address");
            for a in addrs {
                match std::net::TcpStream::connect_timeout(&a, HANDSHAKE_TIMEOUT) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(Box::new(s));
                    }
                    Err(e) => last = format!("cannot connect to {a}: {e}"),
                }
            }
            Err(last)
        }
    }
}

/// A negotiated connection, ready for the transmission phase.
pub struct Connected {
    /// The socket, non-blocking.
    pub fd: OwnedFd,
    /// The TLS session on it, for `nbds://`.
    pub tls: Option<ClientConnection>,
    pub export: Export,
}

/// Connects to `uri` and negotiates its export (inside TLS with `tls` for an `nbds://`
/// URI, which then needs it).
pub fn connect(uri: &NbdUri, tls: Option<&Arc<ClientConfig>>) -> Result<Connected, String> {
    let tls = match (uri.tls, tls) {
        (false, _) => None,
        (true, Some(cfg)) => Some(cfg),
        (true, None) => {
            return Err(format!("{uri}: TLS needs client credentials: set [nbd.client_tls]"));
        }
    };
    let mut s = dial(uri)?;
    s.set_timeouts(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
    let flags = greet(&mut *s).map_err(|e| format!("{uri}: {e}"))?;
    let mut session = None;
    let export = match tls {
        None => negotiate(&mut *s, flags, &uri.export),
        Some(cfg) => start_tls(&mut *s, uri, cfg).and_then(|mut conn| {
            let mut raw: &mut dyn Stream = &mut *s;
            let mut t = rustls::Stream::new(&mut conn, &mut raw);
            let e = negotiate(&mut t, flags, &uri.export);
            session = Some(conn);
            e
        }),
    }
    .map_err(|e| format!("{uri}: {e}"))?;
    s.set_timeouts(None).map_err(|e| e.to_string())?;
    let fd = s.into_fd();
    poller::fd::set_nonblocking(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(|e| e.to_string())?;
    Ok(Connected { fd, tls: session, export })
}

fn read_n<const N: usize>(s: &mut (impl Read + ?Sized)) -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    s.read_exact(&mut b).map_err(|e| format!("the server stopped answering the handshake: {e}"))?;
    Ok(b)
}

/// Option header: magic, option, length.
fn option(opt: u32, len: usize) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

/// `NBD_OPT_STARTTLS`, then the TLS handshake on the same socket.
fn start_tls(
    s: &mut dyn Stream,
    uri: &NbdUri,
    cfg: &Arc<ClientConfig>,
) -> Result<ClientConnection, String> {
    s.write_all(&option(OPT_STARTTLS, 0)).map_err(|e| format!("sending NBD_OPT_STARTTLS: {e}"))?;
    let (kind, data) = read_reply(s)?;
    match kind {
        REP_ACK => {}
        REP_ERR_POLICY | REP_ERR_UNSUP => {
            return Err(format!(
                "the server does not offer TLS: {}",
                String::from_utf8_lossy(&data).trim()
            ));
        }
        k => return Err(refusal(k, &data, &uri.export)),
    }
    let host = match &uri.address {
        Address::Tcp { host, .. } => Some(host.as_str()),
        Address::Unix(_) => None,
    };
    let name = crate::io::tls::creds::server_name(host)?;
    let mut conn = ClientConnection::new(cfg.clone(), name).map_err(|e| format!("TLS: {e}"))?;
    let mut raw: &mut dyn Stream = s;
    while conn.is_handshaking() {
        conn.complete_io(&mut raw).map_err(|e| format!("TLS handshake: {e}"))?;
    }
    Ok(conn)
}

/// One option reply: its type and data (bounded).
fn read_reply(s: &mut (impl Read + ?Sized)) -> Result<(u32, Vec<u8>), String> {
    let h = read_n::<20>(s)?;
    if u64::from_be_bytes(h[..8].try_into().unwrap_or_default()) != REP_MAGIC {
        return Err("a malformed option reply".into());
    }
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
    if len > MAX_REPLY {
        return Err(format!("an option reply of {len} bytes"));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).map_err(|e| format!("reading an option reply: {e}"))?;
    Ok((kind, data))
}

/// Reads the greeting and sends our flags; returns the server's handshake flags.
fn greet(s: &mut dyn Stream) -> Result<u16, String> {
    let hello = read_n::<18>(s)?;
    if u64::from_be_bytes(hello[..8].try_into().unwrap_or_default()) != NBDMAGIC {
        return Err("not an NBD server".into());
    }
    if u64::from_be_bytes(hello[8..16].try_into().unwrap_or_default()) != IHAVEOPT {
        return Err("the server speaks only the oldstyle handshake".into());
    }
    let flags = u16::from_be_bytes([hello[16], hello[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("the server does not speak fixed newstyle".into());
    }
    let mine =
        FLAG_C_FIXED_NEWSTYLE | if flags & FLAG_NO_ZEROES != 0 { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&mine.to_be_bytes()).map_err(|e| format!("sending our flags: {e}"))?;
    Ok(flags)
}

/// `NBD_OPT_GO` for export `name`, over `s` (plaintext or TLS).
fn negotiate(
    s: &mut (impl Read + Write + ?Sized),
    _flags: u16,
    name: &str,
) -> Result<Export, String> {
    let mut msg = Vec::with_capacity(32 + name.len());
    msg.extend_from_slice(&option(OPT_GO, 4 + name.len() + 2 + 2));
    msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
    msg.extend_from_slice(name.as_bytes());
    msg.extend_from_slice(&1u16.to_be_bytes());
    msg.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    s.write_all(&msg).map_err(|e| format!("sending NBD_OPT_GO: {e}"))?;
    let mut export = None;
    let (mut min_block, mut max_block) = (1u32, 32u32 << 20);
    loop {
        let (kind, data) = read_reply(s)?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => {
                let info = u16::from_be_bytes([data[0], data[1]]);
                match (info, data.len()) {
                    (INFO_EXPORT, 12) => {
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                        export = Some((size, u16::from_be_bytes([data[10], data[11]])));
                    }
                    (INFO_BLOCK_SIZE, 14) => {
                        min_block = u32::from_be_bytes(data[2..6].try_into().unwrap_or_default());
                        max_block = u32::from_be_bytes(data[10..14].try_into().unwrap_or_default());
                    }
                    _ => {}
                }
            }
            REP_INFO => return Err("a malformed NBD_REP_INFO".into()),
            k if k & (1 << 31) != 0 => return Err(refusal(k, &data, name)),
            k => return Err(format!("an unexpected option reply {k:#x}")),
        }
    }
    let (size, flags) = export.ok_or("the server sent no export information")?;
    if !min_block.is_power_of_two() || min_block > 65536 || max_block < min_block {
        return Err(format!("block size constraints {min_block}..{max_block} are invalid"));
    }
    Ok(Export { size, flags, min_block, max_block })
}

fn refusal(kind: u32, data: &[u8], name: &str) -> String {
    let text = String::from_utf8_lossy(data);
    let what = match kind {
        REP_ERR_UNKNOWN => format!("no export named `{name}`"),
        REP_ERR_POLICY => "the server refuses this client".into(),
        REP_ERR_TLS_REQD => "the server requires TLS".into(),
        REP_ERR_UNSUP => "the server does not support NBD_OPT_GO".into(),
        REP_ERR_SHUTDOWN => "the server is shutting down".into(),
        k => format!("the server refused the export ({k:#x})"),
    };
    if text.trim().is_empty() { what } else { format!("{what}: {}", text.trim()) }
}
