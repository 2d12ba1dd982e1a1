//! NVMe: the command set the NVMe drivers share.
//!
//! An NVMe namespace is an array of logical blocks (512 bytes to 4 KiB here, the LBA
//! format the namespace was formatted with) that commands address by block number:
//! READ and WRITE (with FUA), FLUSH, WRITE ZEROES (optionally deallocating) and
//! DATASET MANAGEMENT's deallocate for discard. A command is 64 bytes; the kernel's
//! passthrough interfaces take its fields in `struct nvme_passthru_cmd` (ioctl) and
//! `struct nvme_uring_cmd` (io_uring `URING_CMD`), which share one layout ([`Cmd`]).
//!
//! What a driver must respect comes from Identify ([`identify`]): the LBA size (the
//! request alignment), the namespace size, the largest transfer (MDTS), and which
//! optional commands the controller has (ONCS).
//!
//! Drivers: [`passthru`] (`driver = "nvme_uring"`): commands through io_uring on the
//! namespace's generic character device `/dev/ngXnY`, skipping the block layer while
//! the kernel keeps the controller; [`user`] (`driver = "nvme"`): the controller itself,
//! driven from userspace over VFIO ([`vfio`], [`ctrl`]), one polled queue pair per
//! reactor ([`queue`]).

pub(crate) mod ctrl;
pub(crate) mod identify;
pub mod passthru;
pub(crate) mod queue;
pub mod user;
pub(crate) mod vfio;

use crate::error::IoError;
use crate::seg::IoSeg;

/// A channel that runs one READ or WRITE command over segments within its limits
/// ([`transfer`] cuts requests to them).
pub(crate) trait OneCommand {
    fn one(
        &self,
        opcode: u8,
        off: u64,
        segs: &[IoSeg<'_>],
        fua: bool,
    ) -> impl std::future::Future<Output = Result<(), IoError>>;
}

/// READ or WRITE of `segs` at `off` through `ch`, cut into commands of at most `max`
/// bytes and `max_segs` segments (one command when the request fits).
pub(crate) async fn transfer<C: OneCommand>(
    ch: &C,
    (opcode, off, fua): (u8, u64, bool),
    segs: &[IoSeg<'_>],
    (max, max_segs): (usize, usize),
) -> Result<(), IoError> {
    if segs.len() <= max_segs && crate::seg::total_len(segs) <= max {
        return ch.one(opcode, off, segs, fua).await;
    }
    for (at, cut) in cuts(segs, max, max_segs) {
        match cut {
            Cut::Run { start, end } => ch.one(opcode, off + at, &segs[start..end], fua).await?,
            Cut::Piece { seg, off: o, len } => {
                let piece = [segs[seg].slice(o, len)];
                ch.one(opcode, off + at, &piece, fua).await?
            }
        }
    }
    Ok(())
}

/// A piece of a request's segment list that one command carries ([`cuts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Whole segments `start..end`.
    Run { start: usize, end: usize },
    /// `len` bytes from `off` into segment `seg` (a segment larger than a command).
    Piece { seg: usize, off: usize, len: usize },
}

/// Cuts `segs` into commands of at most `max` bytes and `max_segs` segments: runs of
/// whole segments, or pieces of a segment too large for one command. Each item is the
/// cut and its byte offset from the start of the request. Segments are whole blocks
/// (the alignment layer's guarantee), so every cut is too when `max` is.
pub(crate) fn cuts<'s>(
    segs: &'s [IoSeg<'_>],
    max: usize,
    max_segs: usize,
) -> impl Iterator<Item = (u64, Cut)> + 's {
    let (mut i, mut piece, mut pos) = (0usize, 0usize, 0u64);
    std::iter::from_fn(move || {
        let s = segs.get(i)?;
        let cut = if s.len() > max {
            let len = (s.len() - piece).min(max);
            let cut = Cut::Piece { seg: i, off: piece, len };
            piece += len;
            if piece == s.len() {
                (i, piece) = (i + 1, 0);
            }
            (len, cut)
        } else {
            let (start, mut n) = (i, 0);
            while i < segs.len() && i - start < max_segs && n + segs[i].len() <= max {
                n += segs[i].len();
                i += 1;
            }
            (n, Cut::Run { start, end: i })
        };
        let at = pos;
        pos += cut.0 as u64;
        Some((at, cut.1))
    })
}

/// NVM command set opcodes.
pub(crate) mod opc {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DSM: u8 = 0x09;
    /// Admin.
    pub const IDENTIFY: u8 = 0x06;
}

/// CDW12 bit of READ/WRITE: force unit access.
pub(crate) const FUA: u32 = 1 << 30;
/// CDW12 bit of WRITE ZEROES: deallocate the blocks too.
pub(crate) const DEAC: u32 = 1 << 25;
/// CDW11 bit of DSM: the ranges are to be deallocated.
pub(crate) const DSM_AD: u32 = 1 << 2;
/// Blocks per READ/WRITE/WRITE ZEROES command (NLB is a 16-bit, 0-based count).
pub(crate) const MAX_NLB: u64 = 1 << 16;

/// An NVMe command in the kernel's passthrough layout (`struct nvme_passthru_cmd`;
/// `struct nvme_uring_cmd` is the same with the last word reserved).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cmd {
    pub opcode: u8,
    pub flags: u8,
    pub rsvd1: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub metadata: u64,
    pub addr: u64,
    pub metadata_len: u32,
    pub data_len: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    pub timeout_ms: u32,
    /// The command's result (DW0 of the completion), written by the ioctl.
    pub result: u32,
}

