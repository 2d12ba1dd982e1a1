//! Renders a [`Config`] back to TOML, for `config_get` on the control socket and
//! `appliance ctl config`: the running configuration, with the changes made since
//! start-up, in the same keys the file uses. Paths come out absolute (as validated),
//! so the text parses back to the same `Config` wherever it is saved.

use toml::{Table, Value};

use crate::{Config, Disk, Format, Hugepages, IdlePolicy, SocketPerms, TlsFiles};

fn int(v: u64) -> Value {
    // TOML integers are i64; every size the appliance accepts fits.
    Value::Integer(i64::try_from(v).unwrap_or(i64::MAX))
}

fn path(p: &std::path::Path) -> Value {
    Value::String(p.display().to_string())
}

impl Config {
    /// The configuration as TOML text that [`Config::parse`] reads back unchanged.
    pub fn to_toml(&self) -> String {
        let mut root = Table::new();
        let a = &self.appliance;
        let mut t = Table::new();
        t.insert("cores".into(), Value::Array(a.cores.iter().map(|&c| int(c as u64)).collect()));
        t.insert(
            "idle".into(),
            Value::String(
                match a.idle {
                    IdlePolicy::Busy => "busy",
                    IdlePolicy::Adaptive => "adaptive",
                }
                .into(),
            ),
        );
        let hugepages = match a.hugepages {
            Hugepages::Auto => Value::String("auto".into()),
            Hugepages::On => Value::Boolean(true),
            Hugepages::Off => Value::Boolean(false),
        };
        t.insert("hugepages".into(), hugepages);
        t.insert("buffer_pool".into(), int(a.buffer_pool_bytes));
        if let Some(d) = &a.state_dir {
            t.insert("state_dir".into(), Value::String(d.display().to_string()));
        }
        root.insert("appliance".into(), Value::Table(t));
        if let Some(n) = &self.nbd {
            let mut t = Table::new();
            t.insert(
                "listen".into(),
                Value::Array(n.listen.iter().map(|l| Value::String(l.to_string())).collect()),
            );
            t.insert("max_connections".into(), int(u64::from(n.max_connections)));
            let secs =
                |d: Option<std::time::Duration>| Value::Float(d.map_or(0.0, |d| d.as_secs_f64()));
            t.insert("idle_timeout".into(), secs(n.idle_timeout));
            t.insert("stall_timeout".into(), secs(Some(n.stall_timeout)));
            t.insert("socket_io".into(), Value::String(n.socket_io.name().into()));
            t.insert("zero_copy_send".into(), Value::String(n.zero_copy_send.name().into()));
            let ms = if n.multishot_receive { "on" } else { "off" };
            t.insert("multishot_receive".into(), Value::String(ms.into()));
            perms(&mut t, &n.socket_perms, "socket_");
            if let Some(f) = &n.tls {
                t.insert("tls".into(), Value::Table(tls(f)));
            }
            if let Some(f) = &n.client_tls {
                t.insert("client_tls".into(), Value::Table(tls(f)));
            }
            root.insert("nbd".into(), Value::Table(t));
        }
        if let Some(m) = &self.metrics {
            let mut t = Table::new();
            t.insert("listen".into(), Value::String(m.to_string()));
            root.insert("metrics".into(), Value::Table(t));
        }
        if let Some(c) = &self.control {
            let mut t = Table::new();
            t.insert("socket".into(), path(&c.socket));
            perms(&mut t, &c.perms, "");
            if !c.allowed_target_dirs.is_empty() {
                let dirs = c.allowed_target_dirs.iter().map(|p| path(p)).collect();
                t.insert("allowed_target_dirs".into(), Value::Array(dirs));
            }
            root.insert("control".into(), Value::Table(t));
        }
        if !self.disks.is_empty() {
            root.insert(
                "disk".into(),
                Value::Array(self.disks.iter().map(|d| Value::Table(disk(d))).collect()),
            );
        }
        toml::to_string(&root).unwrap_or_default()
    }
}

