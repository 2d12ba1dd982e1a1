//! `driver = "nvme_uring"`: NVMe commands through io_uring `URING_CMD` on a namespace's
//! generic character device (`/dev/ngXnY`, Linux 5.19+).
//!
//! The kernel keeps the controller (its queues, interrupts, timeouts and resets) but
//! the block layer's per-request work (bio building, merging, splitting, the I/O
//! scheduler, partition remapping) is skipped: each request is one NVMe command in a
//! 128-byte submission entry on the reactor's NVMe ring ([`engine::uring::NvmeRing`]),
//! and its status comes back in the 32-byte completion entry. The ring is the same
//! slot-tagged, batch-submitted, poll-reaped engine the files use.
//!
//! Requests are cut where the controller needs it: at most MDTS bytes (capped at
//! [`MAX_TRANSFER`]) and [`MAX_VEC`] segments per command, 65536 blocks per WRITE
//! ZEROES, 2^32 - 1 blocks per deallocated range. Requests are aligned to the LBA
//! size by the alignment layer above, which takes it as the request alignment.
//! The control plane (opening an image, tools) reads and writes with the synchronous
//! passthrough ioctl.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use crate::error::{IoError, OpenError};
use crate::io::engine::{self, EngineRef, IoOp};
use crate::io::probe::Alignment;
use crate::io::{Allocation, Backend, BackendChannel, Extent, Storage, StoreFuture};
use crate::seg::{self, IoSeg};

use super::identify::{self, NsInfo};
use super::{Cmd, DEAC, DSM_AD, FUA, MAX_NLB, opc};

/// `_IOWR('N', 0x80, struct nvme_uring_cmd)`: one data buffer.
const NVME_URING_CMD_IO: u32 = 0xc048_4e80;
/// `_IOWR('N', 0x81, struct nvme_uring_cmd)`: an iovec array.
const NVME_URING_CMD_IO_VEC: u32 = 0xc048_4e81;
/// The largest transfer per command: the kernel maps a passthrough buffer page by page
/// into at most 127 segments (NVME_MAX_SEGS), and refuses (EINVAL) a request above its
/// queue's `max_hw_sectors`, which sysfs names when it can be found
/// ([`kernel_max_transfer`]).
pub const MAX_TRANSFER: u64 = 256 << 10;
/// Segments per command (the kernel maps at most 127 per request, and pages that do
/// not line up count twice).
pub const MAX_VEC: usize = 32;

/// Resubmissions of an aborted command (see [`NvmeChannel::run`]).
const RETRIES: u32 = 8;
/// The first pause before a resubmission (doubling each time: 2 ms .. 512 ms, about a
/// second in all, the time a controller reset takes).
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

struct NvmeBackend {
    file: File,
    info: NsInfo,
    max_transfer: usize,
}

/// Opens the namespace at `path` (`/dev/ngXnY`).
pub fn open(path: &Path, read_only: bool) -> Result<Arc<Storage>, OpenError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| OpenError::io(path, e))?;
    let meta = file.metadata().map_err(|e| OpenError::io(path, e))?;
    let not_generic = || {
        OpenError::invalid(
            path,
            "not an NVMe generic character device (/dev/ngXnY); a block device such as \
             /dev/nvme0n1 is served by driver \"io_uring\"",
        )
    };
    if !meta.file_type().is_char_device() {
        return Err(not_generic());
    }
    let nsid = match identify::namespace_id(file.as_raw_fd()) {
        Ok(id) => id,
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => return Err(not_generic()),
        Err(e) => return Err(OpenError::io(path, e)),
    };
    let info = identify::identify(file.as_raw_fd(), nsid)
        .map_err(|e| OpenError::invalid(path, format!("Identify: {e}")))?
        .map_err(|e| OpenError::invalid(path, format!("namespace {nsid}: {e}")))?;
    let lba = 1u64 << info.lba_shift;
    let cap = kernel_max_transfer(path).unwrap_or(MAX_TRANSFER).min(MAX_TRANSFER);
    let max_transfer = info.max_transfer.unwrap_or(cap).min(cap).max(lba);
    let size =
        info.blocks.checked_shl(info.lba_shift).filter(|s| s >> info.lba_shift == info.blocks);
    let size = size.ok_or_else(|| OpenError::invalid(path, "namespace size overflows"))?;
    let align = Alignment { mem: lba as usize, request: lba as usize };
    let backend = NvmeBackend { file, info, max_transfer: max_transfer as usize };
    Ok(Storage::new(Box::new(backend), Some(path.to_path_buf()), align, size, read_only, true))
}

/// The kernel's largest request for the namespace `/dev/ngXnY`, from the block device
/// `nvmeXnY` of the same namespace (`queue/max_hw_sectors_kb`), if there is one.
fn kernel_max_transfer(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?.strip_prefix("ng")?;
    let kb = std::fs::read_to_string(format!("/sys/block/nvme{name}/queue/max_hw_sectors_kb"));
    kb.ok()?.trim().parse::<u64>().ok().map(|kb| kb << 10)
}

