//! NBD URIs (the NBD project's doc/uri.md, as qemu-img and libnbd take them):
//! `nbd://HOST[:PORT]/EXPORT` over TCP (port 10809 by default) and
//! `nbd+unix:///EXPORT?socket=PATH` over a unix socket, and their TLS forms `nbds://`
//! and `nbds+unix://` (STARTTLS with the credentials of `[nbd.client_tls]`).

use std::path::PathBuf;

/// The default NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
    /// `nbds` or `nbds+unix`: the connection must upgrade to TLS.
    pub tls: bool,
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.tls { "s" } else { "" };
        match &self.address {
            Address::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{}", self.export),
            Address::Unix(p) => {
                write!(f, "nbd{s}+unix:///{}?socket={}", self.export, p.display())
            }
        }
    }
}

/// Undoes %XX escapes.
fn unescape(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("a `%` escape is cut short")?;
            out.push(
                u8::from_str_radix(hex, 16).map_err(|_| format!("`%{hex}` is not an escape"))?,
            );
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the export name is not UTF-8".to_string())
}

impl NbdUri {
    /// Parses `s`; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<NbdUri, String> {
        let (scheme, rest) = s.split_once("://").ok_or("not a URI (no `://`)")?;
        let tls = scheme == "nbds" || scheme == "nbds+unix";
        let scheme = match scheme {
            "nbds" => "nbd",
            "nbds+unix" => "nbd+unix",
            other => other,
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        let export = unescape(path)?;
        if export.len() > 4096 {
            return Err("the export name is longer than 4096 bytes".into());
        }
        let address = match scheme {
            "nbd" => {
                if query.is_some() {
                    return Err("`nbd://` takes no query (did you mean `nbd+unix://`?)".into());
                }
                let (host, port) = match authority.rsplit_once(':') {
                    Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                        (h, p.parse::<u16>().map_err(|_| format!("port `{p}` is not a number"))?)
                    }
                    _ => (authority, DEFAULT_PORT),
                };
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if host.is_empty() {
                    return Err("no host".into());
                }
                Address::Tcp { host: host.to_string(), port }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(
                        "`nbd+unix://` takes no host: nbd+unix:///EXPORT?socket=PATH".into()
                    );
                }
                let socket = query
                    .into_iter()
                    .flat_map(|q| q.split('&'))
                    .find_map(|kv| kv.strip_prefix("socket="))
                    .ok_or("no `socket=PATH` in the query")?;
                Address::Unix(PathBuf::from(unescape(socket)?))
            }
            other => {
                return Err(format!(
                    "scheme `{other}` is not nbd://, nbd+unix://, nbds:// or nbds+unix://"
                ));
            }
        };
        Ok(NbdUri { address, export, tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_and_unix_uris() {
        let u = NbdUri::parse("nbd://127.0.0.1:10810/vm1").unwrap();
        assert_eq!(u.address, Address::Tcp { host: "127.0.0.1".into(), port: 10810 });
        assert_eq!(u.export, "vm1");
        let u = NbdUri::parse("nbd://host/").unwrap();
        assert_eq!(u.address, Address::Tcp { host: "host".into(), port: DEFAULT_PORT });
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[::1]:99/a%20b").unwrap();
        assert_eq!(u.address, Address::Tcp { host: "::1".into(), port: 99 });
        assert_eq!(u.export, "a b");
        let u = NbdUri::parse("nbd+unix:///d?socket=/run/x.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/run/x.sock".into()));
        assert_eq!(u.to_string(), "nbd+unix:///d?socket=/run/x.sock");
        assert!(!u.tls);
        let u = NbdUri::parse("nbds://h:1/e").unwrap();
        assert!(u.tls && u.export == "e");
        assert_eq!(u.to_string(), "nbds://h:1/e");
        let u = NbdUri::parse("nbds+unix:///e?socket=/s").unwrap();
        assert!(u.tls && u.address == Address::Unix("/s".into()));
    }

    #[test]
    fn bad_uris_say_why() {
        for (s, why) in [
            ("/tmp/x", "://"),
            ("nbds:///x", "host"),
            ("http://h/x", "scheme"),
            ("nbd://h:port/x", "port"),
            ("nbd:///x", "host"),
            ("nbd+unix:///x", "socket"),
            ("nbd+unix://h/x?socket=/s", "no host"),
            ("nbd://h/%zz", "escape"),
        ] {
            let e = NbdUri::parse(s).unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}
