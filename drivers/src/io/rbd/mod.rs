//! Ceph RBD (`driver = "rbd"`): a disk that lives in a Ceph cluster, through librbd.
//!
//! - [`ffi`]: librados and librbd, loaded at run time (a host without Ceph's libraries
//!   runs every other driver);
//! - [`cluster`]: one connection per cluster per process, image handles, creation;
//! - [`aio`]: one librbd request as a future, completed from librbd's threads through
//!   the submitting reactor's lock-free remote-wake ring.
//!
//! Reads and writes go to `rbd_aio_readv`/`rbd_aio_writev` with the request's segments
//! as they are (an [`IoSeg`] is an `iovec`), flush to `rbd_aio_flush` (librbd's cache
//! is written back, then the OSDs have the data), discard and write-zeroes to
//! `rbd_aio_discard` and `rbd_aio_write_zeroes`. Block status comes from
//! `rbd_diff_iterate2` over whole objects when the image's fast-diff object map is
//! valid (answered from memory), on an offload worker because the call is synchronous;
//! without fast-diff every range is data, as QEMU reports. The image grows on demand
//! (a qcow2 image on RBD appends clusters, as QEMU's rbd driver grows it) and by
//! `disk_resize`.
//!
//! Requests are byte-granular in librbd; the storage reports 512-byte request
//! alignment so formats see sectors, and no memory alignment.

mod aio;
mod cluster;
mod ffi;

use std::path::PathBuf;
use std::sync::Arc;

use config::{RbdCluster, RbdImage};

use self::aio::{Aio, Op};
use self::cluster::Image;
use super::engine::offload::{BlockingOp, Offload};
use super::probe::Alignment;
use super::{Allocation, Backend, BackendChannel, Extent, Storage, StoreFuture};
use crate::error::{IoError, OpenError};
use crate::seg::IoSeg;

/// librbd takes an `int` count of iovecs.
const MAX_IOVECS: usize = 1024;

struct RbdBackend {
    image: Arc<Image>,
    fast_diff: bool,
}

/// Opens the RBD image `path` names (`rbd:POOL[/NS]/IMAGE`) as storage.
pub fn open(path: &str, how: &RbdCluster, read_only: bool) -> Result<Arc<Storage>, OpenError> {
    let name = RbdImage::parse(path).map_err(|m| OpenError::invalid(path, m))?;
    let fail = |m: String| OpenError::invalid(path, m);
    let image = Image::open(how, &name, read_only).map_err(fail)?;
    let size = image.size().map_err(fail)?;
    let fast_diff = image.fast_diff().map_err(fail)?;
    let backend = RbdBackend { image: Arc::new(image), fast_diff };
    let align = Alignment { request: 512, mem: 1 };
    Ok(Storage::new(
        Box::new(backend),
        Some(PathBuf::from(name.to_string())),
        align,
        size,
        read_only,
        false,
    ))
}

/// Creates the RBD image `path` names, `size` bytes, with the cluster's default
/// features (`appliance create -f raw rbd:POOL/IMAGE SIZE`).
pub fn create(path: &str, how: &RbdCluster, size: u64) -> Result<(), OpenError> {
    let name = RbdImage::parse(path).map_err(|m| OpenError::invalid(path, m))?;
    cluster::create(how, &name, size).map_err(|m| OpenError::invalid(path, m))
}

/// What `appliance info` shows of an RBD image: (size, feature bits).
pub fn describe(path: &str, how: &RbdCluster) -> Result<(u64, u64), OpenError> {
    let name = RbdImage::parse(path).map_err(|m| OpenError::invalid(path, m))?;
    let fail = |m: String| OpenError::invalid(path, m);
    let image = Image::open(how, &name, true).map_err(fail)?;
    Ok((image.size().map_err(fail)?, image.features().map_err(fail)?))
}

/// The names of RBD feature bits, for `info`.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    const NAMES: [&str; 10] = [
        "layering",
        "striping",
        "exclusive-lock",
        "object-map",
        "fast-diff",
        "deep-flatten",
        "journaling",
        "data-pool",
        "operations",
        "migrating",
    ];
    NAMES.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).map(|(_, n)| *n).collect()
}

fn os_err(rc: i64) -> std::io::Error {
    std::io::Error::from_raw_os_error((-rc) as i32)
}

