//! Image locking, interoperable with QEMU's (block/file-posix.c).
//!
//! Two programs writing one image corrupt it, so QEMU locks image files, and the
//! appliance takes the same locks in the same places: open file description (OFD)
//! byte-range locks, shared (`F_RDLCK`), held for as long as the file is open. A user
//! holding permission `p` locks byte `100 + p`; a user that does not let others hold
//! `p` locks byte `200 + p`. Permissions: 0 consistent read, 1 write, 3 resize.
//!
//! A served disk holds consistent read (and write unless read-only) and, like every
//! qcow2 or guest-device user in QEMU, does not share write or resize. A conflict —
//! someone refusing to share what we hold, or holding what we refuse to share — fails
//! the open with a message naming the file, just as `qemu-io` or `qemu-system` then
//! fail to open an image the appliance serves (`qemu-img info -U` reads it anyway).
//! The locks are taken first and checked after, so two openers racing cannot both
//! win. File systems without OFD locks (some network file systems) are served without
//! them, with a warning, as QEMU's `locking=auto` does.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::OpenError;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;

fn perm_name(p: i64) -> &'static str {
    match p {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        _ => "resize",
    }
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: `flock` is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_shared(file: &File, byte: i64) -> std::io::Result<()> {
    let fl = flock(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK reads the `flock` we own, on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte`.
fn held_by_others(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK fills the `flock` we own, on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Takes QEMU-compatible locks on an image opened for serving (`write`: read-write)
/// or for a tool that changes it; fails if another process's use conflicts.
pub fn lock_image(file: &File, path: &Path, write: bool) -> Result<(), OpenError> {
    if !take(file, path, write)? {
        return Ok(());
    }
    let held: &[i64] = if write { &[CONSISTENT_READ, WRITE] } else { &[CONSISTENT_READ] };
    let unshared = [WRITE, RESIZE];
    let io = |e| OpenError::io(path, e);
    for &p in held {
        if held_by_others(file, SHARED_BASE + p).map_err(io)? {
            return Err(OpenError::invalid(
                path,
                format!(
                    "the image is in use by another process that does not share {} access \
                     (QEMU image lock); stop it first",
                    perm_name(p)
                ),
            ));
        }
    }
    for p in unshared {
        if held_by_others(file, PERM_BASE + p).map_err(io)? {
            return Err(OpenError::invalid(
                path,
                format!(
                    "the image is in use by another process with {} access (QEMU image \
                     lock); stop it first",
                    perm_name(p)
                ),
            ));
        }
    }
    Ok(())
}

/// Takes the locks [`lock_image`] takes without checking for conflicts: for a handle
/// that takes over from another handle of this process holding them (an image
/// reopened in place), so the file is never without them. The caller closes the
/// other handle next.
pub fn adopt_image_locks(file: &File, path: &Path, write: bool) -> Result<(), OpenError> {
    take(file, path, write).map(|_| ())
}

/// Sets the locks of a user holding consistent read (and write when `write`) and
/// sharing neither write nor resize; false if the file system has no OFD locks.
fn take(file: &File, path: &Path, write: bool) -> Result<bool, OpenError> {
    let held: &[i64] = if write { &[CONSISTENT_READ, WRITE] } else { &[CONSISTENT_READ] };
    let unshared = [WRITE, RESIZE];
    let taken = held
        .iter()
        .map(|p| PERM_BASE + p)
        .chain(unshared.iter().map(|p| SHARED_BASE + p))
        .try_for_each(|b| set_shared(file, b));
    if let Err(e) = taken {
        if matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
        ) {
            tracing::warn!(image = %path.display(), "the file system does not support OFD locks ({e}): serving without image locking");
            return Ok(false);
        }
        if e.raw_os_error() == Some(libc::EAGAIN) || e.raw_os_error() == Some(libc::EACCES) {
            // Only an exclusive lock blocks a shared one; QEMU takes none, but someone may.
            return Err(OpenError::invalid(
                path,
                "the image is locked exclusively by another process; is it in use?",
            ));
        }
        return Err(OpenError::io(path, e));
    }
    Ok(true)
}
