//! VFIO: a PCI device handed to this process by the kernel's `vfio-pci` driver, with an
//! IOMMU container that decides which memory the device may reach.
//!
//! Set-up, as the kernel's VFIO documentation describes it: the container
//! (`/dev/vfio/vfio`, type-1 IOMMU), the device's IOMMU group (`/dev/vfio/N`, which must
//! be viable: every device in it bound to vfio-pci), the device's descriptor, its BAR0
//! mapped into this process, and bus mastering enabled in its PCI command register.
//! Memory the device touches is mapped into the container at I/O virtual addresses
//! chosen here ([`Vfio::map`]): a bump allocator from 1 MiB, since user virtual
//! addresses can exceed an IOMMU's address width.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// `_IO(';', 100 + n)`.
const fn vfio_io(n: u64) -> u64 {
    (b';' as u64) << 8 | (100 + n)
}
const GET_API_VERSION: u64 = vfio_io(0);
const CHECK_EXTENSION: u64 = vfio_io(1);
const SET_IOMMU: u64 = vfio_io(2);
const GROUP_GET_STATUS: u64 = vfio_io(3);
const GROUP_SET_CONTAINER: u64 = vfio_io(4);
const GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const IOMMU_MAP_DMA: u64 = vfio_io(13);
const IOMMU_UNMAP_DMA: u64 = vfio_io(14);
const TYPE1V2_IOMMU: u64 = 3;
const TYPE1_IOMMU: u64 = 1;
const GROUP_FLAGS_VIABLE: u32 = 1;
const BAR0: u32 = 0;
const CONFIG_REGION: u32 = 7;
/// PCI command register: memory space and bus master enable.
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// The first I/O virtual address handed out.
const IOVA_BASE: u64 = 1 << 20;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

/// An open VFIO device with its container and BAR0.
pub(crate) struct Vfio {
    container: File,
    _group: File,
    device: File,
    bar0: *mut u8,
    bar0_len: usize,
    next_iova: Mutex<u64>,
}

// SAFETY: the BAR mapping is device memory shared by design; registers are accessed
// with volatile reads and writes, and the queues a reactor owns are touched by that
// reactor only (see the controller's module docs).
unsafe impl Send for Vfio {}
// SAFETY: as above.
unsafe impl Sync for Vfio {}

fn ioctl(f: &File, req: u64, arg: u64) -> std::io::Result<i32> {
    // SAFETY: every request used here takes either an integer or a pointer to a
    // repr(C) struct of the size its argsz names, owned by the caller for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, arg) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r) }
}

fn err(addr: &str, what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("PCI device {addr}: {what}"))
}

/// The IOMMU group of the PCI device `addr`, after checking it is bound to vfio-pci.
fn group_of(addr: &str) -> std::io::Result<PathBuf> {
    let dev = Path::new("/sys/bus/pci/devices").join(addr);
    if !dev.exists() {
        return Err(err(addr, "no such device (see /sys/bus/pci/devices)"));
    }
    let driver = std::fs::read_link(dev.join("driver")).ok();
    let driver = driver.as_ref().and_then(|d| d.file_name()).map(|d| d.to_string_lossy());
    if driver.as_deref() != Some("vfio-pci") {
        return Err(err(
            addr,
            format!(
                "bound to {}, not vfio-pci; bind it with: echo {addr} > {d}/driver/unbind; echo \
                 vfio-pci > {d}/driver_override; echo {addr} > /sys/bus/pci/drivers_probe",
                driver.as_deref().unwrap_or("no driver"),
                d = dev.display()
            ),
        ));
    }
    let group = std::fs::read_link(dev.join("iommu_group"))
        .map_err(|e| err(addr, format!("no IOMMU group ({e}): is the IOMMU enabled?")))?;
    let n = group.file_name().ok_or_else(|| err(addr, "bad iommu_group link"))?;
    Ok(Path::new("/dev/vfio").join(n))
}

