//! The security keys: TLS credentials for the NBD server and client, per-export allow
//! lists, owners and modes of the unix sockets the appliance creates, and the
//! directories control-socket targets must lie in.
//!
//! Validation here is about shape (a key file is named, an allow entry is a `CN=`, a
//! mode fits in nine permission bits, a user name exists on this host). Whether a
//! certificate parses, matches its key and is still valid is checked by the appliance
//! when it loads the files (at start and on every reload), where the error can name the
//! file and the reason together.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfigError, Validator};

/// The mode of a unix socket when the config does not give one: the appliance's user
/// alone may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Owner, group and permission bits of a unix socket the appliance creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPerms {
    /// A numeric user id (names are resolved during validation); `None`: the
    /// appliance's own user.
    pub owner: Option<u32>,
    /// A numeric group id; `None`: the appliance's primary group.
    pub group: Option<u32>,
    /// Permission bits (`0o600` and the like).
    pub mode: u32,
}

impl Default for SocketPerms {
    fn default() -> Self {
        SocketPerms { owner: None, group: None, mode: DEFAULT_SOCKET_MODE }
    }
}

/// Certificate files for one end of TLS (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This end's certificate chain.
    pub cert: PathBuf,
    /// This end's private key.
    pub key: PathBuf,
    /// The CA that must have signed the peer's certificate. On the server, `None`
    /// means clients need no certificate; on the client, `None` means the system has
    /// no trust anchors to offer, so it is required there.
    pub ca: Option<PathBuf>,
}

/// `owner` or `group`: a name or a numeric id.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawId {
    Number(u32),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub ca: Option<Spanned<String>>,
    pub psk_file: Option<Spanned<String>>,
}

/// `[disk.encryption]`: where the key of a LUKS-encrypted image is (never the key).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDiskEncryption {
    pub key_file: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDiskNbd {
    pub allow: Option<Vec<Spanned<String>>>,
}

/// Unix socket permission keys as they appear in a table (`owner`, `group`, `mode`, or
/// with a `socket_` prefix in `[nbd]`).
pub(crate) struct RawPerms {
    pub owner: Option<Spanned<RawId>>,
    pub group: Option<Spanned<RawId>>,
    pub mode: Option<Spanned<i64>>,
}

impl Validator {
    /// `[nbd.tls]` or `[nbd.client_tls]`.
    pub(crate) fn tls_files(
        &self,
        raw: RawTls,
        key: &str,
        ca_required: bool,
    ) -> Result<TlsFiles, ConfigError> {
        if let Some(p) = raw.psk_file {
            let m = "TLS-PSK is not offered: rustls has no external pre-shared keys; use \
                     certificates (cert, key, ca)";
            return Err(self.err(p.span(), &format!("{key}.psk_file"), m.into()));
        }
        let file = |v: &Spanned<String>, k: &str| -> Result<PathBuf, ConfigError> {
            if v.get_ref().is_empty() {
                return Err(self.err(v.span(), &format!("{key}.{k}"), "names no file".into()));
            }
            Ok(self.resolve(v.get_ref()))
        };
        let ca = raw.ca.as_ref().map(|c| file(c, "ca")).transpose()?;
        if ca.is_none() && ca_required {
            let m = "needs `ca`: the CA that signed the servers' certificates";
            return Err(self.err(raw.cert.span(), key, m.into()));
        }
        Ok(TlsFiles { cert: file(&raw.cert, "cert")?, key: file(&raw.key, "key")?, ca })
    }

    /// `[disk.nbd] allow`: `CN=<common name>` entries, kept as the common names.
    pub(crate) fn allow_list(
        &self,
        raw: Vec<Spanned<String>>,
        key: &str,
    ) -> Result<Vec<String>, ConfigError> {
        let mut out = Vec::with_capacity(raw.len());
        for entry in raw {
            match entry.get_ref().strip_prefix("CN=") {
                Some(cn) if !cn.is_empty() && !cn.chars().any(char::is_control) => {
                    out.push(cn.to_string())
                }
                _ => {
                    let m = format!(
                        "`{}`: an entry is a client certificate's common name, as \"CN=host-a\"",
                        entry.get_ref()
                    );
                    return Err(self.err(entry.span(), key, m));
                }
            }
        }
        Ok(out)
    }

    /// Owner, group and mode keys; `prefix` is the table's key path with the keys' own
    /// prefix (`control.`, `nbd.socket_`).
    pub(crate) fn socket_perms(
        &self,
        raw: RawPerms,
        prefix: &str,
    ) -> Result<SocketPerms, ConfigError> {
        let mut perms = SocketPerms::default();
        if let Some(m) = raw.mode {
            let v = *m.get_ref();
            if !(0..=0o777).contains(&v) || v & 0o600 != 0o600 {
                let msg = format!(
                    "{v:#o}: must be permission bits (0o600 to 0o777, as the octal 0o660) \
                     that let the owner read and write"
                );
                return Err(self.err(m.span(), &format!("{prefix}mode"), msg));
            }
            perms.mode = v as u32;
        }
        if let Some(o) = raw.owner {
            perms.owner = Some(self.id(o, &format!("{prefix}owner"), lookup_user)?);
        }
        if let Some(g) = raw.group {
            perms.group = Some(self.id(g, &format!("{prefix}group"), lookup_group)?);
        }
        Ok(perms)
    }

    fn id(
        &self,
        v: Spanned<RawId>,
        key: &str,
        lookup: fn(&str) -> Option<u32>,
    ) -> Result<u32, ConfigError> {
        let span = v.span();
        match v.into_inner() {
            RawId::Number(n) => Ok(n),
            RawId::Name(name) => match name.parse::<u32>().ok().or_else(|| lookup(&name)) {
                Some(id) => Ok(id),
                None => Err(self.err(span, key, format!("`{name}`: no such name on this host"))),
            },
        }
    }

    /// `[control] allowed_target_dirs`: absolute directories (relative ones follow the
    /// config file).
    pub(crate) fn target_dirs(
        &self,
        raw: Option<Vec<Spanned<String>>>,
    ) -> Result<Vec<PathBuf>, ConfigError> {
        let mut out = Vec::new();
        for d in raw.unwrap_or_default() {
            if d.get_ref().is_empty() {
                let m = "names no directory".to_string();
                return Err(self.err(d.span(), "control.allowed_target_dirs", m));
            }
            let p = self.resolve(d.get_ref());
            if self.require_files && !p.is_dir() {
                let m = format!("{} is not a directory", p.display());
                return Err(self.err(d.span(), "control.allowed_target_dirs", m));
            }
            out.push(p);
        }
        Ok(out)
    }
}

/// The numeric id of a user name, from the host's user database.
fn lookup_user(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: passwd is plain old data; getpwnam_r fills it.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` is as long as we say.
    let r = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    (r == 0 && !out.is_null()).then_some(pw.pw_uid)
}

/// The numeric id of a group name, from the host's group database.
fn lookup_group(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 64 << 10];
    // SAFETY: group is plain old data; getgrnam_r fills it.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` is as long as we say.
    let r = unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
    (r == 0 && !out.is_null()).then_some(gr.gr_gid)
}
