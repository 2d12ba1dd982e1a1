//! Identify and synchronous commands through the kernel's passthrough ioctls, for
//! opening a namespace and for the control plane.

use std::os::fd::RawFd;

use super::{Cmd, opc};

/// `_IO('N', 0x40)`: the namespace ID of a namespace device.
const NVME_IOCTL_ID: libc::c_ulong = 0x4e40;
/// `_IOWR('N', 0x41, struct nvme_passthru_cmd)`.
const NVME_IOCTL_ADMIN_CMD: libc::c_ulong = 0xc048_4e41;
/// `_IOWR('N', 0x43, struct nvme_passthru_cmd)`.
const NVME_IOCTL_IO_CMD: libc::c_ulong = 0xc048_4e43;

/// What the drivers need from Identify Controller and Identify Namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NsInfo {
    pub nsid: u32,
    /// log2 of the LBA size.
    pub lba_shift: u32,
    /// Namespace size in logical blocks (NSZE).
    pub blocks: u64,
    /// Largest transfer in bytes (MDTS, taking the minimum memory page size as 4 KiB),
    /// `None` when the controller sets no limit.
    pub max_transfer: Option<u64>,
    /// ONCS: WRITE ZEROES and DATASET MANAGEMENT.
    pub write_zeroes: bool,
    pub dsm: bool,
    /// DLFEAT: deallocated blocks read as zeros.
    pub dealloc_zeroes: bool,
}

/// Why a namespace cannot be served.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NsError {
    /// The namespace carries metadata with each block, which this driver does not
    /// transfer.
    Metadata(u16),
    /// An LBA size outside 512 bytes..4 KiB.
    BlockSize(u64),
    /// NSZE is zero: the namespace is missing or not attached.
    Empty,
}

impl std::fmt::Display for NsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NsError::Metadata(ms) => write!(
                f,
                "the namespace is formatted with {ms} bytes of metadata per block, which is \
                 not supported: format it with an LBA format without metadata"
            ),
            NsError::BlockSize(b) => write!(
                f,
                "the namespace's block size ({b} bytes) is not supported (512 bytes to 4 KiB)"
            ),
            NsError::Empty => f.write_str("the namespace has no blocks (not attached?)"),
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses Identify Controller (`ctrl`) and Identify Namespace (`ns`) data.
pub(crate) fn parse(nsid: u32, ctrl: &[u8], ns: &[u8]) -> Result<NsInfo, NsError> {
    assert!(ctrl.len() >= 4096 && ns.len() >= 4096, "identify data is 4 KiB");
    let mdts = ctrl[77];
    let oncs = le16(ctrl, 520);
    let blocks = le64(ns, 0);
    if blocks == 0 {
        return Err(NsError::Empty);
    }
    let nlbaf = usize::from(ns[25]) + 1;
    let flbas = ns[26];
    let index = usize::from(flbas & 0xf) | (usize::from((flbas >> 5) & 0x3) << 4);
    let lbaf = u32::from_le_bytes(ns[128 + 4 * index.min(63)..][..4].try_into().expect("4"));
    let ms = (lbaf & 0xffff) as u16;
    let lbads = (lbaf >> 16) & 0xff;
    if index >= nlbaf.max(1) || !(9..=12).contains(&lbads) {
        return Err(NsError::BlockSize(if lbads < 64 { 1u64 << lbads } else { 0 }));
    }
    if ms != 0 {
        return Err(NsError::Metadata(ms));
    }
    Ok(NsInfo {
        nsid,
        lba_shift: lbads,
        blocks,
        max_transfer: (mdts != 0).then(|| 4096u64 << mdts.min(20)),
        write_zeroes: oncs & (1 << 3) != 0,
        dsm: oncs & (1 << 2) != 0,
        dealloc_zeroes: ns[33] & 0x7 == 1,
    })
}

/// The namespace ID of the namespace device open at `fd`; `ENOTTY` if it is none.
pub(crate) fn namespace_id(fd: RawFd) -> std::io::Result<u32> {
    // SAFETY: NVME_IOCTL_ID takes no argument; a descriptor of another kind fails.
    let r = unsafe { libc::ioctl(fd, NVME_IOCTL_ID as _) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r as u32) }
}

