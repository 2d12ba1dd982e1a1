//! Fixed newstyle option haggling, run as a task on the connection's reactor.
//!
//! Supported: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, EXTENDED_HEADERS,
//! LIST_META_CONTEXT and SET_META_CONTEXT (see `meta`), and STARTTLS when
//! `[nbd.tls]` is configured; unknown options get `NBD_REP_ERR_UNSUP` and haggling
//! continues. A client that breaks a MUST (bad magic, unknown client flags, an option
//! too large to be honest) is disconnected. The whole handshake runs under a timeout
//! so a silent client cannot hold a connection slot.
//!
//! TLS (doc/proto.md, "TLS support"), in the protocol's FORCEDTLS mode: before
//! STARTTLS every option but ABORT gets `NBD_REP_ERR_TLS_REQD` (EXPORT_NAME, which
//! cannot be refused politely, ends the connection), and a client that sends
//! [`MAX_OPTIONS_BEFORE_TLS`] of them without upgrading is disconnected. STARTTLS is
//! acknowledged in plaintext, then the TLS handshake runs on the same socket and
//! haggling starts over inside it (what was negotiated before is forgotten, as the
//! protocol requires). A failed TLS handshake (no certificate, one from another CA,
//! garbage) is logged with the client's address and rustls's reason.
//!
//! Allow lists: an export whose allow list does not name the client's certificate is
//! answered `NBD_REP_ERR_POLICY` for INFO, GO and the metadata-context options, and is
//! left out of LIST.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use drivers::io::tls::Stream;
use drivers::{Bdev, DeviceInfo};

use super::meta;
use super::proto::{self, ReplyMode};
use super::{Exports, Identity, Session};

/// How long a client may take to finish option haggling.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a refused client is answered before the connection closes.
pub const REFUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Options a refused client may send.
const REFUSE_OPTIONS: usize = 16;
/// Options a client may send on a TLS-only server before it must have upgraded.
pub const MAX_OPTIONS_BEFORE_TLS: usize = 16;

/// The outcome of a successful handshake.
pub struct Negotiated {
    pub bdev: Arc<Bdev>,
    pub mode: ReplyMode,
    /// The metadata contexts selected for this export, in id order.
    pub contexts: Vec<meta::Context>,
    /// The largest request payload accepted.
    pub max_block: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

#[derive(Default)]
struct State {
    structured: bool,
    extended: bool,
    /// The export metadata contexts were selected for, and those contexts.
    meta: Option<(String, Vec<meta::Context>)>,
    /// The client certificate's common name, once TLS is up.
    cn: Option<String>,
}

impl State {
    fn who(&self) -> Identity<'_> {
        Identity(self.cn.as_deref())
    }

    fn mode(&self) -> ReplyMode {
        if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }
}

/// Transmission flags for a device.
pub fn transmission_flags(info: &DeviceInfo, structured: bool) -> u16 {
    let mut f = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_CACHE;
    if info.can_multi_conn {
        f |= proto::FLAG_CAN_MULTI_CONN;
    }
    if info.read_only {
        f |= proto::FLAG_READ_ONLY;
    } else {
        if info.can_discard {
            f |= proto::FLAG_SEND_TRIM;
        }
        if info.can_write_zeroes {
            f |= proto::FLAG_SEND_WRITE_ZEROES;
        }
        if info.can_fast_zero {
            f |= proto::FLAG_SEND_FAST_ZERO;
        }
    }
    if structured {
        f |= proto::FLAG_SEND_DF;
    }
    f
}

/// Block sizes to advertise: (minimum, preferred, maximum).
pub fn block_sizes(info: &DeviceInfo) -> (u32, u32, u32) {
    let min = info.min_block_size.clamp(1, 64 << 10).next_power_of_two();
    let pref = info.preferred_block_size.max(min).max(512).next_power_of_two();
    let dma_max = poller::dma::max_len() as u32;
    let max = info.max_transfer.min(dma_max).max(pref);
    (min, pref, max - max % min)
}

async fn send_rep(sock: &Stream, opt: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&proto::REP_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    sock.write_all(&b).await
}

