//! `driver = "nvme"`: the userspace NVMe driver over VFIO (the SPDK model).
//!
//! `path = "pci:0000:00:04.0"` (namespace 1) or `"pci:0000:00:04.0/ns=2"`. The
//! controller ([`super::ctrl`]) is started when the disk opens; each reactor that serves
//! the disk creates its own I/O queue pair ([`super::queue`]) when it opens its channel,
//! with the reactor's DMA region mapped for the device. A request's buffers in that
//! region go to the device as they are, described by PRPs (PRP1, PRP2 or a PRP list in
//! the command ID's own page); buffers elsewhere (a guest's memory under vhost-user,
//! segments that do not line up on pages) go through a bounce buffer from the region.
//! Requests are cut at the largest transfer (MDTS, at most [`MAX_TRANSFER`]). The
//! control plane reads and writes through the controller's polled queue.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{IoError, OpenError};
use crate::io::probe::Alignment;
use crate::io::{Allocation, Backend, BackendChannel, Extent, Storage, StoreFuture};
use crate::seg::{self, IoSeg};

use super::ctrl::Controller;
use super::queue::{Command, QueuePair};
use super::vfio::Vfio;
use super::{DEAC, DSM_AD, FUA, MAX_NLB, opc};

/// The largest transfer per command: one PRP-list page.
pub const MAX_TRANSFER: u64 = 512 << 10;

/// Parses `pci:ADDR[/ns=N]`.
fn parse_path(path: &str) -> Option<(String, u32)> {
    let rest = path.strip_prefix("pci:")?;
    let (addr, ns) = match rest.split_once("/ns=") {
        Some((a, n)) => (a, n.parse().ok().filter(|&n| n > 0)?),
        None => (rest, 1),
    };
    let ok =
        addr.len() == 12 && addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.');
    ok.then(|| (addr.to_string(), ns))
}

struct UserBackend {
    ctrl: Arc<Controller>,
    max_transfer: usize,
}

/// Opens the namespace named by `path` (`pci:0000:00:04.0[/ns=N]`).
pub fn open(path: &str, read_only: bool) -> Result<Arc<Storage>, OpenError> {
    let p = PathBuf::from(path);
    let (addr, nsid) = parse_path(path).ok_or_else(|| {
        OpenError::invalid(
            &p,
            "expected pci:DOMAIN:BUS:DEVICE.FUNCTION[/ns=N], such as pci:0000:00:04.0",
        )
    })?;
    let vfio = Vfio::open(&addr).map_err(|e| OpenError::invalid(&p, e.to_string()))?;
    let ctrl = Controller::start(vfio, nsid)
        .map_err(|e| OpenError::invalid(&p, format!("starting the controller: {e}")))?
        .map_err(|e| OpenError::invalid(&p, format!("namespace {nsid}: {e}")))?;
    let lba = 1u64 << ctrl.info.lba_shift;
    let max_transfer = ctrl.info.max_transfer.unwrap_or(MAX_TRANSFER).min(MAX_TRANSFER).max(lba);
    let size = ctrl.info.blocks << ctrl.info.lba_shift;
    let align = Alignment { mem: lba as usize, request: lba as usize };
    let backend = UserBackend { ctrl: Arc::new(ctrl), max_transfer: max_transfer as usize };
    Ok(Storage::new(Box::new(backend), Some(p), align, size, read_only, true))
}

impl UserBackend {
    fn size(&self) -> u64 {
        self.ctrl.info.blocks << self.ctrl.info.lba_shift
    }