/// One `[[disk]]` table.
pub fn disk(d: &Disk) -> Table {
    let mut t = Table::new();
    t.insert("name".into(), Value::String(d.name.clone()));
    if let Some(p) = &d.path {
        t.insert("path".into(), path(p));
    }
    t.insert(
        "format".into(),
        Value::String(
            match d.format {
                Format::Raw => "raw",
                Format::Qcow2 => "qcow2",
            }
            .into(),
        ),
    );
    t.insert("driver".into(), Value::String(d.driver.name().into()));
    if d.driver.uses_file() {
        t.insert("direct".into(), Value::Boolean(d.direct));
    }
    t.insert("read_only".into(), Value::Boolean(d.read_only));
    if let Some(s) = d.size {
        t.insert("size".into(), int(s));
    }
    // Any format: a raw disk may name them too (they are kept, and unused), and
    // leaving them out would bring back the default on the next parse.
    if !d.allowed_backing_dirs.is_empty() {
        t.insert(
            "allowed_backing_dirs".into(),
            Value::Array(d.allowed_backing_dirs.iter().map(|p| path(p)).collect()),
        );
    }
    if let Some(n) = d.shards {
        t.insert("shards".into(), int(n as u64));
    }
    if let Some(b) = d.l2_cache_bytes {
        t.insert("l2_cache".into(), int(b));
    }
    if let Some(b) = d.refcount_cache_bytes {
        t.insert("refcount_cache".into(), int(b));
    }
    if let Some(v) = &d.vhost_user_blk {
        let mut vt = Table::new();
        vt.insert("socket".into(), path(&v.socket));
        vt.insert("queues".into(), int(u64::from(v.queues)));
        perms(&mut vt, &v.perms, "");
        t.insert("vhost_user_blk".into(), Value::Table(vt));
    }
    if let Some(q) = &d.qos {
        let mut qt = Table::new();
        qt.insert("iops".into(), int(q.iops));
        qt.insert("bandwidth".into(), Value::String(q.bandwidth.to_string()));
        qt.insert("burst".into(), Value::Float(q.burst));
        t.insert("qos".into(), Value::Table(qt));
    }
    if let Some(k) = &d.encryption_key_file {
        let mut et = Table::new();
        et.insert("key_file".into(), Value::String(k.display().to_string()));
        t.insert("encryption".into(), Value::Table(et));
    }
    if let Some(r) = &d.rbd {
        let mut rt = Table::new();
        rt.insert("conf".into(), path(&r.conf));
        if let Some(id) = &r.id {
            rt.insert("id".into(), Value::String(id.clone()));
        }
        if let Some(k) = &r.keyring {
            rt.insert("keyring".into(), path(k));
        }
        rt.insert("timeout".into(), Value::Float(r.timeout.as_secs_f64()));
        t.insert("rbd".into(), Value::Table(rt));
    }
    if let Some(allow) = &d.nbd_allow {
        let mut nt = Table::new();
        let list = allow.iter().map(|cn| Value::String(format!("CN={cn}"))).collect();
        nt.insert("allow".into(), Value::Array(list));
        t.insert("nbd".into(), Value::Table(nt));
    }
    t
}

/// Owner, group and mode keys (with `prefix` before each name).
fn perms(t: &mut Table, p: &SocketPerms, prefix: &str) {
    t.insert(format!("{prefix}mode"), int(u64::from(p.mode)));
    if let Some(o) = p.owner {
        t.insert(format!("{prefix}owner"), int(u64::from(o)));
    }
    if let Some(g) = p.group {
        t.insert(format!("{prefix}group"), int(u64::from(g)));
    }
}

fn tls(f: &TlsFiles) -> Table {
    let mut t = Table::new();
    t.insert("cert".into(), path(&f.cert));
    t.insert("key".into(), path(&f.key));
    if let Some(ca) = &f.ca {
        t.insert("ca".into(), path(ca));
    }
    t
}
