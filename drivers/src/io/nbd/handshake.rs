//! The client side of the NBD handshake (fixed newstyle, `NBD_OPT_GO`), done with a
//! blocking socket on the control plane (or a reconnecting helper thread) before the
//! socket is handed to its reactor. Every reply the server sends is bounded and
//! checked; a refusal comes back with the server's own message.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::time::Duration;

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

/// Connects to `uri` and negotiates its export; returns the socket (non-blocking, in
/// the transmission phase) and what the server said.
pub fn connect(uri: &NbdUri) -> Result<(OwnedFd, Export), String> {
    let mut s = dial(uri)?;
    s.set_timeouts(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
    let export = negotiate(&mut *s, &uri.export).map_err(|e| format!("{uri}: {e}"))?;
    s.set_timeouts(None).map_err(|e| e.to_string())?;
    let fd = s.into_fd();
    poller::fd::set_nonblocking(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(|e| e.to_string())?;
    Ok((fd, export))
}

fn read_n<const N: usize>(s: &mut dyn Stream) -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    s.read_exact(&mut b).map_err(|e| format!("the server stopped answering the handshake: {e}"))?;
    Ok(b)
}

fn negotiate(s: &mut dyn Stream, name: &str) -> Result<Export, String> {
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
    let mut msg = Vec::with_capacity(32 + name.len());
    msg.extend_from_slice(&mine.to_be_bytes());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&((4 + name.len() + 2 + 2) as u32).to_be_bytes());
    msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
    msg.extend_from_slice(name.as_bytes());
    msg.extend_from_slice(&1u16.to_be_bytes());
    msg.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    s.write_all(&msg).map_err(|e| format!("sending NBD_OPT_GO: {e}"))?;
    let mut export = None;
    let (mut min_block, mut max_block) = (1u32, 32u32 << 20);
    loop {
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