    /// Runs `f` on the whole blocks around `len` bytes at `off` (control plane).
    fn around(
        &self,
        len: usize,
        off: u64,
        write: Option<&[u8]>,
        out: Option<&mut [u8]>,
    ) -> std::io::Result<()> {
        let mask = (1u64 << self.ctrl.info.lba_shift) - 1;
        let start = off & !mask;
        let end = ((off + len as u64 + mask) & !mask).min(self.size().max(start));
        let mut bounce = vec![0u8; (end - start) as usize];
        self.ctrl.io_sync(false, bounce.as_mut_ptr(), bounce.len(), start)?;
        let at = (off - start) as usize;
        if let Some(data) = write {
            bounce[at..at + data.len()].copy_from_slice(data);
            self.ctrl.io_sync(true, bounce.as_mut_ptr(), bounce.len(), start)?;
        }
        if let Some(out) = out {
            let n = out.len().min(bounce.len().saturating_sub(at));
            out[..n].copy_from_slice(&bounce[at..at + n]);
            out[n..].fill(0);
        }
        Ok(())
    }
}

impl Backend for UserBackend {
    fn kind(&self) -> &'static str {
        "<nvme>"
    }

    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, IoError> {
        let q = QueuePair::create(&self.ctrl).map_err(|e| {
            tracing::error!("NVMe I/O queue: {e}");
            IoError::Os(libc::EIO)
        })?;
        Ok(Box::new(UserChannel { q, ctrl: self.ctrl.clone(), max_transfer: self.max_transfer }))
    }

    fn read_sync(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        if off >= self.size() {
            buf.fill(0);
        } else {
            self.around(buf.len(), off, None, Some(buf))?;
        }
        Ok(buf.len())
    }

    fn write_sync(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        if off.checked_add(buf.len() as u64).is_none_or(|e| e > self.size()) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.around(buf.len(), off, Some(buf), None)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.ctrl.flush_sync()
    }

    fn is_block_device(&self) -> bool {
        true
    }
}

struct UserChannel {
    q: Rc<QueuePair>,
    ctrl: Arc<Controller>,
    max_transfer: usize,
}

impl UserChannel {
    /// A command on this namespace.
    fn cmd(&self, opcode: u8, slba: u64, cdw12: u32) -> Command {
        let nsid = self.ctrl.info.nsid;
        Command { opcode, nsid, cdw10: slba as u32, cdw11: (slba >> 32) as u32, cdw12, data: None }
    }

    /// Runs `cmd`, resubmitting it while the controller aborts it without running it,
    /// and maps its status.
    async fn exec(&self, cmd: Command) -> Result<(), IoError> {
        let mut tries = 0;
        loop {
            let status = self.q.submit(cmd).await;
            if tries < 8 && super::retryable(status) {
                tries += 1;
                poller::sleep(std::time::Duration::from_millis(1 << tries)).await;
                continue;
            }
            return super::status(status);
        }
    }

    /// The device address of `segs` if they are one contiguous run in the DMA region.
    fn contiguous(&self, segs: &[IoSeg<'_>]) -> Option<u64> {
        let first = self.q.iova(segs[0].as_ptr(), segs[0].len())?;
        let mut next = first + segs[0].len() as u64;
        for s in &segs[1..] {
            if self.q.iova(s.as_ptr(), s.len())? != next {
                return None;
            }
            next += s.len() as u64;
        }
        Some(first)
    }

    /// One READ or WRITE of `segs` (at most the largest transfer).
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
        let shift = self.ctrl.info.lba_shift;
        let write = opcode == opc::WRITE;
        let mut cmd = self.cmd(opcode, off >> shift, ((len >> shift) - 1) as u32);
        if fua {
            cmd.cdw12 |= FUA;
        }
        if let Some(iova) = self.contiguous(segs) {
            cmd.data = Some((iova, len as u32));
            return self.exec(cmd).await;
        }
        // Memory the device cannot reach as it is: through a buffer of the region.
        let mut bounce = poller::dma::alloc_wait(len).await.map_err(|_| IoError::TooLarge)?;
        if write {
            // SAFETY: the bounce buffer holds `len` bytes.
            unsafe { seg::copy_from_segs(segs, 0, bounce.as_mut_ptr(), len) };
        }
        let iova = self.q.iova(bounce.as_ptr(), len).ok_or(IoError::Os(libc::EFAULT))?;
        cmd.data = Some((iova, len as u32));
        self.exec(cmd).await?;
        if !write {
            // SAFETY: as above.
            unsafe { seg::copy_into_segs(segs, 0, bounce.as_ptr(), len) };
        }
        Ok(())
    }

