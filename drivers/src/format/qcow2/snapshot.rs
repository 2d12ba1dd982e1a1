//! The internal snapshot table: parsed and bounds-checked so that an image with
//! snapshots opens safely (and `check` can count the snapshots' clusters). Writes
//! respect the clusters the snapshots share through their refcounts (COPIED flag clear
//! means copy on write); `tools::snapshots` creates, applies and deletes them offline.

use std::path::Path;

use crate::error::OpenError;

use super::header::Header;
use super::open::{MetaIo, read_at};
use super::types::*;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub l1_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// The disk's size when the snapshot was taken (version 3 extra data).
    pub disk_size: Option<u64>,
    /// The entry as stored (padded to 8 bytes), for rewriting the table.
    pub raw: Vec<u8>,
}

/// The snapshot table's extent in bytes, and its entries.
pub(crate) fn read_snapshots(
    path: &Path,
    f: &dyn MetaIo,
    h: &Header,
    file_size: u64,
) -> Result<(u64, Vec<SnapshotInfo>), OpenError> {
    if h.nb_snapshots == 0 {
        return Ok((0, Vec::new()));
    }
    let g = h.geometry();
    let bad = |m: String| OpenError::invalid(path, format!("snapshot table: {m}"));
    // Entries are variable-sized; read generously, bounded by the file.
    let max = (file_size.saturating_sub(h.snapshots_offset)).min(64 << 20) as usize;
    let buf = read_at(f, h.snapshots_offset, max).map_err(|e| OpenError::io(path, e))?;
    let mut off = 0usize;
    let mut out = Vec::with_capacity(h.nb_snapshots as usize);
    for i in 0..h.nb_snapshots {
        if off + 40 > buf.len() {
            return Err(bad(format!("entry {i} runs past the end of the file")));
        }
        let e = &buf[off..];
        let l1_offset = u64::from_be_bytes(e[0..8].try_into().expect("8"));
        let l1_size = u32::from_be_bytes(e[8..12].try_into().expect("4"));
        let id_len = u16::from_be_bytes(e[12..14].try_into().expect("2")) as usize;
        let name_len = u16::from_be_bytes(e[14..16].try_into().expect("2")) as usize;
        let vm32 = u32::from_be_bytes(e[32..36].try_into().expect("4"));
        let extra = u32::from_be_bytes(e[36..40].try_into().expect("4")) as usize;
        if extra > 1024 {
            return Err(bad(format!("entry {i} has {extra} bytes of extra data")));
        }
        let len = 40 + extra + id_len + name_len;
        if off + len > buf.len() {
            return Err(bad(format!("entry {i} runs past the end of the file")));
        }
        let vm_state_size = if extra >= 8 {
            u64::from_be_bytes(e[40..48].try_into().expect("8"))
        } else {
            u64::from(vm32)
        };
        if l1_offset % g.cluster_size() != 0 || (l1_size > 0 && l1_offset == 0) {
            return Err(bad(format!("entry {i} has a misaligned L1 table offset {l1_offset:#x}")));
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES
            || l1_offset.saturating_add(u64::from(l1_size) * 8)
                > file_size.div_ceil(g.cluster_size()) * g.cluster_size()
        {
            return Err(bad(format!("entry {i} has an L1 table outside the file")));
        }
        let id = String::from_utf8_lossy(&e[40 + extra..40 + extra + id_len]).into_owned();
        let name = String::from_utf8_lossy(&e[40 + extra + id_len..len]).into_owned();
        let be32 = |o: usize| u32::from_be_bytes(e[o..o + 4].try_into().expect("4"));
        let padded = len.div_ceil(8) * 8;
        out.push(SnapshotInfo {
            l1_offset,
            l1_size,
            id,
            name,
            vm_state_size,
            date_sec: be32(16),
            date_nsec: be32(20),
            vm_clock_nsec: u64::from_be_bytes(e[24..32].try_into().expect("8")),
            disk_size: (extra >= 16).then(|| u64::from_be_bytes(e[48..56].try_into().expect("8"))),
            raw: e[..padded.min(e.len())].to_vec(),
        });
        off += padded;
    }
    Ok((off as u64, out))
}