const _: () = assert!(std::mem::size_of::<Cmd>() == 72);

impl Cmd {
    /// A READ, WRITE or WRITE ZEROES of `nlb` blocks from `slba`.
    pub(crate) fn blocks(opcode: u8, nsid: u32, slba: u64, nlb: u64, cdw12_flags: u32) -> Cmd {
        debug_assert!((1..=MAX_NLB).contains(&nlb), "{nlb} blocks in one command");
        Cmd {
            opcode,
            nsid,
            cdw10: slba as u32,
            cdw11: (slba >> 32) as u32,
            cdw12: (nlb - 1) as u32 | cdw12_flags,
            ..Cmd::default()
        }
    }

    /// The 80 command bytes of a `URING_CMD` submission entry.
    pub(crate) fn uring_bytes(&self) -> [u8; 80] {
        let mut out = [0u8; 80];
        // SAFETY: `Cmd` is repr(C) plain data of 72 bytes without padding (the field
        // offsets are all naturally aligned), so its bytes are initialised; `out` has
        // room for them.
        unsafe {
            std::ptr::copy_nonoverlapping((self as *const Cmd).cast::<u8>(), out.as_mut_ptr(), 72);
        }
        out[68..72].fill(0); // nvme_uring_cmd.rsvd2
        out
    }
}

/// What a completed command's status means to the layers above. `res` is what the
/// kernel returns for a passthrough command: a negative errno, 0, or the NVMe status
/// field (status code type << 8 | status code, with the More and Do Not Retry bits).
pub(crate) fn status(res: i64) -> Result<(), IoError> {
    if res == 0 {
        return Ok(());
    }
    if res < 0 {
        return Err(IoError::from_errno((-res) as i32));
    }
    let sct = (res >> 8) & 0x7;
    let sc = res & 0xff;
    Err(match (sct, sc) {
        // Invalid command opcode, invalid field: the controller lacks the command.
        (0, 0x01 | 0x02) => IoError::NotSupported,
        // LBA out of range.
        (0, 0x80) => IoError::OutOfRange,
        // Capacity exceeded.
        (0, 0x81) => IoError::NoSpace,
        // Attempted write to a read-only range.
        (1, 0x82) => IoError::ReadOnly,
        _ => IoError::Os(libc::EIO),
    })
}

/// Whether a command that completed with `res` may be resubmitted: the controller (or
/// the kernel, resetting it) aborted it without running it to an error, and did not set
/// Do Not Retry. A controller reset cancels what was in flight with "host aborted"
/// (path-related status); the resubmitted command runs on the reset controller.
pub(crate) fn retryable(res: i64) -> bool {
    if res < 0 {
        return matches!((-res) as i32, libc::EINTR | libc::EAGAIN | libc::ECANCELED);
    }
    let dnr = res & 0x4000 != 0;
    let (sct, sc) = ((res >> 8) & 0x7, res & 0xff);
    // Path-related (host aborted, internal path error, controller pathing error);
    // generic: command aborted by request or by SQ deletion, namespace not ready.
    res > 0 && !dnr && (sct == 3 || (sct == 0 && matches!(sc, 0x07 | 0x08 | 0x82)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_layout() {
        let c = Cmd::blocks(opc::WRITE, 1, 0x1_0000_0002, 8, FUA);
        let b = c.uring_bytes();
        assert_eq!(b[0], opc::WRITE);
        assert_eq!(u32::from_ne_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(b[40..44].try_into().unwrap()), 2);
        assert_eq!(u32::from_ne_bytes(b[44..48].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(b[48..52].try_into().unwrap()), 7 | FUA);
    }

    #[test]
    fn cutting() {
        let mut a = vec![0u8; 64 << 10];
        let (x, rest) = a.split_at_mut(4096);
        let (y, z) = rest.split_at_mut(8192);
        let segs = [IoSeg::new(x), IoSeg::new(y), IoSeg::new(z)];
        let c: Vec<_> = cuts(&segs, 16384, 32).collect();
        assert_eq!(
            c,
            vec![
                (0, Cut::Run { start: 0, end: 2 }),
                (12288, Cut::Piece { seg: 2, off: 0, len: 16384 }),
                (28672, Cut::Piece { seg: 2, off: 16384, len: 16384 }),
                (45056, Cut::Piece { seg: 2, off: 32768, len: 16384 }),
                (61440, Cut::Piece { seg: 2, off: 49152, len: 4096 }),
            ]
        );
        let c: Vec<_> = cuts(&segs[..2], 1 << 20, 1).collect();
        assert_eq!(
            c,
            vec![(0, Cut::Run { start: 0, end: 1 }), (4096, Cut::Run { start: 1, end: 2 })]
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(status(0), Ok(()));
        assert_eq!(status(-i64::from(libc::EIO)), Err(IoError::Os(libc::EIO)));
        assert_eq!(status(0x0002), Err(IoError::NotSupported));
        assert_eq!(status(0x4080), Err(IoError::OutOfRange)); // DNR set
        assert_eq!(status(0x0281), Err(IoError::Os(libc::EIO))); // media error class
        assert!(retryable(0x0371)); // host aborted (a controller reset)
        assert!(retryable(0x0082)); // namespace not ready
        assert!(!retryable(0x4082)); // ... with Do Not Retry
        assert!(!retryable(0x0281) && !retryable(0x0080) && !retryable(0));
        assert!(retryable(-i64::from(libc::EINTR)) && !retryable(-i64::from(libc::EIO)));
    }
}