    async fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<(), IoError> {
        let info = self.ctrl.info;
        let mask = (1u64 << info.lba_shift) - 1;
        if !info.write_zeroes {
            return Err(IoError::NotSupported);
        }
        if off & mask != 0 || len & mask != 0 {
            return Err(IoError::Invalid);
        }
        let (mut slba, end) = (off >> info.lba_shift, (off + len) >> info.lba_shift);
        while slba < end {
            let nlb = (end - slba).min(MAX_NLB);
            let flags = if unmap { DEAC } else { 0 };
            self.exec(self.cmd(opc::WRITE_ZEROES, slba, (nlb - 1) as u32 | flags)).await?;
            slba += nlb;
        }
        Ok(())
    }

    async fn discard(&self, off: u64, len: u64) -> Result<bool, IoError> {
        let info = self.ctrl.info;
        if !info.dsm {
            return Ok(false);
        }
        let shift = info.lba_shift;
        let (mut slba, end) = ((off + (1 << shift) - 1) >> shift, (off + len) >> shift);
        let whole = slba << shift == off && end << shift == off + len;
        let mut range = poller::dma::alloc_wait(4096).await.map_err(|_| IoError::TooLarge)?;
        while slba < end {
            let nlb = (end - slba).min(u64::from(u32::MAX));
            let r = range.as_mut_slice();
            r[..4].fill(0);
            r[4..8].copy_from_slice(&(nlb as u32).to_le_bytes());
            r[8..16].copy_from_slice(&slba.to_le_bytes());
            let iova = self.q.iova(range.as_ptr(), 16).ok_or(IoError::Os(libc::EFAULT))?;
            let cmd = Command { cdw11: DSM_AD, data: Some((iova, 16)), ..self.cmd(opc::DSM, 0, 0) };
            self.exec(cmd).await?;
            slba += nlb;
        }
        Ok(whole && info.dealloc_zeroes)
    }
}

impl super::OneCommand for UserChannel {
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

impl BackendChannel for UserChannel {
    fn read<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>]) -> StoreFuture<'a> {
        let limits = (self.max_transfer, usize::MAX);
        StoreFuture::new(super::transfer(self, (opc::READ, off, false), segs, limits))
    }
    fn write<'a>(&'a self, off: u64, segs: &'a [IoSeg<'a>], fua: bool) -> StoreFuture<'a> {
        let limits = (self.max_transfer, usize::MAX);
        StoreFuture::new(super::transfer(self, (opc::WRITE, off, fua), segs, limits))
    }
    fn flush(&self) -> StoreFuture<'_> {
        StoreFuture::new(self.exec(self.cmd(opc::FLUSH, 0, 0)))
    }
    fn zero_range(&self, off: u64, len: u64, unmap: bool, _grows: bool) -> StoreFuture<'_> {
        StoreFuture::new(self.write_zeroes(off, len, unmap))
    }
    fn discard(&self, off: u64, len: u64) -> StoreFuture<'_, bool> {
        StoreFuture::new(UserChannel::discard(self, off, len))
    }
    fn block_status(&self, _off: u64, len: u64) -> StoreFuture<'_, Extent> {
        StoreFuture::ready(Ok(Extent { len, allocation: Allocation::Data }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(parse_path("pci:0000:00:04.0"), Some(("0000:00:04.0".into(), 1)));
        assert_eq!(parse_path("pci:0000:00:04.0/ns=2"), Some(("0000:00:04.0".into(), 2)));
        assert_eq!(parse_path("pci:0000:00:04.0/ns=0"), None);
        assert_eq!(parse_path("/dev/nvme0n1"), None);
        assert_eq!(parse_path("pci:../../etc"), None);
    }
}