impl NvmeBackend {
    /// Synchronous READ or WRITE of whole blocks, cut at the largest transfer.
    fn io_sync(&self, opcode: u8, buf: *mut u8, len: usize, off: u64) -> std::io::Result<()> {
        let shift = self.info.lba_shift;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.max_transfer);
            let at = off + done as u64;
            // SAFETY (of the pointer arithmetic): `done < len`, inside the buffer.
            let p = buf.wrapping_add(done);
            identify::io_sync(
                self.fd(),
                self.info.nsid,
                opcode,
                at >> shift,
                (n >> shift) as u64,
                p,
                n,
            )?;
            done += n;
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn size(&self) -> u64 {
        self.info.blocks << self.info.lba_shift
    }

    /// Whether `len` bytes at `off` are whole blocks.
    fn aligned(&self, len: usize, off: u64) -> bool {
        let mask = (1u64 << self.info.lba_shift) - 1;
        off & mask == 0 && len as u64 & mask == 0
    }

    /// The whole blocks around `len` bytes at `off`, read into a bounce buffer: the
    /// control plane reads and writes at byte granularity (header fields, table
    /// entries).
    fn read_around(&self, len: usize, off: u64) -> std::io::Result<(Vec<u8>, usize)> {
        let mask = (1u64 << self.info.lba_shift) - 1;
        let start = off & !mask;
        let end = (off + len as u64 + mask) & !mask;
        let mut bounce = vec![0u8; (end - start) as usize];
        self.read_blocks(&mut bounce, start)?;
        Ok((bounce, (off - start) as usize))
    }

    /// Reads whole blocks; past the end of the namespace, zeros.
    fn read_blocks(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let inside = (self.size().saturating_sub(off)).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        self.io_sync(opc::READ, buf.as_mut_ptr(), inside, off)
    }
}

impl Backend for NvmeBackend {
    fn kind(&self) -> &'static str {
        "<nvme>"
    }

    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, IoError> {
        Ok(Box::new(NvmeChannel {
            fd: self.fd(),
            info: self.info,
            max_transfer: self.max_transfer,
            engine: EngineRef::Nvme(engine::uring::current_nvme()?),
        }))
    }

    fn read_sync(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        if self.aligned(buf.len(), off) {
            self.read_blocks(buf, off)?;
        } else {
            let (bounce, at) = self.read_around(buf.len(), off)?;
            buf.copy_from_slice(&bounce[at..at + buf.len()]);
        }
        Ok(buf.len())
    }

    fn write_sync(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        if off.checked_add(buf.len() as u64).is_none_or(|e| e > self.size()) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if self.aligned(buf.len(), off) {
            // The controller only reads from the buffer.
            return self.io_sync(opc::WRITE, buf.as_ptr().cast_mut(), buf.len(), off);
        }
        let (mut bounce, at) = self.read_around(buf.len(), off)?;
        bounce[at..at + buf.len()].copy_from_slice(buf);
        let start = off - at as u64;
        self.io_sync(opc::WRITE, bounce.as_mut_ptr(), bounce.len(), start)
    }

    fn sync(&self) -> std::io::Result<()> {
        identify::io_sync(self.fd(), self.info.nsid, opc::FLUSH, 0, 0, std::ptr::null_mut(), 0)
    }

    fn is_block_device(&self) -> bool {
        // A device of fixed size, as a block device is.
        true
    }
}

struct NvmeChannel {
    fd: RawFd,
    info: NsInfo,
    max_transfer: usize,
    engine: EngineRef,
}

/// One DSM range (16 bytes, as the controller reads it).
#[repr(C, align(16))]
struct DsmRange {
    attributes: u32,
    nlb: u32,
    slba: u64,
}

impl NvmeChannel {
    /// Submits `cmd` on the NVMe ring and maps its status. A command aborted without
    /// running (a controller reset cancels what is in flight) is resubmitted, up to
    /// [`RETRIES`] times with a growing pause, before its status is the answer. A
    /// single buffer in the reactor's DMA region goes as a fixed buffer.
    async fn run(&self, cmd_op: u32, cmd: &Cmd) -> Result<(), IoError> {
        let bytes = cmd.uring_bytes();
        let ring = match &self.engine {
            EngineRef::Nvme(ring) => Some(ring),
            _ => None,
        };
        let mut fixed = match ring {
            Some(r) if cmd_op == NVME_URING_CMD_IO && cmd.data_len > 0 => {
                r.fixed_index(cmd.addr as usize, cmd.data_len as usize)
            }
            _ => None,
        };
        let mut tries = 0;
        loop {
            let op = IoOp::UringCmd { fd: self.fd, cmd_op, cmd: &bytes, fixed };
            let res = self.engine.submit(op).await;
            if fixed.is_some() && res == -i64::from(libc::EINVAL) {
                // Chosen at first use: a kernel without fixed buffers for passthrough.
                ring.expect("fixed buffers are the NVMe ring's").disable_fixed();
                fixed = None;
                continue;
            }
            if tries < RETRIES && super::retryable(res) {
                tries += 1;
                tracing::debug!(
                    opcode = cmd.opcode,
                    status = res,
                    tries,
                    "NVMe command resubmitted"
                );
                poller::sleep(RETRY_PAUSE * (1 << tries)).await;
                continue;
            }
            return super::status(res);
        }
    }

