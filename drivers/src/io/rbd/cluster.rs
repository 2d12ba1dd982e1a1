//! Connections and image handles (control plane).
//!
//! One cluster connection per process for each way of reaching a cluster (`ceph.conf`,
//! client id, keyring, timeout): disks of one cluster share it, as librados intends
//! (its threads and monitor session are per connection). It lives while a disk uses
//! it. Every wait on the cluster is bounded by the disk's `timeout`: connecting
//! (`client_mount_timeout`, `rados_mon_op_timeout`) and each request
//! (`rados_osd_op_timeout`, after which librados fails it with ETIMEDOUT).

use std::ffi::{CString, c_int};
use std::sync::{Arc, Mutex, Weak};

use config::{RbdCluster, RbdImage};

use super::ffi::{self, ImageT, IoCtxT, Lib, RadosT};

/// A connected cluster.
pub(crate) struct Cluster {
    lib: &'static Lib,
    handle: RadosT,
    how: RbdCluster,
}

// SAFETY: a librados cluster handle may be used from any thread (librados is
// thread-safe); it is shut down once, in Drop, when no image uses it.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle was created by rados_create; every ioctx of it is gone
        // (images hold the cluster).
        unsafe { (self.lib.rados_shutdown)(self.handle) };
    }
}

static CLUSTERS: Mutex<Vec<Weak<Cluster>>> = Mutex::new(Vec::new());

/// The last failed connection to each cluster: disks of a cluster that is down fail at
/// once, for one `timeout` after an attempt that waited it out, instead of each waiting
/// it out again (twenty disks of a down cluster would hold up start-up twenty times).
static FAILED: Mutex<Vec<(RbdCluster, std::time::Instant, String)>> = Mutex::new(Vec::new());

fn cstr(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} `{s}` holds a NUL byte"))
}

/// The connection to the cluster `how` reaches, made on first use.
pub(crate) fn connect(how: &RbdCluster) -> Result<Arc<Cluster>, String> {
    let mut all = CLUSTERS.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|w| w.strong_count() > 0);
    if let Some(c) = all.iter().filter_map(Weak::upgrade).find(|c| c.how == *how) {
        return Ok(c);
    }
    let mut failed = FAILED.lock().unwrap_or_else(|p| p.into_inner());
    failed.retain(|(_, at, _)| at.elapsed() < how.timeout.max(std::time::Duration::from_secs(1)));
    if let Some((_, at, e)) = failed.iter().find(|(h, ..)| h == how) {
        return Err(format!(
            "{e} ({:.0} s ago; not retried within the timeout)",
            at.elapsed().as_secs_f64()
        ));
    }
    match new_connection(how) {
        Ok(c) => {
            let c = Arc::new(c);
            all.push(Arc::downgrade(&c));
            Ok(c)
        }
        Err((e, timed_out)) => {
            if timed_out {
                failed.push((how.clone(), std::time::Instant::now(), e.clone()));
            }
            Err(e)
        }
    }
}

/// A new connection, or why not and whether it was for want of an answer (timed out).
fn new_connection(how: &RbdCluster) -> Result<Cluster, (String, bool)> {
    configure(how).map_err(|e| (e, false)).and_then(|cluster| {
        // SAFETY: a configured handle; blocks at most client_mount_timeout.
        let rc = unsafe { (cluster.lib.rados_connect)(cluster.handle) };
        if rc >= 0 {
            return Ok(cluster);
        }
        let who = format!("client.{}", how.id.as_deref().unwrap_or("admin"));
        let timed_out = matches!(-rc, libc::ETIMEDOUT | libc::EINTR);
        let hint = match -rc {
            libc::EACCES | libc::EPERM => " (is the keyring's key for this client right?)",
            libc::ENOENT => " (no keyring with a key for this client: set [disk.rbd] keyring)",
            _ if timed_out => " (no monitor answered: is the cluster up?)",
            _ => "",
        };
        let conf = how.conf.display();
        let e = format!(
            "cannot connect to the cluster of {conf} as {who}: {}{hint}",
            ffi::errno_text(rc.into())
        );
        Err((e, timed_out))
    })
}

