//! `driver = "rbd"`: a disk in a Ceph cluster. `path` names the image
//! (`rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE`); `[disk.rbd]` says how to reach the
//! cluster (its `ceph.conf`, the client id and keyring) and how long a request may wait
//! on it before it fails.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfigError, Validator};

/// Default of `[disk.rbd] timeout`: how long a request (and connecting) may wait for
/// the cluster before it fails with EIO.
pub const DEFAULT_RBD_TIMEOUT: Duration = Duration::from_secs(30);
/// The cluster configuration read when `[disk.rbd] conf` is not given.
pub const DEFAULT_CEPH_CONF: &str = "/etc/ceph/ceph.conf";

/// An RBD image's name in its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RbdImage {
    pub pool: String,
    /// The RADOS namespace inside the pool; empty: the default one.
    pub namespace: String,
    pub image: String,
}

impl RbdImage {
    /// Parses `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE`.
    pub fn parse(s: &str) -> Result<RbdImage, String> {
        let bad = || format!("`{s}` is not rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE");
        let rest = s.strip_prefix("rbd:").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 255
                && !p.chars().any(|c| c.is_control() || c == '@' || c == ':')
        };
        match parts.as_slice() {
            [pool, image] if ok(pool) && ok(image) => Ok(RbdImage {
                pool: (*pool).into(),
                namespace: String::new(),
                image: (*image).into(),
            }),
            [pool, ns, image] if ok(pool) && ok(ns) && ok(image) => Ok(RbdImage {
                pool: (*pool).into(),
                namespace: (*ns).into(),
                image: (*image).into(),
            }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for RbdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "rbd:{}/{}", self.pool, self.image)
        } else {
            write!(f, "rbd:{}/{}/{}", self.pool, self.namespace, self.image)
        }
    }
}

/// How to reach a Ceph cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RbdCluster {
    /// The `ceph.conf` to read (monitor addresses, options).
    pub conf: PathBuf,
    /// The client id (`appliance` is `client.appliance`); `None`: librados's default
    /// (`admin`).
    pub id: Option<String>,
    /// The keyring holding the client's key; `None`: what `conf` says.
    pub keyring: Option<PathBuf>,
    /// How long connecting, and each request, may wait for the cluster.
    pub timeout: Duration,
}

impl Default for RbdCluster {
    fn default() -> Self {
        RbdCluster {
            conf: PathBuf::from(DEFAULT_CEPH_CONF),
            id: None,
            keyring: None,
            timeout: DEFAULT_RBD_TIMEOUT,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDiskRbd {
    pub conf: Option<Spanned<String>>,
    pub id: Option<Spanned<String>>,
    pub keyring: Option<Spanned<String>>,
    pub timeout: Option<Spanned<f64>>,
}

impl Validator {
    /// The image an RBD disk's `path` names.
    pub(crate) fn rbd_path(
        &self,
        name_span: std::ops::Range<usize>,
        path: Option<Spanned<String>>,
        key: &dyn Fn(&str) -> String,
    ) -> Result<PathBuf, ConfigError> {
        let Some(p) = path else {
            let m = "driver rbd needs `path`: the image, such as \"rbd:POOL/IMAGE\"";
            return Err(self.err(name_span, &key("path"), m.into()));
        };
        RbdImage::parse(p.get_ref()).map_err(|m| self.err(p.span(), &key("path"), m))?;
        Ok(PathBuf::from(p.get_ref()))
    }

    /// `[disk.rbd]`, for an RBD disk only.
    pub(crate) fn disk_rbd(
        &self,
        raw: Option<Spanned<RawDiskRbd>>,
        is_rbd: bool,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Option<RbdCluster>, ConfigError> {
        let raw = match (raw, is_rbd) {
            (None, false) => return Ok(None),
            (Some(r), false) => {
                let m = "applies to driver \"rbd\" only";
                return Err(self.err(r.span(), &key("rbd"), m.into()));
            }
            (None, true) => return Ok(Some(RbdCluster::default())),
            (Some(r), true) => r.into_inner(),
        };
        let mut c = RbdCluster::default();
        if let Some(p) = raw.conf {
            c.conf = self.resolve(p.get_ref());
            if self.require_files && !c.conf.is_file() {
                let m = format!("{}: no such file", c.conf.display());
                return Err(self.err(p.span(), &key("rbd.conf"), m));
            }
        }
        if let Some(id) = raw.id {
            let v = id.get_ref();
            if v.is_empty() || v.starts_with("client.") || v.chars().any(|ch| ch.is_control()) {
                let m = format!(
                    "`{v}`: the client id without `client.` (\"appliance\" is client.appliance)"
                );
                return Err(self.err(id.span(), &key("rbd.id"), m));
            }
            c.id = Some(v.clone());
        }
        if let Some(p) = raw.keyring {
            let k = self.resolve(p.get_ref());
            if self.require_files && !k.is_file() {
                let m = format!("{}: no such file", k.display());
                return Err(self.err(p.span(), &key("rbd.keyring"), m));
            }
            c.keyring = Some(k);
        }
        if let Some(t) = raw.timeout {
            let v = *t.get_ref();
            if !(1.0..=3600.0).contains(&v) {
                let m = format!("{v}: must be 1 to 3600 seconds");
                return Err(self.err(t.span(), &key("rbd.timeout"), m));
            }
            c.timeout = Duration::from_secs_f64(v);
        }
        Ok(Some(c))
    }
}