impl Backend for RbdBackend {
    fn kind(&self) -> &'static str {
        "<rbd>"
    }

    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, IoError> {
        Ok(Box::new(RbdChannel { image: self.image.clone(), fast_diff: self.fast_diff }))
    }

    fn read_sync(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        let img = &self.image;
        let size = img.size().map_err(std::io::Error::other)?;
        let readable = size.saturating_sub(off).min(buf.len() as u64) as usize;
        buf[readable..].fill(0);
        let mut done = 0;
        while done < readable {
            let rest = &mut buf[done..readable];
            // SAFETY: a live image and a writable buffer of the length passed.
            let n = unsafe {
                (img.lib.rbd_read)(
                    img.handle,
                    off + done as u64,
                    rest.len(),
                    rest.as_mut_ptr().cast(),
                )
            };
            if n < 0 {
                return Err(os_err(n as i64));
            }
            if n == 0 {
                // Past the end: zeros, as for files.
                rest.fill(0);
                break;
            }
            done += n as usize;
        }
        Ok(buf.len())
    }

    fn write_sync(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let img = &self.image;
        let end = off + buf.len() as u64;
        if end > img.size().map_err(std::io::Error::other)? {
            img.grow_to(end).map_err(std::io::Error::other)?;
        }
        // SAFETY: a live image and a readable buffer of the length passed.
        let n = unsafe { (img.lib.rbd_write)(img.handle, off, buf.len(), buf.as_ptr().cast()) };
        if n < 0 {
            return Err(os_err(n as i64));
        }
        if n as usize != buf.len() {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    fn sync(&self) -> std::io::Result<()> {
        // SAFETY: a live image.
        let rc = unsafe { (self.image.lib.rbd_flush)(self.image.handle) };
        if rc < 0 { Err(os_err(rc.into())) } else { Ok(()) }
    }

    fn resize(&self, len: u64) -> std::io::Result<()> {
        let size = self.image.size().map_err(std::io::Error::other)?;
        if len < size {
            // Shrinking would cut off whatever the tail holds; RBD cannot tell us
            // cheaply that it holds nothing.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("shrinking an RBD image ({size} to {len} bytes) is refused"),
            ));
        }
        self.image.resize(len).map_err(std::io::Error::other)
    }

    fn reports_holes(&self) -> bool {
        self.fast_diff
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        let t = self.image.timeouts.load(std::sync::atomic::Ordering::Relaxed);
        vec![("rbd_requests_timed_out", t)]
    }
}

struct RbdChannel {
    image: Arc<Image>,
    fast_diff: bool,
}

/// An errno from librbd as an I/O error; a request that waited out the timeout is EIO
/// to the client.
fn rbd_result(image: &Image, rv: i64) -> Result<(), IoError> {
    match rv {
        0.. => Ok(()),
        e if e == -i64::from(libc::ETIMEDOUT) => {
            image.timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(image = %image.name, "rbd: a request timed out waiting for the cluster");
            Err(IoError::Os(libc::EIO))
        }
        e => Err(IoError::Os((-e) as i32)),
    }
}

/// A blocking call on an offload worker: `rbd_diff_iterate2` (`a` off, `b` len), as
/// `(len << 1) | data`.
fn extent_call(ctx: usize, off: u64, len: u64) -> i64 {
    // SAFETY: `ctx` is the channel's image, alive while the awaiting future is.
    let img = unsafe { &*(ctx as *const Image) };
    let mut found = Found { off, first: None };
    // SAFETY: a live image; the callback gets `found` as its argument, which outlives
    // the synchronous call.
    let rc = unsafe {
        (img.lib.rbd_diff_iterate2)(
            img.handle,
            std::ptr::null(),
            off,
            len,
            1,
            1,
            diff_cb,
            (&mut found as *mut Found).cast(),
        )
    };
    if rc < 0 && rc != STOP {
        return ((len as i64) << 1) | 1;
    }
    match found.first {
        None => (len as i64) << 1,
        Some((start, _)) if start > off => ((start - off).min(len) as i64) << 1,
        Some((start, n)) => (((start + n).saturating_sub(off).clamp(1, len)) as i64) << 1 | 1,
    }
}

/// Growth on an offload worker (`a` the new length).
fn grow_call(ctx: usize, len: u64, _: u64) -> i64 {
    // SAFETY: `ctx` is the channel's image, alive while the awaiting future is.
    let img = unsafe { &*(ctx as *const Image) };
    match img.grow_to(len) {
        Ok(()) => 0,
        Err(e) => {
            tracing::warn!(image = %img.name, "rbd: {e}");
            -i64::from(libc::EIO)
        }
    }
}

