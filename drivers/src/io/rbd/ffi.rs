//! The thin layer over librados and librbd: the C functions this driver calls, looked up
//! at run time (`dlopen`) the first time an RBD disk is opened.
//!
//! Loading at run time rather than linking keeps Ceph's libraries out of the
//! appliance's start-up: a host that serves no RBD disk needs no `librbd1` (as QEMU
//! keeps its rbd driver in a module), and one that lacks it gets an error naming the
//! library when an RBD disk is opened, not a binary that refuses to start. The crates
//! on the registry are thin bindings linked at build time, most unmaintained; the few
//! functions used here are declared from `rados/librados.h` and `rbd/librbd.h` of
//! Ceph 16 (Pacific), whose C ABI later releases keep.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

pub(crate) type RadosT = *mut c_void;
pub(crate) type IoCtxT = *mut c_void;
pub(crate) type ImageT = *mut c_void;
pub(crate) type CompletionT = *mut c_void;
pub(crate) type Callback = unsafe extern "C" fn(c: CompletionT, arg: *mut c_void);
pub(crate) type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `RBD_FEATURE_FAST_DIFF`.
pub(crate) const FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FLAG_FAST_DIFF_INVALID`.
pub(crate) const FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

macro_rules! functions {
    ($($lib:ident: $name:ident($($arg:ty),*) -> $ret:ty;)*) => {
        /// The functions used, resolved once.
        pub(crate) struct Lib {
            $(pub(crate) $name: unsafe extern "C" fn($($arg),*) -> $ret,)*
            _rados: Library,
            _rbd: Library,
        }

        impl Lib {
            fn load() -> Result<Lib, String> {
                // SAFETY: loading Ceph's client libraries runs their initialisers, which
                // have no preconditions.
                let rados = unsafe { Library::new("librados.so.2") }
                    .map_err(|e| format!("cannot load librados.so.2 (install librados2): {e}"))?;
                // SAFETY: as above.
                let rbd = unsafe { Library::new("librbd.so.1") }
                    .map_err(|e| format!("cannot load librbd.so.1 (install librbd1): {e}"))?;
                Ok(Lib {
                    $($name: {
                        let lib = if stringify!($lib) == "rados" { &rados } else { &rbd };
                        // SAFETY: the symbol has the C signature declared here (Ceph's
                        // headers); the library stays loaded as long as `Lib` (forever).
                        *unsafe { lib.get(concat!(stringify!($name), "\0").as_bytes()) }
                            .map_err(|e| format!("{}: {e}", stringify!($name)))?
                    },)*
                    _rados: rados,
                    _rbd: rbd,
                })
            }
        }
    };
}

functions! {
    rados: rados_create(*mut RadosT, *const c_char) -> c_int;
    rados: rados_conf_read_file(RadosT, *const c_char) -> c_int;
    rados: rados_conf_set(RadosT, *const c_char, *const c_char) -> c_int;
    rados: rados_connect(RadosT) -> c_int;
    rados: rados_shutdown(RadosT) -> ();
    rados: rados_ioctx_create(RadosT, *const c_char, *mut IoCtxT) -> c_int;
    rados: rados_ioctx_destroy(IoCtxT) -> ();
    rados: rados_ioctx_set_namespace(IoCtxT, *const c_char) -> ();
    rbd: rbd_create(IoCtxT, *const c_char, u64, *mut c_int) -> c_int;
    rbd: rbd_open(IoCtxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    rbd: rbd_open_read_only(IoCtxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    rbd: rbd_close(ImageT) -> c_int;
    rbd: rbd_get_size(ImageT, *mut u64) -> c_int;
    rbd: rbd_get_features(ImageT, *mut u64) -> c_int;
    rbd: rbd_get_flags(ImageT, *mut u64) -> c_int;
    rbd: rbd_resize(ImageT, u64) -> c_int;
    rbd: rbd_read(ImageT, u64, usize, *mut c_char) -> isize;
    rbd: rbd_write(ImageT, u64, usize, *const c_char) -> isize;
    rbd: rbd_flush(ImageT) -> c_int;
    rbd: rbd_diff_iterate2(ImageT, *const c_char, u64, u64, u8, u8, DiffCallback, *mut c_void) -> c_int;
    rbd: rbd_aio_create_completion(*mut c_void, Callback, *mut CompletionT) -> c_int;
    rbd: rbd_aio_get_return_value(CompletionT) -> isize;
    rbd: rbd_aio_release(CompletionT) -> ();
    rbd: rbd_aio_readv(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int;
    rbd: rbd_aio_writev(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int;
    rbd: rbd_aio_flush(ImageT, CompletionT) -> c_int;
    rbd: rbd_aio_discard(ImageT, u64, u64, CompletionT) -> c_int;
    rbd: rbd_aio_write_zeroes(ImageT, u64, usize, CompletionT, c_int, c_int) -> c_int;
}

static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();

/// The loaded libraries, or why they could not be loaded.
pub(crate) fn lib() -> Result<&'static Lib, String> {
    LIB.get_or_init(Lib::load).as_ref().map_err(Clone::clone)
}

/// A message for a negative errno a Ceph call returned.
pub(crate) fn errno_text(rc: i64) -> String {
    std::io::Error::from_raw_os_error((-rc) as i32).to_string()
}