async fn send_err(sock: &Stream, opt: u32, kind: u32, msg: &str) -> io::Result<()> {
    send_rep(sock, opt, kind, msg.as_bytes()).await
}

fn export_info(bdev: &Bdev, structured: bool) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
    p.extend_from_slice(&bdev.info().size.to_be_bytes());
    p.extend_from_slice(&transmission_flags(&bdev.info(), structured).to_be_bytes());
    p
}

async fn send_greeting(sock: &Stream) -> Result<u32, HandshakeError> {
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting[16..]
        .copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    sock.write_all(&greeting).await?;
    let mut cf = [0u8; 4];
    sock.read_exact(&mut cf).await?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    Ok(client_flags)
}

/// Reads one option header and its data (bounded by `MAX_OPTION_LEN`).
async fn read_option(sock: &Stream) -> Result<(u32, Vec<u8>), HandshakeError> {
    let mut h = [0u8; 16];
    sock.read_exact(&mut h).await?;
    let magic = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    let opt = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
    if magic != proto::IHAVEOPT {
        return Err(HandshakeError::Protocol(format!("bad option magic {magic:#x}")));
    }
    if len > proto::MAX_OPTION_LEN {
        return Err(HandshakeError::Protocol(format!("option {opt} with {len} bytes of data")));
    }
    let mut data = vec![0u8; len as usize];
    sock.read_exact(&mut data).await?;
    Ok((opt, data))
}

/// Haggling with a client the server will not serve (over `max_connections`): every
/// option gets `NBD_REP_ERR_POLICY` with `why`, until the client aborts or gives up.
/// `NBD_OPT_EXPORT_NAME` cannot be answered with an error; it ends the connection.
pub async fn refuse(sock: &Stream, why: &str) -> Result<(), HandshakeError> {
    send_greeting(sock).await?;
    for _ in 0..REFUSE_OPTIONS {
        let (opt, _) = read_option(sock).await?;
        match opt {
            proto::OPT_EXPORT_NAME => return Ok(()),
            proto::OPT_ABORT => {
                let _ = send_rep(sock, opt, proto::REP_ACK, &[]).await;
                return Ok(());
            }
            _ => send_err(sock, opt, proto::REP_ERR_POLICY, why).await?,
        }
    }
    Ok(())
}