/// A cluster handle with `how`'s configuration, not yet connected.
fn configure(how: &RbdCluster) -> Result<Cluster, String> {
    let lib = ffi::lib()?;
    let id = how.id.as_deref().map(|i| cstr("client id", i)).transpose()?;
    let mut handle: RadosT = std::ptr::null_mut();
    // SAFETY: `handle` is an out-parameter; `id` is a C string or null (the default).
    let rc = unsafe {
        (lib.rados_create)(&mut handle, id.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
    };
    if rc < 0 {
        return Err(format!("cannot create a cluster handle: {}", ffi::errno_text(rc.into())));
    }
    // From here the handle is shut down by Cluster's Drop on every error.
    let cluster = Cluster { lib, handle, how: how.clone() };
    let conf = how.conf.to_string_lossy();
    // SAFETY: a live handle and a C string.
    let rc = unsafe { (lib.rados_conf_read_file)(handle, cstr("conf", &conf)?.as_ptr()) };
    if rc < 0 {
        return Err(format!(
            "cannot read the cluster configuration {conf}: {}",
            ffi::errno_text(rc.into())
        ));
    }
    let secs = how.timeout.as_secs().max(1).to_string();
    let mut options = vec![
        ("client_mount_timeout", secs.clone()),
        ("rados_mon_op_timeout", secs.clone()),
        ("rados_osd_op_timeout", secs),
    ];
    if let Some(k) = &how.keyring {
        options.push(("keyring", k.to_string_lossy().into_owned()));
    }
    for (k, v) in &options {
        // SAFETY: a live handle and C strings.
        let rc = unsafe {
            (lib.rados_conf_set)(handle, cstr("option", k)?.as_ptr(), cstr(k, v)?.as_ptr())
        };
        if rc < 0 {
            return Err(format!("cannot set {k} = {v}: {}", ffi::errno_text(rc.into())));
        }
    }
    Ok(cluster)
}

/// An open image, with the pool context it lives in.
pub(crate) struct Image {
    /// `rbd:POOL[/NS]/IMAGE`, for messages.
    pub(crate) name: String,
    pub(crate) lib: &'static Lib,
    pub(crate) handle: ImageT,
    ioctx: IoCtxT,
    /// Serialises growth (offload workers of several channels).
    grow: Mutex<()>,
    /// Requests that waited out the timeout (failed with EIO).
    pub(crate) timeouts: std::sync::atomic::AtomicU64,
    _cluster: Arc<Cluster>,
}

// SAFETY: librbd image handles are thread-safe (QEMU and SPDK submit from any thread);
// closed once, in Drop, after every channel (which holds the image) is gone.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: handles created by rbd_open and rados_ioctx_create, closed once;
        // rbd_close waits for requests still in flight.
        unsafe {
            (self.lib.rbd_close)(self.handle);
            (self.lib.rados_ioctx_destroy)(self.ioctx);
        }
    }
}

/// A pool context of `cluster` for `name`'s pool and namespace.
fn ioctx(cluster: &Cluster, name: &RbdImage) -> Result<IoCtxT, String> {
    let lib = cluster.lib;
    let mut io: IoCtxT = std::ptr::null_mut();
    // SAFETY: a connected handle, a C string and an out-parameter.
    let rc = unsafe {
        (lib.rados_ioctx_create)(cluster.handle, cstr("pool", &name.pool)?.as_ptr(), &mut io)
    };
    if rc == -libc::ENOENT {
        return Err(format!("pool `{}` does not exist", name.pool));
    }
    if rc < 0 {
        return Err(format!("cannot open pool `{}`: {}", name.pool, ffi::errno_text(rc.into())));
    }
    let ns = match cstr("namespace", &name.namespace) {
        Ok(ns) => ns,
        Err(e) => {
            // SAFETY: created above, not used elsewhere.
            unsafe { (lib.rados_ioctx_destroy)(io) };
            return Err(e);
        }
    };
    // SAFETY: a live context and a C string (empty: the default namespace).
    unsafe { (lib.rados_ioctx_set_namespace)(io, ns.as_ptr()) };
    Ok(io)
}