    /// One READ or WRITE of `segs` (whole blocks, at most the largest transfer).
    async fn rw_one(
        &self,
        opcode: u8,
        off: u64,
        segs: &[IoSeg<'_>],
        fua: bool,
    ) -> Result<(), IoError> {
        let len = seg::total_len(segs);
        if len == 0 {
            // Nothing to transfer (NLB is a count minus one: zero blocks cannot be said).
            return Ok(());
        }
        let shift = self.info.lba_shift;
        let flags = if fua { FUA } else { 0 };
        let mut cmd =
            Cmd::blocks(opcode, self.info.nsid, off >> shift, (len >> shift) as u64, flags);
        let cmd_op = if segs.len() == 1 {
            cmd.addr = segs[0].as_ptr() as u64;
            cmd.data_len = len as u32;
            NVME_URING_CMD_IO
        } else {
            cmd.addr = seg::as_iovecs(segs) as u64;
            cmd.data_len = segs.len() as u32;
            NVME_URING_CMD_IO_VEC
        };
        self.run(cmd_op, &cmd).await
    }

    async fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<(), IoError> {
        if !self.info.write_zeroes {
            return Err(IoError::NotSupported);
        }
        let shift = self.info.lba_shift;
        let mask = (1u64 << shift) - 1;
        if off & mask != 0 || len & mask != 0 {
            // The alignment layer writes partial blocks; this zeroes whole ones.
            return Err(IoError::Invalid);
        }
        let (mut slba, end) = (off >> shift, (off + len) >> shift);
        let flags = if unmap { DEAC } else { 0 };
        while slba < end {
            let nlb = (end - slba).min(MAX_NLB);
            let cmd = Cmd::blocks(opc::WRITE_ZEROES, self.info.nsid, slba, nlb, flags);
            self.run(NVME_URING_CMD_IO, &cmd).await?;
            slba += nlb;
        }
        Ok(())
    }

    async fn discard(&self, off: u64, len: u64) -> Result<bool, IoError> {
        if !self.info.dsm {
            return Ok(false);
        }
        // Only the whole blocks inside the range: a partial one keeps its other bytes.
        let shift = self.info.lba_shift;
        let (mut slba, end) = ((off + (1 << shift) - 1) >> shift, (off + len) >> shift);
        let whole = slba << shift == off && end << shift == off + len;
        while slba < end {
            let nlb = (end - slba).min(u64::from(u32::MAX));
            let range = DsmRange { attributes: 0, nlb: (nlb as u32).to_le(), slba: slba.to_le() };
            let cmd = Cmd {
                opcode: opc::DSM,
                nsid: self.info.nsid,
                addr: &range as *const DsmRange as u64,
                data_len: std::mem::size_of::<DsmRange>() as u32,
                cdw10: 0, // one range
                cdw11: DSM_AD,
                ..Cmd::default()
            };
            match self.run(NVME_URING_CMD_IO, &cmd).await {
                Ok(()) => {}
                Err(IoError::NotSupported) => return Ok(false),
                Err(e) => return Err(e),
            }
            slba += nlb;
        }
        Ok(whole && self.info.dealloc_zeroes)
    }
}

impl super::OneCommand for NvmeChannel {
    fn one(
        &self,
        opcode: u8,
        off: u64,
        segs: &[IoSeg<'_>],
        fua: bool,
    ) -> impl std::future::Future<Output = Result<(), IoError>> {
        self.rw_one(opcode, off, segs, fua)
    }
}

impl BackendChannel for NvmeChannel {
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> StoreFuture<'a> {
        let limits = (self.max_transfer, MAX_VEC);
        StoreFuture::new(super::transfer(self, (opc::READ, off, false), segs, limits))
    }
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], fua: bool) -> StoreFuture<'a> {
        let limits = (self.max_transfer, MAX_VEC);
        StoreFuture::new(super::transfer(self, (opc::WRITE, off, fua), segs, limits))
    }
    fn flush(&self) -> StoreFuture<'_> {
        StoreFuture::new(async move {
            let cmd = Cmd { opcode: opc::FLUSH, nsid: self.info.nsid, ..Cmd::default() };
            self.run(NVME_URING_CMD_IO, &cmd).await
        })
    }
    fn zero_range(&self, off: u64, len: u64, unmap: bool, _grows: bool) -> StoreFuture<'_> {
        StoreFuture::new(self.write_zeroes(off, len, unmap))
    }
    fn discard(&self, off: u64, len: u64) -> StoreFuture<'_, bool> {
        StoreFuture::new(NvmeChannel::discard(self, off, len))
    }
    fn block_status(&self, _off: u64, len: u64) -> StoreFuture<'_, Extent> {
        StoreFuture::ready(Ok(Extent { len, allocation: Allocation::Data }))
    }
}
