//! Internal snapshots, offline (`qemu-img snapshot -c|-a|-d|-l`): create, apply
//! (revert to) and delete entries of the qcow2 snapshot table of an image not in use.
//!
//! Every change is one metadata transaction that a power cut cannot tear: the new
//! structures — L1 tables, the L2 tables whose COPIED flags change, the snapshot table,
//! and a refcount structure counted for the new state — are written after the end of
//! the file and synced, where nothing refers to them; then one write of the header's
//! first sector (size, L1 table, refcount table, snapshot table and the autoclear
//! bits, bytes 24..96) switches to them, and is synced; then a leak repair frees what
//! the old state alone used. A cut before the switch leaves the old image, after it the
//! new one, each with leaked clusters at worst. COPIED flags are right in both: L2
//! tables are never edited in place, but copied with the new flags.
//!
//! - create: the active L1 table's L2 tables are copied with COPIED cleared (they are
//!   shared from now on), and two L1 tables point at the copies: the new active one
//!   and the snapshot's (QEMU edits the tables in place instead, and counts on its
//!   ordering);
//! - delete: the entry leaves the table; active L2 tables whose clusters the snapshot
//!   alone shared get COPIED back where their refcount falls to 1 (copied with it);
//! - apply: the active L1 table becomes a copy of the snapshot's (everything shared,
//!   nothing COPIED), the size the snapshot's; persistent bitmaps are invalidated (they
//!   describe the state left behind).
//!
//! Cost: a create copies every L2 table of the image and each change counts all
//! references (a check's walk); fine for a tool, and why the online path is separate.

use std::path::Path;

use crate::error::OpenError;

use super::check::{Repair, check_io, recount_refs, repair_if_dirty_io, write_refcounts};
use crate::format::qcow2::header::Header;
use crate::format::qcow2::open::{MetaIo, read_at, read_header, read_table};
use crate::format::qcow2::snapshot::{SnapshotInfo, read_snapshots};
use crate::format::qcow2::types::*;

/// QEMU's limits: snapshots per image, bytes of a name or id.
const MAX_SNAPSHOTS: usize = 65536;
const MAX_NAME: usize = 65535;

/// The snapshots of the image at `path`.
pub fn list(path: &Path) -> Result<Vec<SnapshotInfo>, OpenError> {
    let f = std::fs::File::open(path).map_err(|e| OpenError::io(path, e))?;
    let (h, size) = read_header(path, &f)?;
    Ok(read_snapshots(path, &f, &h, size)?.1)
}