/// Runs `cmd` synchronously through `request` (an ioctl); its data buffer, if any, is
/// `cmd.addr`/`cmd.data_len`. A positive status is an NVMe error.
fn passthru(fd: RawFd, request: libc::c_ulong, cmd: &mut Cmd) -> std::io::Result<()> {
    // SAFETY: `cmd` is the kernel's `struct nvme_passthru_cmd` (72 bytes, checked at
    // compile time); the buffer it names is owned by the caller for this call.
    let r = unsafe { libc::ioctl(fd, request as _, cmd as *mut Cmd) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    super::status(i64::from(r)).map_err(|e| {
        std::io::Error::other(format!(
            "NVMe command {:#04x} failed: status {r:#x} ({e})",
            cmd.opcode
        ))
    })
}

/// Identify Controller and Namespace for the namespace open at `fd`.
pub(crate) fn identify(fd: RawFd, nsid: u32) -> std::io::Result<Result<NsInfo, NsError>> {
    // The kernel copies through a bounce buffer where a user buffer does not suit
    // the device.
    let mut ctrl = vec![0u8; 4096];
    let mut ns = vec![0u8; 4096];
    for (cns, id, buf) in [(1u32, 0u32, &mut ctrl), (0, nsid, &mut ns)] {
        let mut cmd = Cmd {
            opcode: opc::IDENTIFY,
            nsid: id,
            addr: buf.as_mut_ptr() as u64,
            data_len: 4096,
            cdw10: cns,
            ..Cmd::default()
        };
        passthru(fd, NVME_IOCTL_ADMIN_CMD, &mut cmd)?;
    }
    Ok(parse(nsid, &ctrl, &ns))
}

/// A synchronous I/O command of `buf.len()` bytes at block `slba` (READ, WRITE or
/// FLUSH with an empty buffer).
pub(crate) fn io_sync(
    fd: RawFd,
    nsid: u32,
    opcode: u8,
    slba: u64,
    nlb: u64,
    buf: *mut u8,
    len: usize,
) -> std::io::Result<()> {
    let mut cmd = if opcode == opc::FLUSH {
        Cmd { opcode, nsid, ..Cmd::default() }
    } else {
        Cmd::blocks(opcode, nsid, slba, nlb, 0)
    };
    cmd.addr = buf as u64;
    cmd.data_len = len as u32;
    passthru(fd, NVME_IOCTL_IO_CMD, &mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(mdts: u8, oncs: u16, nsze: u64, flbas: u8, lbafs: &[(u16, u8)]) -> (Vec<u8>, Vec<u8>) {
        let mut c = vec![0u8; 4096];
        c[77] = mdts;
        c[520..522].copy_from_slice(&oncs.to_le_bytes());
        let mut n = vec![0u8; 4096];
        n[0..8].copy_from_slice(&nsze.to_le_bytes());
        n[25] = (lbafs.len() - 1) as u8;
        n[26] = flbas;
        n[33] = 1;
        for (i, &(ms, lbads)) in lbafs.iter().enumerate() {
            let v = u32::from(ms) | (u32::from(lbads) << 16);
            n[128 + 4 * i..][..4].copy_from_slice(&v.to_le_bytes());
        }
        (c, n)
    }

    #[test]
    fn identify_data() {
        let (c, n) = data(7, 0b1100, 1 << 20, 1, &[(0, 9), (0, 12)]);
        let i = parse(1, &c, &n).unwrap();
        assert_eq!(i.lba_shift, 12);
        assert_eq!(i.blocks, 1 << 20);
        assert_eq!(i.max_transfer, Some(512 << 10));
        assert!(i.write_zeroes && i.dsm && i.dealloc_zeroes);
        let (c, n) = data(0, 0, 8, 0, &[(8, 9)]);
        assert_eq!(parse(1, &c, &n), Err(NsError::Metadata(8)));
        let (c, n) = data(0, 0, 8, 0, &[(0, 16)]);
        assert_eq!(parse(1, &c, &n), Err(NsError::BlockSize(65536)));
        let (c, n) = data(0, 0, 8, 3, &[(0, 9)]);
        assert!(matches!(parse(1, &c, &n), Err(NsError::BlockSize(_))));
        let (c, n) = data(0, 0, 0, 0, &[(0, 9)]);
        assert_eq!(parse(1, &c, &n), Err(NsError::Empty));
        let (c, n) = data(0, 0, 8, 0, &[(0, 9)]);
        assert_eq!(parse(1, &c, &n).unwrap().max_transfer, None);
    }
}