/// Runs option haggling. `Ok(None)` means the client ended the session cleanly (or
/// was refused and told why).
pub async fn negotiate(
    sock: &mut Stream,
    session: &Session,
) -> Result<Option<Negotiated>, HandshakeError> {
    let client_flags = send_greeting(sock).await?;
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    if let Some(tls) = &session.tls
        && !require_tls(sock, session, tls).await?
    {
        return Ok(None);
    }
    let exports = &*session.exports;
    let mut st = State { cn: sock.peer_common_name(), ..State::default() };
    loop {
        let (opt, data) = read_option(sock).await?;
        let len = data.len();
        match opt {
            proto::OPT_EXPORT_NAME => {
                if st.extended {
                    return Err(HandshakeError::Protocol(
                        "NBD_OPT_EXPORT_NAME after extended headers".into(),
                    ));
                }
                let name = String::from_utf8_lossy(&data);
                let Some(bdev) = exports.find(&name) else {
                    // This option cannot fail politely: the spec says to disconnect.
                    return Err(HandshakeError::Protocol(format!("no export named {name:?}")));
                };
                if !exports.permits(&name, st.who()) {
                    log_not_allowed(
                        session,
                        &st,
                        bdev.name(),
                        "NBD_OPT_EXPORT_NAME (disconnected)",
                    );
                    return Ok(None);
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&bdev.info().size.to_be_bytes());
                b.extend_from_slice(&transmission_flags(&bdev.info(), st.structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                sock.write_all(&b).await?;
                return Ok(Some(finish(bdev, &st)));
            }
            proto::OPT_ABORT => {
                let _ = send_rep(sock, opt, proto::REP_ACK, &[]).await;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if len != 0 {
                    send_err(sock, opt, proto::REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await?;
                    continue;
                }
                for name in exports.names(st.who()) {
                    let mut p = Vec::with_capacity(4 + name.len());
                    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    p.extend_from_slice(name.as_bytes());
                    send_rep(sock, opt, proto::REP_SERVER, &p).await?;
                }
                send_rep(sock, opt, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_STARTTLS => {
                let msg = if sock.is_tls() {
                    "TLS is already negotiated"
                } else {
                    "TLS is not configured on this server"
                };
                let kind =
                    if sock.is_tls() { proto::REP_ERR_INVALID } else { proto::REP_ERR_POLICY };
                send_err(sock, opt, kind, msg).await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let Some(req) = proto::parse_info_request(&data) else {
                    send_err(sock, opt, proto::REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
                        .await?;
                    continue;
                };
                let Some(bdev) = exports.find(req.name) else {
                    let msg = format!("no export named {:?}", req.name);
                    send_err(sock, opt, proto::REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                if !exports.permits(req.name, st.who()) {
                    refuse_export(sock, opt, session, &st, bdev.name()).await?;
                    continue;
                }
                send_rep(sock, opt, proto::REP_INFO, &export_info(&bdev, st.structured)).await?;
                let (min, pref, max) = block_sizes(&bdev.info());
                let mut p = Vec::with_capacity(14);
                p.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
                p.extend_from_slice(&min.to_be_bytes());
                p.extend_from_slice(&pref.to_be_bytes());
                p.extend_from_slice(&max.to_be_bytes());
                send_rep(sock, opt, proto::REP_INFO, &p).await?;
                if req.infos.contains(&proto::INFO_NAME) {
                    let mut p = Vec::new();
                    p.extend_from_slice(&proto::INFO_NAME.to_be_bytes());
                    p.extend_from_slice(bdev.name().as_bytes());
                    send_rep(sock, opt, proto::REP_INFO, &p).await?;
                }
                send_rep(sock, opt, proto::REP_ACK, &[]).await?;
                if opt == proto::OPT_GO {
                    return Ok(Some(finish(bdev, &st)));
                }
            }
            proto::OPT_STRUCTURED_REPLY | proto::OPT_EXTENDED_HEADERS => {
                if len != 0 {
                    send_err(sock, opt, proto::REP_ERR_INVALID, "this option takes no data")
                        .await?;
                    continue;
                }
                if st.extended && opt == proto::OPT_STRUCTURED_REPLY {
                    send_err(
                        sock,
                        opt,
                        proto::REP_ERR_INVALID,
                        "extended headers already negotiated",
                    )
                    .await?;
                    continue;
                }
                st.structured = true;
                st.extended |= opt == proto::OPT_EXTENDED_HEADERS;
                // A change of reply framing resets the selected metadata contexts.
                st.meta = None;
                send_rep(sock, opt, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                meta_context(sock, opt, &data, session, &mut st).await?;
            }
            _ => {
                let msg = format!("option {opt} is not supported");
                send_err(sock, opt, proto::REP_ERR_UNSUP, &msg).await?;
            }
        }
    }
}

async fn meta_context(
    sock: &Stream,
    opt: u32,
    data: &[u8],
    session: &Session,
    st: &mut State,
) -> io::Result<()> {
    let exports: &Exports = &session.exports;
    let set = opt == proto::OPT_SET_META_CONTEXT;
    if !st.structured {
        return send_err(sock, opt, proto::REP_ERR_INVALID, "negotiate structured replies first")
            .await;
    }
    let Some(req) = proto::parse_meta_request(data) else {
        return send_err(sock, opt, proto::REP_ERR_INVALID, "malformed metadata context request")
            .await;
    };
    let Some(bdev) = exports.find(req.name) else {
        let msg = format!("no export named {:?}", req.name);
        return send_err(sock, opt, proto::REP_ERR_UNKNOWN, &msg).await;
    };
    if !exports.permits(req.name, st.who()) {
        return refuse_export(sock, opt, session, st, bdev.name()).await;
    }
    let selected = meta::select(&bdev, &req.queries, !set);
    for (i, c) in selected.iter().enumerate() {
        let name = c.name();
        let mut p = Vec::with_capacity(4 + name.len());
        let id = if set { i as u32 + 1 } else { 0 };
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(name.as_bytes());
        send_rep(sock, opt, proto::REP_META_CONTEXT, &p).await?;
    }
    if set {
        st.meta = Some((bdev.name().to_string(), selected));
    }
    send_rep(sock, opt, proto::REP_ACK, &[]).await
}

/// Before STARTTLS on a TLS-only server: every option but ABORT and STARTTLS is
/// answered `NBD_REP_ERR_TLS_REQD`; STARTTLS runs the TLS handshake. True once TLS is
/// up; false when the client aborted, gave up or failed TLS (each logged).
async fn require_tls(
    sock: &mut Stream,
    session: &Session,
    tls: &Arc<rustls::ServerConfig>,
) -> Result<bool, HandshakeError> {
    let peer = &session.peer;
    for _ in 0..MAX_OPTIONS_BEFORE_TLS {
        let (opt, data) = read_option(sock).await?;
        match opt {
            proto::OPT_STARTTLS if data.is_empty() => {
                send_rep(sock, opt, proto::REP_ACK, &[]).await?;
                return start_tls(sock, session, tls).await;
            }
            proto::OPT_ABORT => {
                let _ = send_rep(sock, opt, proto::REP_ACK, &[]).await;
                return Ok(false);
            }
            proto::OPT_EXPORT_NAME => {
                tracing::warn!(
                    client = peer,
                    "NBD client refused: NBD_OPT_EXPORT_NAME without TLS on a server that \
                     requires TLS; disconnected"
                );
                return Ok(false);
            }
            _ => {
                tracing::warn!(
                    client = peer,
                    option = opt,
                    "NBD client refused: option {opt} without TLS; answered \
                     NBD_REP_ERR_TLS_REQD (this server requires TLS: NBD_OPT_STARTTLS first)"
                );
                let msg = "this server requires TLS: send NBD_OPT_STARTTLS first";
                send_err(sock, opt, proto::REP_ERR_TLS_REQD, msg).await?;
            }
        }
    }
    tracing::warn!(
        client = peer,
        "NBD client refused: {MAX_OPTIONS_BEFORE_TLS} options without upgrading to TLS; \
         disconnected"
    );
    Ok(false)
}

/// The TLS handshake after STARTTLS was acknowledged.
async fn start_tls(
    sock: &mut Stream,
    session: &Session,
    tls: &Arc<rustls::ServerConfig>,
) -> Result<bool, HandshakeError> {
    let conn = rustls::ServerConnection::new(tls.clone())
        .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
    sock.start_tls(rustls::Connection::Server(conn));
    if let Err(e) = sock.handshake().await {
        tracing::warn!(client = session.peer, "NBD client refused: TLS handshake failed: {e}");
        return Ok(false);
    }
    let cn = sock.peer_common_name();
    tracing::info!(
        client = session.peer,
        identity = cn.as_deref().unwrap_or("(no client certificate)"),
        "NBD client upgraded to TLS"
    );
    Ok(true)
}

fn log_not_allowed(session: &Session, st: &State, export: &str, answer: &str) {
    tracing::warn!(
        client = session.peer,
        identity = st.cn.as_deref().unwrap_or("(no client certificate)"),
        export,
        "NBD client refused: its identity is not in the export's allow list; answered {answer}"
    );
}

async fn refuse_export(
    sock: &Stream,
    opt: u32,
    session: &Session,
    st: &State,
    export: &str,
) -> io::Result<()> {
    log_not_allowed(session, st, export, "NBD_REP_ERR_POLICY");
    let msg = format!("this client may not open export {export:?}");
    send_err(sock, opt, proto::REP_ERR_POLICY, &msg).await
}

fn finish(bdev: Arc<Bdev>, st: &State) -> Negotiated {
    let contexts = match &st.meta {
        Some((name, c)) if name == bdev.name() => c.clone(),
        _ => Vec::new(),
    };
    let (_, _, max_block) = block_sizes(&bdev.info());
    Negotiated { bdev, mode: st.mode(), contexts, max_block }
}