/// What a change does.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// A new snapshot named `name`, dated `now` (seconds, nanoseconds).
    Create {
        name: &'a str,
        now: (u32, u32),
    },
    Apply(&'a str),
    Delete(&'a str),
}

/// Runs `op` on the image at `path`, which must not be in use (it is locked).
pub fn change(path: &Path, op: Op<'_>) -> Result<(), OpenError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| OpenError::io(path, e))?;
    crate::io::lock::lock_image(&f, path, true)?;
    change_io(path, &f, op)
}

/// [`change`] over any [`MetaIo`]; `path` names the image in messages.
pub fn change_io(path: &Path, f: &dyn MetaIo, op: Op<'_>) -> Result<(), OpenError> {
    let invalid = |m: String| OpenError::invalid(path, m);
    repair_if_dirty_io(path, f)?;
    let (h, file_size) = read_header(path, f)?;
    if h.is_corrupt() {
        return Err(invalid("the image is marked corrupt; repair it (check -r all) first".into()));
    }
    let report = check_io(path, f, Repair::None, &mut |_, _| {})?;
    if report.corruptions > 0 || report.check_errors > 0 {
        return Err(invalid(format!(
            "the image has {} corruption(s); repair it (check -r all) first",
            report.corruptions + report.check_errors
        )));
    }
    let (_, snaps) = read_snapshots(path, f, &h, file_size)?;
    refuse(path, &h, &snaps, &op)?;
    let mut t = Txn { f, path, cs: h.cluster_size(), next: 0, h: h.clone() };
    t.next = file_size.div_ceil(t.cs).max(1);
    let io = |e| OpenError::io(path, e);
    match op {
        Op::Create { name, now } => {
            let l1 = read_table(path, f, h.l1_table_offset, u64::from(h.l1_size))?;
            let shared = t.copy_l2s(&l1, |_, e| e & !OFLAG_COPIED).map_err(io)?;
            let active = t.put_table(&shared).map_err(io)?;
            let theirs = t.put_table(&shared).map_err(io)?;
            let id = next_id(&snaps);
            let entry = entry(&h, theirs, h.l1_size, &id, name, now);
            let mut raws: Vec<&[u8]> = snaps.iter().map(|s| s.raw.as_slice()).collect();
            raws.push(&entry);
            let table = t.put_bytes(&raws.concat()).map_err(io)?;
            t.h.l1_table_offset = active;
            t.h.nb_snapshots += 1;
            t.h.snapshots_offset = table;
        }
        Op::Delete(which) => {
            let i = find(&snaps, which).ok_or_else(|| invalid(missing(which)))?;
            let raws: Vec<&[u8]> = snaps
                .iter()
                .enumerate()
                .filter(|&(k, _)| k != i)
                .map(|(_, s)| &s.raw[..])
                .collect();
            t.h.nb_snapshots -= 1;
            t.h.snapshots_offset =
                if raws.is_empty() { 0 } else { t.put_bytes(&raws.concat()).map_err(io)? };
            // What each cluster's refcount becomes without the snapshot.
            let counts = recount_refs(path, f, &t.h, t.next * t.cs)?;
            let cs = t.cs;
            let one = |off: u64| counts.get((off / cs) as usize) == Some(&1);
            let l1 = read_table(path, f, h.l1_table_offset, u64::from(h.l1_size))?;
            let fixed = t.copy_l2s_if_needed(&l1, &one).map_err(io)?;
            t.h.l1_table_offset = t.put_table(&fixed).map_err(io)?;
        }
        Op::Apply(which) => {
            let i = find(&snaps, which).ok_or_else(|| invalid(missing(which)))?;
            let s = &snaps[i];
            let theirs = read_table(path, f, s.l1_offset, u64::from(s.l1_size))?;
            let shared: Vec<u64> = theirs.iter().map(|e| e & !OFLAG_COPIED).collect();
            t.h.l1_table_offset = t.put_table(&shared).map_err(io)?;
            t.h.l1_size = s.l1_size;
            t.h.size = s.disk_size.unwrap_or(h.size);
            // The bitmaps describe the state left behind.
            t.h.autoclear &= !AUTOCLEAR_BITMAPS;
        }
    }
    t.commit()
}

/// Refuses `op` as [`change_io`] would, without changing the image: the cheap checks
/// to run before taking an image out of service for the change.
pub fn precheck_io(path: &Path, f: &dyn MetaIo, op: &Op<'_>) -> Result<(), OpenError> {
    let (h, file_size) = read_header(path, f)?;
    let (_, snaps) = read_snapshots(path, f, &h, file_size)?;
    refuse(path, &h, &snaps, op)
}

/// Why `op` cannot run on an image with header `h` and snapshots `snaps`.
fn refuse(path: &Path, h: &Header, snaps: &[SnapshotInfo], op: &Op<'_>) -> Result<(), OpenError> {
    let invalid = |m: String| Err(OpenError::invalid(path, m));
    match *op {
        Op::Create { name, .. } => {
            if name.is_empty() || name.len() > MAX_NAME {
                return invalid(format!("snapshot name {name:?} is empty or too long"));
            }
            if snaps.iter().any(|s| s.name == name) {
                return invalid(format!("a snapshot named {name:?} exists"));
            }
            if h.data_file().is_some() {
                return invalid(
                    "an image with an external data file cannot hold internal snapshots".into(),
                );
            }
            if h.geometry().refcount_bits() < 2 {
                return invalid(
                    "1-bit refcounts cannot count a cluster shared with a snapshot".into(),
                );
            }
            if snaps.len() >= MAX_SNAPSHOTS {
                return invalid(format!("the image has {MAX_SNAPSHOTS} snapshots already"));
            }
        }
        Op::Apply(which) | Op::Delete(which) => {
            if find(snaps, which).is_none() {
                return invalid(missing(which));
            }
        }
    }
    Ok(())
}

fn missing(which: &str) -> String {
    format!("no snapshot with the name or id {which:?}")
}

/// A snapshot by name, else by id (as qemu-img looks them up).
fn find(snaps: &[SnapshotInfo], which: &str) -> Option<usize> {
    snaps.iter().position(|s| s.name == which).or_else(|| snaps.iter().position(|s| s.id == which))
}

/// The next numeric id (QEMU numbers them 1, 2, ...).
fn next_id(snaps: &[SnapshotInfo]) -> String {
    let max = snaps.iter().filter_map(|s| s.id.parse::<u64>().ok()).max().unwrap_or(0);
    (max + 1).to_string()
}

/// A snapshot table entry (padded to 8 bytes), with the version 3 extra data.
fn entry(h: &Header, l1: u64, l1_size: u32, id: &str, name: &str, now: (u32, u32)) -> Vec<u8> {
    let mut e = vec![0u8; 56];
    e[0..8].copy_from_slice(&l1.to_be_bytes());
    e[8..12].copy_from_slice(&l1_size.to_be_bytes());
    e[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
    e[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
    e[16..20].copy_from_slice(&now.0.to_be_bytes());
    e[20..24].copy_from_slice(&now.1.to_be_bytes());
    // vm_clock_nsec 0, vm_state_size 0; 16 bytes of extra data.
    e[36..40].copy_from_slice(&16u32.to_be_bytes());
    e[48..56].copy_from_slice(&h.size.to_be_bytes());
    e.extend_from_slice(id.as_bytes());
    e.extend_from_slice(name.as_bytes());
    e.resize(e.len().div_ceil(8) * 8, 0);
    e
}

/// One transaction: new structures appended after the end, then [`Txn::commit`].
struct Txn<'a> {
    f: &'a dyn MetaIo,
    path: &'a Path,
    cs: u64,
    /// The next cluster to append at.
    next: u64,
    /// The header to switch to.
    h: Header,
}

impl Txn<'_> {
    /// Appends `buf` (padded to whole clusters); its offset.
    fn put_bytes(&mut self, buf: &[u8]) -> std::io::Result<u64> {
        let n = (buf.len() as u64).div_ceil(self.cs).max(1);
        let mut padded = buf.to_vec();
        padded.resize((n * self.cs) as usize, 0);
        let off = self.next * self.cs;
        self.f.meta_write(&padded, off)?;
        self.next += n;
        Ok(off)
    }

    /// The entries of the L2 table at `l2`.
    fn read_l2(&self, l2: u64) -> std::io::Result<Vec<u64>> {
        let t = read_at(self.f, l2, self.cs as usize)?;
        Ok(t.chunks_exact(8).map(|b| u64::from_be_bytes(b.try_into().expect("8"))).collect())
    }

    fn put_table(&mut self, t: &[u64]) -> std::io::Result<u64> {
        let bytes: Vec<u8> = t.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.put_bytes(&bytes)
    }

    /// Copies every L2 table of `l1` with each entry passed through `map(offset, e)`;
    /// the new L1 entries (COPIED clear: the copies are shared).
    fn copy_l2s(&mut self, l1: &[u64], map: impl Fn(u64, u64) -> u64) -> std::io::Result<Vec<u64>> {
        let mut out = vec![0u64; l1.len()];
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let words = self.h.geometry().l2_words();
            // Entries only: an extended entry's second word is its subcluster bitmap.
            let new: Vec<u64> = (self.read_l2(l2)?.into_iter().enumerate())
                .map(|(k, x)| if k % words == 0 { map(l2, x) } else { x })
                .collect();
            out[i] = self.put_table(&new)?;
        }
        Ok(out)
    }

    /// The active L1 table with COPIED set exactly where `one(offset)` (refcount 1):
    /// L2 tables whose entries' flags change are copied with the right flags (the copy
    /// is the active table's alone, so COPIED).
    fn copy_l2s_if_needed(
        &mut self,
        l1: &[u64],
        one: &dyn Fn(u64) -> bool,
    ) -> std::io::Result<Vec<u64>> {
        let mut out = vec![0u64; l1.len()];
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let old = self.read_l2(l2)?;
            let words = self.h.geometry().l2_words();
            let new: Vec<u64> = (old.iter().enumerate())
                .map(|(k, &x)| if k % words == 0 { with_copied(x, one) } else { x })
                .collect();
            out[i] = if new == old {
                l2 | if one(l2) { OFLAG_COPIED } else { 0 }
            } else if one(l2) {
                self.put_table(&new)? | OFLAG_COPIED
            } else {
                // A shared L2 table reaching a cluster only it references: the checked
                // image cannot have that; refuse rather than guess.
                return Err(std::io::Error::other(format!(
                    "the shared L2 table at {l2:#x} has inconsistent COPIED flags"
                )));
            };
        }
        Ok(out)
    }

    /// Counts references of the new state, writes its refcount structure, switches the
    /// header in one write, and frees what only the old state used.
    fn commit(mut self) -> Result<(), OpenError> {
        let io = |e| OpenError::io(self.path, e);
        self.f.meta_sync().map_err(io)?;
        let counts = recount_refs(self.path, self.f, &self.h, self.next * self.cs)?;
        let mut counts = counts;
        counts.resize(counts.len().max(self.next as usize), 0);
        let (rt, rt_clusters) = write_refcounts(self.f, &self.h, &counts).map_err(io)?;
        self.h.refcount_table_offset = rt;
        self.h.refcount_table_clusters = rt_clusters;
        let first = read_at(self.f, 0, 512).map_err(io)?;
        let mut s = first.clone();
        s[24..32].copy_from_slice(&self.h.size.to_be_bytes());
        s[36..40].copy_from_slice(&self.h.l1_size.to_be_bytes());
        s[40..48].copy_from_slice(&self.h.l1_table_offset.to_be_bytes());
        s[48..56].copy_from_slice(&rt.to_be_bytes());
        s[56..60].copy_from_slice(&rt_clusters.to_be_bytes());
        s[60..64].copy_from_slice(&self.h.nb_snapshots.to_be_bytes());
        s[64..72].copy_from_slice(&self.h.snapshots_offset.to_be_bytes());
        if self.h.version >= 3 {
            s[88..96].copy_from_slice(&self.h.autoclear.to_be_bytes());
        }
        self.f.meta_write(&s, 0).map_err(io)?;
        self.f.meta_sync().map_err(io)?;
        check_io(self.path, self.f, Repair::Leaks, &mut |_, _| {})?;
        // The result must open.
        read_header(self.path, self.f)?;
        Ok(())
    }
}