impl Vfio {
    /// Opens the PCI device `addr` (`0000:00:04.0`).
    pub(crate) fn open(addr: &str) -> std::io::Result<Vfio> {
        let group_path = group_of(addr)?;
        let rw = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
        let container = rw(Path::new("/dev/vfio/vfio"))
            .map_err(|e| err(addr, format!("/dev/vfio/vfio: {e} (is the vfio module loaded?)")))?;
        if ioctl(&container, GET_API_VERSION, 0)? != 0 {
            return Err(err(addr, "unknown VFIO API version"));
        }
        let iommu = if ioctl(&container, CHECK_EXTENSION, TYPE1V2_IOMMU)? > 0 {
            TYPE1V2_IOMMU
        } else if ioctl(&container, CHECK_EXTENSION, TYPE1_IOMMU)? > 0 {
            TYPE1_IOMMU
        } else {
            return Err(err(addr, "the VFIO container offers no type-1 IOMMU"));
        };
        let group = rw(&group_path).map_err(|e| {
            err(addr, format!("{}: {e} (no access to the IOMMU group?)", group_path.display()))
        })?;
        let mut status = GroupStatus { argsz: 8, flags: 0 };
        ioctl(&group, GROUP_GET_STATUS, &mut status as *mut _ as u64)?;
        if status.flags & GROUP_FLAGS_VIABLE == 0 {
            return Err(err(
                addr,
                format!(
                    "IOMMU group {} is not viable: bind every device in it to vfio-pci",
                    group_path.display()
                ),
            ));
        }
        let cfd = container.as_raw_fd();
        ioctl(&group, GROUP_SET_CONTAINER, &cfd as *const i32 as u64)?;
        ioctl(&container, SET_IOMMU, iommu)?;
        let name = std::ffi::CString::new(addr).map_err(|_| err(addr, "bad address"))?;
        let dfd = ioctl(&group, GROUP_GET_DEVICE_FD, name.as_ptr() as u64)?;
        // SAFETY: a fresh descriptor the kernel just returned, owned by nothing else.
        let device = unsafe { File::from_raw_fd(dfd) };
        let (bar0, bar0_len) = map_bar0(&device, addr)?;
        let v = Vfio {
            container,
            _group: group,
            device,
            bar0,
            bar0_len,
            next_iova: Mutex::new(IOVA_BASE),
        };
        v.enable_bus_master()?;
        Ok(v)
    }

    fn enable_bus_master(&self) -> std::io::Result<()> {
        let cfg = region_info(&self.device, CONFIG_REGION)?;
        let mut cmd = [0u8; 2];
        self.device.read_exact_at(&mut cmd, cfg.offset + PCI_COMMAND)?;
        let v = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        self.device.write_all_at(&v.to_le_bytes(), cfg.offset + PCI_COMMAND)
    }

    /// BAR0: its address in this process and its length.
    pub(crate) fn bar0(&self) -> (*mut u8, usize) {
        (self.bar0, self.bar0_len)
    }

    /// Maps `len` bytes at `vaddr` (page-aligned, pinned by the kernel while mapped) for
    /// the device to read and write; returns their I/O virtual address.
    pub(crate) fn map(&self, vaddr: usize, len: usize) -> std::io::Result<u64> {
        assert!(
            vaddr.is_multiple_of(4096) && len.is_multiple_of(4096) && len > 0,
            "DMA map {vaddr:#x}+{len}"
        );
        let mut next = self.next_iova.lock().unwrap_or_else(|e| e.into_inner());
        let iova = *next;
        let map = DmaMap { argsz: 32, flags: 3, vaddr: vaddr as u64, iova, size: len as u64 };
        ioctl(&self.container, IOMMU_MAP_DMA, &map as *const DmaMap as u64)?;
        *next = (iova + len as u64).next_multiple_of(2 << 20);
        Ok(iova)
    }

    /// Unmaps what [`map`](Self::map) mapped at `iova`.
    pub(crate) fn unmap(&self, iova: u64, len: usize) {
        let unmap = DmaUnmap { argsz: 24, flags: 0, iova, size: len as u64 };
        let _ = ioctl(&self.container, IOMMU_UNMAP_DMA, &unmap as *const DmaUnmap as u64);
    }
}

fn region_info(device: &File, index: u32) -> std::io::Result<RegionInfo> {
    let mut info = RegionInfo { argsz: 32, index, ..RegionInfo::default() };
    ioctl(device, DEVICE_GET_REGION_INFO, &mut info as *mut RegionInfo as u64)?;
    Ok(info)
}

fn map_bar0(device: &File, addr: &str) -> std::io::Result<(*mut u8, usize)> {
    let info = region_info(device, BAR0)?;
    if info.size < 0x2000 {
        return Err(err(addr, format!("BAR0 of {} bytes is too small for NVMe", info.size)));
    }
    // SAFETY: a shared mapping of the device's BAR0 region as VFIO describes it; the
    // mapping lives until `Vfio` is dropped.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            info.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            device.as_raw_fd(),
            info.offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(err(addr, format!("mapping BAR0: {}", std::io::Error::last_os_error())));
    }
    Ok((p.cast(), info.size as usize))
}

impl Drop for Vfio {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map_bar0`, unmapped once.
        unsafe { libc::munmap(self.bar0.cast(), self.bar0_len) };
    }
}
