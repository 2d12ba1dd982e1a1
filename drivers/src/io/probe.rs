//! O_DIRECT alignment probing.
//!
//! Two numbers, kept apart: the *memory* alignment a buffer's address needs and the
//! *request* alignment a file offset and length need. The kernel is asked first —
//! `statx(STATX_DIOALIGN)` for files on file systems that report it (Linux 6.1+), and
//! `BLKSSZGET` for block devices — and what it says is confirmed by a trial read. What it
//! does not say is found by trial reads in the manner of QEMU's `raw_probe_alignment`:
//! request sizes 512, 1024, 2048, 4096 from an aligned buffer, then buffers offset by
//! 512, 1024, 2048, 4096 from page alignment; the first that does not fail with `EINVAL`
//! wins. A file shorter than the largest trial cannot prove a small alignment (reads at
//! end of file succeed whatever their size), so it gets the safe maximum, 4096.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::error::OpenError;

/// The largest alignment probed; also the fallback when probing cannot decide.
pub const MAX_PROBED_ALIGN: usize = 4096;
const CANDIDATES: [usize; 4] = [512, 1024, 2048, 4096];

/// Alignment requirements of an open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Buffer addresses must be multiples of this.
    pub mem: usize,
    /// Offsets and lengths must be multiples of this.
    pub request: usize,
}

impl Alignment {
    /// No requirement (buffered I/O, memory devices).
    pub const NONE: Alignment = Alignment { mem: 1, request: 1 };
}

/// Probes the alignment of `file` (opened with O_DIRECT when `direct`).
pub fn probe(file: &File, path: &Path, direct: bool) -> Result<Alignment, OpenError> {
    if !direct {
        return Ok(Alignment::NONE);
    }
    let meta = file.metadata().map_err(|e| OpenError::io(path, e))?;
    let is_bdev = meta.file_type().is_block_device();
    let size = if is_bdev { block_device_size(file).unwrap_or(0) } else { meta.len() };
    let mut buf = ProbeBuf::new().map_err(|e| OpenError::io(path, e))?;

    let mut kernel = statx_dio_align(file);
    if let Some(a) = kernel
        && (a.mem == 0 || a.request == 0)
    {
        return Err(no_direct(
            path,
            "the kernel reports that this file does not support direct I/O",
        ));
    }
    if is_bdev && let Some(sector) = logical_sector_size(file) {
        let mem = kernel.map_or(sector, |k| k.mem);
        kernel = Some(Alignment { mem, request: sector.max(kernel.map_or(0, |k| k.request)) });
    }
    let conclusive = size >= (2 * MAX_PROBED_ALIGN) as u64;
    if let Some(a) = kernel
        && (!conclusive
            || trial_read(file, &mut buf, 0, a.request.max(a.mem.min(MAX_PROBED_ALIGN))))
    {
        return Ok(Alignment { mem: a.mem.clamp(1, MAX_PROBED_ALIGN), request: a.request.max(1) });
    }
    if !conclusive {
        // Nothing told us and trial reads cannot decide: assume the worst case, which is
        // always correct if slower for unaligned requests.
        return Ok(Alignment { mem: MAX_PROBED_ALIGN, request: MAX_PROBED_ALIGN });
    }
    let Some(request) = CANDIDATES.into_iter().find(|&len| trial_read(file, &mut buf, 0, len))
    else {
        return Err(no_direct(path, "no request size from 512 to 4096 bytes works with O_DIRECT"));
    };
    let mem = CANDIDATES
        .into_iter()
        .find(|&off| trial_read(file, &mut buf, off % MAX_PROBED_ALIGN, request))
        .unwrap_or(MAX_PROBED_ALIGN);
    // An offset of 4096 is page alignment again, so `off % 4096 == 0` for the last one:
    // it always succeeds once `request` did, giving 4096.
    Ok(Alignment { mem, request })
}

fn no_direct(path: &Path, why: &str) -> OpenError {
    OpenError::invalid(
        path,
        format!("{why}; set `direct = false` for this disk to use the page cache instead"),
    )
}

/// A page-aligned scratch buffer big enough for any trial.
struct ProbeBuf {
    ptr: *mut u8,
    len: usize,
}

impl ProbeBuf {
    fn new() -> io::Result<Self> {
        let len = 3 * MAX_PROBED_ALIGN;
        // SAFETY: an anonymous private mapping with no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ProbeBuf { ptr: p.cast(), len })
    }
}

impl Drop for ProbeBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Reads `len` bytes at file offset 0 into the buffer at `mem_off`; false only when the
/// kernel refuses the alignment (EINVAL).
fn trial_read(file: &File, buf: &mut ProbeBuf, mem_off: usize, len: usize) -> bool {
    debug_assert!(mem_off + len <= buf.len);
    // SAFETY: `mem_off + len` lies within the mapping.
    let n = unsafe { libc::pread(file.as_raw_fd(), buf.ptr.add(mem_off).cast(), len, 0) };
    !(n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL))
}

fn statx_dio_align(file: &File) -> Option<Alignment> {
    // SAFETY: statx is plain data; zeroed is a valid value for the kernel to fill.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH refers to the descriptor itself; `stx`
    // is a valid, writable statx.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some(Alignment {
        mem: stx.stx_dio_mem_align as usize,
        request: stx.stx_dio_offset_align as usize,
    })
}

fn logical_sector_size(file: &File) -> Option<usize> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int into `v`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut v) };
    (rc == 0 && v > 0).then_some(v as usize)
}

/// The size of a block device (its end, by lseek).
pub fn block_device_size(file: &File) -> io::Result<u64> {
    // SAFETY: lseek takes plain integers.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 { Err(io::Error::last_os_error()) } else { Ok(end as u64) }
}