/// An L2 entry with COPIED set exactly when its cluster's refcount is 1 (compressed
/// and unallocated entries never have it).
fn with_copied(e: u64, one: &dyn Fn(u64) -> bool) -> u64 {
    let host = e & OFFSET_MASK;
    if e & OFLAG_COMPRESSED != 0 || host == 0 {
        return e & !OFLAG_COPIED;
    }
    if one(host) { e | OFLAG_COPIED } else { e & !OFLAG_COPIED }
}

#[cfg(test)]
mod tests {
    //! Every power cut during a create, a delete and an apply leaves an image that
    //! checks without corruption (leaks allowed), with the snapshot or without it.

    use super::*;
    use crate::format::qcow2::create::{CreateOptions, create};
    use crate::format::qcow2::tools::powercut::{Mem, cut};

    /// A fresh image with `n` data clusters mapped at the start (made by hand, with
    /// refcounts and COPIED flags rebuilt by a full repair).
    fn image(cs: u64, bits: u32, n: u64) -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img.qcow2");
        let o = CreateOptions {
            size: 8 << 20,
            cluster_size: cs,
            refcount_bits: bits,
            preallocate_metadata: true,
            ..CreateOptions::default()
        };
        create(&p, &o).unwrap();
        let m = Mem::with(std::fs::read(&p).unwrap());
        let (h, size) = read_header(&p, &m).unwrap();
        let l1 = read_table(&p, &m, h.l1_table_offset, u64::from(h.l1_size)).unwrap();
        let l2 = l1[0] & OFFSET_MASK;
        let first = size.div_ceil(cs);
        for k in 0..n {
            let host = (first + k) * cs;
            m.meta_write(&vec![k as u8 + 1; cs as usize], host).unwrap();
            m.meta_write(&(host | OFLAG_COPIED).to_be_bytes(), l2 + k * 8).unwrap();
        }
        let r = check_io(&p, &m, Repair::All, &mut |_, _| {}).unwrap();
        assert_eq!(r.corruptions, 0, "{:?}", r.messages);
        (dir, m.data.into_inner())
    }

    fn names(path: &Path, m: &Mem) -> Vec<String> {
        let (h, size) = read_header(path, m).unwrap();
        read_snapshots(path, m, &h, size).unwrap().1.into_iter().map(|s| s.name).collect()
    }

    /// Runs `op` on `initial`, then checks every power cut of it.
    fn every_cut(path: &Path, initial: &[u8], op: Op<'_>, before: &[&str], after: &[&str]) {
        let m = Mem::with(initial.to_vec());
        change_io(path, &m, op).unwrap();
        let r = check_io(path, &m, Repair::None, &mut |_, _| {}).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
        assert_eq!(names(path, &m), after);
        let log = m.log.into_inner();
        for k in 0..=log.len() {
            let (all, synced) = cut(initial, &log, k);
            for (img, how) in [(all, "all written"), (synced, "synced only")] {
                let m = Mem::with(img);
                let what = format!("cut at op {k} of {} ({how})", log.len());
                let r = check_io(path, &m, Repair::None, &mut |_, _| {}).unwrap();
                assert_eq!((r.corruptions, r.check_errors), (0, 0), "{what}: {:?}", r.messages);
                let n = names(path, &m);
                assert!(n == before || n == after, "{what}: {n:?}");
            }
        }
    }

    #[test]
    fn every_power_cut_during_create_delete_and_apply_checks_clean() {
        let (dir, one_bit) = image(4096, 1, 2);
        let e = change_io(
            &dir.path().join("img.qcow2"),
            &Mem::with(one_bit),
            Op::Create { name: "a", now: (0, 0) },
        )
        .unwrap_err();
        assert!(e.to_string().contains("1-bit"), "{e}");
        for (cs, bits) in [(65536, 16), (4096, 2), (1024, 64)] {
            let (dir, initial) = image(cs, bits, 5);
            let path = dir.path().join("img.qcow2");
            let m = Mem::with(initial.clone());
            let now = (1, 2);
            every_cut(&path, &initial, Op::Create { name: "a", now }, &[], &["a"]);
            change_io(&path, &m, Op::Create { name: "a", now }).unwrap();
            change_io(&path, &m, Op::Create { name: "b", now }).unwrap();
            let two = m.data.borrow().clone();
            every_cut(&path, &two, Op::Apply("a"), &["a", "b"], &["a", "b"]);
            every_cut(&path, &two, Op::Delete("a"), &["a", "b"], &["b"]);
            every_cut(&path, &two, Op::Delete("2"), &["a", "b"], &["a"]);
            let e = change_io(&path, &m, Op::Create { name: "a", now }).unwrap_err();
            assert!(e.to_string().contains("exists"), "{e}");
            let e = change_io(&path, &m, Op::Delete("zz")).unwrap_err();
            assert!(e.to_string().contains("zz"), "{e}");
        }
    }
}