struct Found {
    off: u64,
    first: Option<(u64, u64)>,
}

/// Stops the iteration at the first extent (any value librbd does not return itself).
const STOP: i32 = -9000;

unsafe extern "C" fn diff_cb(off: u64, len: usize, exists: i32, arg: *mut std::ffi::c_void) -> i32 {
    // SAFETY: `arg` is the `Found` of the running `extent_call`.
    let found = unsafe { &mut *arg.cast::<Found>() };
    if exists == 0 || off + len as u64 <= found.off {
        return 0;
    }
    found.first = Some((off.max(found.off), off + len as u64 - off.max(found.off)));
    STOP
}

impl RbdChannel {
    fn result(&self, rv: i64) -> Result<(), IoError> {
        rbd_result(&self.image, rv)
    }

    fn aio(&self, op: Op) -> Aio {
        Aio::new(self.image.lib, self.image.handle, op)
    }

    fn iov(segs: &[IoSeg<'_>]) -> Result<(*const libc::iovec, i32), IoError> {
        if segs.len() > MAX_IOVECS {
            return Err(IoError::TooLarge);
        }
        Ok((segs.as_ptr().cast(), segs.len() as i32))
    }

    async fn read(&self, off: u64, segs: &[IoSeg<'_>]) -> Result<(), IoError> {
        let (iov, n) = Self::iov(segs)?;
        self.result(self.aio(Op::Readv { iov, n, off }).await)
    }

    async fn write(&self, off: u64, segs: &[IoSeg<'_>], fua: bool) -> Result<(), IoError> {
        let (iov, n) = Self::iov(segs)?;
        self.result(self.aio(Op::Writev { iov, n, off }).await)?;
        if fua {
            self.result(self.aio(Op::Flush).await)?;
        }
        Ok(())
    }

    async fn zero_range(&self, off: u64, len: u64, grows: bool) -> Result<(), IoError> {
        if grows {
            self.grow_to(off + len).await?;
        }
        self.result(self.aio(Op::WriteZeroes { off, len }).await)
    }

    async fn block_status(&self, off: u64, len: u64) -> Result<Extent, IoError> {
        if !self.fast_diff {
            return Ok(Extent { len, allocation: Allocation::Data });
        }
        let ctx = Arc::as_ptr(&self.image) as usize;
        let r = Offload::new(BlockingOp::Call { f: extent_call, ctx, a: off, b: len }).await;
        let allocation = if r & 1 == 1 { Allocation::Data } else { Allocation::Hole };
        Ok(Extent { len: ((r >> 1) as u64).clamp(1, len), allocation })
    }

    async fn grow_to(&self, len: u64) -> Result<bool, IoError> {
        let ctx = Arc::as_ptr(&self.image) as usize;
        let r = Offload::new(BlockingOp::Call { f: grow_call, ctx, a: len, b: 0 }).await;
        self.result(r)?;
        Ok(true)
    }
}

impl BackendChannel for RbdChannel {
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> StoreFuture<'a> {
        StoreFuture::new(RbdChannel::read(self, off, segs))
    }
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], fua: bool) -> StoreFuture<'a> {
        StoreFuture::new(RbdChannel::write(self, off, segs, fua))
    }
    fn flush(&self) -> StoreFuture<'_> {
        StoreFuture::new(async move { self.result(self.aio(Op::Flush).await) })
    }
    fn zero_range(&self, off: u64, len: u64, _unmap: bool, grows: bool) -> StoreFuture<'_> {
        StoreFuture::new(RbdChannel::zero_range(self, off, len, grows))
    }
    fn discard(&self, off: u64, len: u64) -> StoreFuture<'_, bool> {
        // librbd skips the parts of a discard that do not cover a whole object
        // (`rbd_skip_partial_discard`): what it leaves is not known to read as zeros.
        StoreFuture::new(async move {
            self.result(self.aio(Op::Discard { off, len }).await).map(|()| false)
        })
    }
    fn block_status(&self, off: u64, len: u64) -> StoreFuture<'_, Extent> {
        StoreFuture::new(RbdChannel::block_status(self, off, len))
    }
    fn grow_to(&self, len: u64) -> StoreFuture<'_, bool> {
        StoreFuture::new(RbdChannel::grow_to(self, len))
    }
}