impl Image {
    /// Opens `name` (read-only: without taking its exclusive lock).
    pub(crate) fn open(
        how: &RbdCluster,
        name: &RbdImage,
        read_only: bool,
    ) -> Result<Image, String> {
        let cluster = connect(how)?;
        let lib = cluster.lib;
        let io = ioctx(&cluster, name)?;
        let mut handle: ImageT = std::ptr::null_mut();
        let image = cstr("image", &name.image)?;
        let open = if read_only { lib.rbd_open_read_only } else { lib.rbd_open };
        // SAFETY: a live context, a C string, an out-parameter; no snapshot.
        let rc = unsafe { open(io, image.as_ptr(), &mut handle, std::ptr::null()) };
        if rc < 0 {
            // SAFETY: created above, not used elsewhere.
            unsafe { (lib.rados_ioctx_destroy)(io) };
            return Err(match -rc {
                libc::ENOENT => {
                    format!("image `{}` does not exist in pool `{}`", name.image, name.pool)
                }
                _ => format!("cannot open the image: {}", ffi::errno_text(rc.into())),
            });
        }
        Ok(Image {
            name: name.to_string(),
            lib,
            handle,
            ioctx: io,
            grow: Mutex::new(()),
            timeouts: std::sync::atomic::AtomicU64::new(0),
            _cluster: cluster,
        })
    }

    fn query(
        &self,
        f: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
        what: &str,
    ) -> Result<u64, String> {
        let mut v = 0u64;
        // SAFETY: a live image and an out-parameter.
        let rc = unsafe { f(self.handle, &mut v) };
        if rc < 0 {
            return Err(format!("cannot read the image's {what}: {}", ffi::errno_text(rc.into())));
        }
        Ok(v)
    }

    pub(crate) fn size(&self) -> Result<u64, String> {
        self.query(self.lib.rbd_get_size, "size")
    }

    /// Whether the image keeps an object map with fast-diff that is valid, so that
    /// `rbd_diff_iterate2` answers from memory.
    pub(crate) fn fast_diff(&self) -> Result<bool, String> {
        let features = self.query(self.lib.rbd_get_features, "features")?;
        let flags = self.query(self.lib.rbd_get_flags, "flags")?;
        Ok(features & ffi::FEATURE_FAST_DIFF != 0 && flags & ffi::FLAG_FAST_DIFF_INVALID == 0)
    }

    pub(crate) fn features(&self) -> Result<u64, String> {
        self.query(self.lib.rbd_get_features, "features")
    }

    /// Grows the image to at least `len` bytes; never shrinks it (channels grow it
    /// concurrently, and a smaller target arriving late must not cut off a larger).
    pub(crate) fn grow_to(&self, len: u64) -> Result<(), String> {
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        if self.size()? < len {
            self.resize(len)?;
        }
        Ok(())
    }

    /// Sets the image's size (control plane or an offload worker).
    pub(crate) fn resize(&self, size: u64) -> Result<(), String> {
        // SAFETY: a live image.
        let rc = unsafe { (self.lib.rbd_resize)(self.handle, size) };
        if rc < 0 {
            return Err(format!("cannot resize to {size} bytes: {}", ffi::errno_text(rc.into())));
        }
        Ok(())
    }
}

/// Creates image `name` of `size` bytes with the cluster's default features.
pub(crate) fn create(how: &RbdCluster, name: &RbdImage, size: u64) -> Result<(), String> {
    let cluster = connect(how)?;
    let io = ioctx(&cluster, name)?;
    let image = cstr("image", &name.image);
    let rc = match &image {
        Ok(image) => {
            let mut order: c_int = 0;
            // SAFETY: a live context, a C string, an out-parameter (0: default order).
            unsafe { (cluster.lib.rbd_create)(io, image.as_ptr(), size, &mut order) }
        }
        Err(_) => 0,
    };
    // SAFETY: created above, not used elsewhere.
    unsafe { (cluster.lib.rados_ioctx_destroy)(io) };
    image?;
    match -rc {
        0 => Ok(()),
        libc::EEXIST => {
            Err(format!("image `{}` already exists in pool `{}`", name.image, name.pool))
        }
        _ => Err(format!("cannot create the image: {}", ffi::errno_text(rc.into()))),
    }
}
