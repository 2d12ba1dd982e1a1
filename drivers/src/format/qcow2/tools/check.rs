//! `check`: recompute every cluster's refcount from the metadata and compare it with
//! what the image stores, as `qemu-img check` does; optionally repair.
//!
//! References counted: the header cluster, the active L1 table and every snapshot's
//! L1 table, each L2 table once per L1 table reaching it, each data cluster once per L2
//! table reaching it (compressed clusters count every host cluster they touch), the
//! refcount table and blocks, the snapshot table, and the bitmap directory, tables and
//! data. A stored refcount below the computed one is corruption (a cluster could be
//! reused while referenced); above it, a leak. Also corruption: invalid or misaligned
//! entries, references past the end of the file, and COPIED flags that disagree with
//! refcounts in the active tables.
//!
//! Repair: `Leaks` lowers leaked refcounts in place. `All` also clears invalid L2
//! entries, fixes COPIED flags, and rebuilds the refcount structure at the end of the
//! file from the computed counts (written and synced before the header switches to
//! it, in one write). The same rebuild repairs a dirty lazy-refcounts image at open.

use std::fs::{File, OpenOptions};
use std::path::Path;

use crate::error::OpenError;

use crate::format::qcow2::header::Header;
use crate::format::qcow2::open::{
    MetaIo, read_at, read_header_any_crypt as read_header, read_table,
};
use crate::format::qcow2::snapshot::read_snapshots;
use crate::format::qcow2::types::*;

/// How much to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    None,
    Leaks,
    All,
}

/// The outcome of a check (field names follow `qemu-img check --output=json`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// Human-readable findings.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// The exit code `qemu-img check` would use: 0 clean, 2 corrupt, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

struct Walk<'a> {
    f: &'a dyn MetaIo,
    h: &'a Header,
    g: Geometry,
    file_clusters: u64,
    counts: Vec<u64>,
    report: CheckReport,
    /// Invalid L2 entries, of the active table or a snapshot's: (L2 table offset,
    /// index). A full repair zeroes them: what they point at does not exist.
    bad_entries: Vec<(u64, usize)>,
    /// Active data clusters per entry for the COPIED check: (table, index, raw, cluster).
    active_refs: Vec<(u64, usize, u64, u64)>,
    active_l2: Vec<(usize, u64, u64)>,
    /// Byte offsets of L1 entries (active or a snapshot's) that are invalid or point past the end of the
    /// file (zeroed by a full repair: the table they name does not exist).
    bad_l1: Vec<u64>,
    /// A bitmap structure is invalid or outside the file (a full repair drops the
    /// bitmaps, clearing their autoclear bit: they are only dirty-tracking hints).
    bad_bitmaps: bool,
    /// Count references past the end of the file (growing `counts`) instead of
    /// reporting them: the recount before a rebuild, whose new structures go after
    /// everything still referenced.
    grow: bool,
}

/// How far past the end of the file a recount follows references (in clusters).
const MAX_GROW_CLUSTERS: u64 = 1 << 22;
/// The most host clusters a check (or the repair of a dirty image at open) counts:
/// it keeps 16 bytes per cluster of the file (computed and stored refcounts), so this
/// bounds it at 4 GiB — a 16 TiB file of 64 KiB clusters. Larger files, real or
/// sparse and hostile, get an error instead of an allocation that follows them.
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// Refuses files with more clusters than [`MAX_CHECK_CLUSTERS`].
fn check_size(path: &Path, file_size: u64, g: &Geometry) -> Result<u64, OpenError> {
    let clusters = file_size.div_ceil(g.cluster_size());
    if clusters > MAX_CHECK_CLUSTERS {
        return Err(OpenError::invalid(
            path,
            format!(
                "the file has {clusters} clusters of {} bytes; counting refcounts is limited to {MAX_CHECK_CLUSTERS} clusters ({} GiB of memory)",
                g.cluster_size(),
                (MAX_CHECK_CLUSTERS * 16) >> 30
            ),
        ));
    }
    Ok(clusters)
}

impl Walk<'_> {
    fn error(&mut self, m: String) {
        self.report.corruptions += 1;
        if self.report.messages.len() < 1000 {
            self.report.messages.push(format!("ERROR {m}"));
        }
    }

    /// Counts a reference to `len` bytes at `off`; false if out of range.
    fn add(&mut self, off: u64, len: u64, what: &str) -> bool {
        if len == 0 {
            return true;
        }
        let first = off >> self.g.cluster_bits;
        let last = off.saturating_add(len - 1) >> self.g.cluster_bits;
        if last >= self.file_clusters {
            if self.grow && last < self.file_clusters + MAX_GROW_CLUSTERS {
                if last >= self.counts.len() as u64 {
                    self.counts.resize(last as usize + 1, 0);
                }
            } else {
                self.error(format!("{what} at {off:#x} is beyond the end of the image"));
                return false;
            }
        }
        for c in first..=last {
            self.counts[c as usize] += 1;
        }
        true
    }

    fn walk_l1(
        &mut self,
        l1_off: u64,
        l1_size: u32,
        active: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> std::io::Result<()> {
        let g = self.g;
        self.add(l1_off, u64::from(l1_size) * 8, "L1 table");
        let raw = read_at(self.f, l1_off, l1_size as usize * 8)?;
        for (i, e) in raw.chunks_exact(8).enumerate() {
            progress(i as u64, u64::from(l1_size));
            let e = u64::from_be_bytes(e.try_into().expect("8"));
            let (l2, _) = match decode_l1(e, &g) {
                Ok(v) => v,
                Err(err) => {
                    self.error(format!("L1 entry {i} ({e:#x}) is invalid: {err:?}"));
                    self.bad_l1.push(l1_off + i as u64 * 8);
                    continue;
                }
            };
            if l2 == 0 {
                continue;
            }
            if !self.add(l2, g.cluster_size(), "L2 table") {
                self.bad_l1.push(l1_off + i as u64 * 8);
                continue;
            }
            if active {
                self.active_l2.push((i, l2, e));
            }
            let table = read_at(self.f, l2, g.cluster_size() as usize)?;
            for j in 0..g.l2_entries() as usize {
                let (raw, bitmap) = l2_raw_at(&table, j, &g);
                let guest = ((i as u64) << g.l2_bits() | j as u64) << g.cluster_bits;
                let decoded = L2Entry::decode2(raw, bitmap, &g);
                match decoded.map(|e| (e, e.host_cluster())) {
                    // An external data file is not refcounted; its clusters sit at their
                    // guest offsets.
                    Ok((_, Some(host))) if g.external_data => {
                        if host == guest {
                            self.report.allocated_clusters += 1;
                        } else {
                            self.error(format!(
                                "L2 entry {j} of the table at {l2:#x} ({raw:#x}) maps guest \
                                 offset {guest:#x} elsewhere in the data file"
                            ));
                            self.bad_entries.push((l2, j));
                        }
                    }
                    Ok((_, Some(host))) => {
                        if self.add(host, g.cluster_size(), "data cluster") {
                            self.report.allocated_clusters += 1;
                            if active {
                                self.active_refs.push((l2, j, raw, host >> g.cluster_bits));
                            }
                        } else {
                            self.bad_entries.push((l2, j));
                        }
                    }
                    Ok((L2Entry::Compressed { host, max_len }, _)) => {
                        if self.add(host, max_len, "compressed cluster") {
                            self.report.allocated_clusters += 1;
                            self.report.compressed_clusters += 1;
                        } else {
                            self.bad_entries.push((l2, j));
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        let bits = if g.extended_l2 {
                            format!(", subcluster bitmap {bitmap:#x}")
                        } else {
                            String::new()
                        };
                        self.error(format!(
                            "L2 entry {j} of the table at {l2:#x} ({raw:#x}{bits}) is invalid: {err:?}"
                        ));
                        self.bad_entries.push((l2, j));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The stored refcount of every cluster (0 where no block covers it), reading blocks
/// from `table`; invalid table entries are reported.
pub(crate) fn stored_refcounts(
    f: &dyn MetaIo,
    g: &Geometry,
    table: &[u64],
    n: u64,
    report: &mut CheckReport,
) -> std::io::Result<Vec<u64>> {
    let per = g.refblock_entries();
    let mut out = vec![0u64; n as usize];
    for (ti, &e) in table.iter().enumerate() {
        let block = e & !REFT_RESERVED;
        if block == 0 {
            continue;
        }
        if e & REFT_RESERVED != 0
            || !block.is_multiple_of(g.cluster_size())
            || (block >> g.cluster_bits) >= n
        {
            report.corruptions += 1;
            report.messages.push(format!("ERROR refcount table entry {ti} ({e:#x}) is invalid"));
            continue;
        }
        let b = read_at(f, block, g.cluster_size() as usize)?;
        for j in 0..per {
            let c = ti as u64 * per + j;
            if c >= n {
                break;
            }
            out[c as usize] = get_refcount(&b, j as usize, g.refcount_order);
        }
    }
    Ok(out)
}

/// Checks (and with `repair`, fixes) an image. `progress(done, total)` is called as
/// the walk advances.
pub fn check(
    path: &Path,
    repair: Repair,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport, OpenError> {
    let f = OpenOptions::new()
        .read(true)
        .write(repair != Repair::None)
        .open(path)
        .map_err(|e| OpenError::io(path, e))?;
    if repair != Repair::None {
        // A repair writes: not while someone else (the appliance, QEMU) uses the image.
        crate::io::lock::lock_image(&f, path, true)?;
    }
    check_io(path, &f, repair, progress)
}

/// [`check`] over any [`MetaIo`]; `path` names the image in messages.
pub fn check_io(
    path: &Path,
    f: &dyn MetaIo,
    repair: Repair,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport, OpenError> {
    let (h, file_size) = read_header(path, f)?;
    let mut report = walk_and_compare(path, f, &h, file_size, repair, progress)?;
    if repair != Repair::None && (report.corruptions_fixed > 0 || report.leaks_fixed > 0) {
        // Report what is left after the repair.
        f.meta_sync().map_err(|e| OpenError::io(path, e))?;
        let (h, file_size) = read_header(path, f)?;
        let after = walk_and_compare(path, f, &h, file_size, Repair::None, &mut |_, _| {})?;
        report = CheckReport {
            corruptions_fixed: report.corruptions_fixed.saturating_sub(after.corruptions),
            leaks_fixed: report.leaks_fixed,
            ..after
        };
    }
    if repair == Repair::All {
        clear_corrupt_if_clean(path, f, &mut report)?;
    }
    Ok(report)
}

/// The LUKS header and key material of an encrypted image (the full disk encryption
/// header extension's area) are referenced like any metadata.
fn count_crypto_area(w: &mut Walk<'_>, h: &Header) {
    if h.crypt_method == 0 {
        return;
    }
    match h.extension(EXT_CRYPTO) {
        Some(e) if e.len() >= 16 => {
            let off = u64::from_be_bytes(e[..8].try_into().expect("8"));
            let len = u64::from_be_bytes(e[8..16].try_into().expect("8"));
            if !off.is_multiple_of(w.g.cluster_size()) || len > 64 << 20 {
                w.error(format!("the encryption header area ({len} bytes at {off:#x}) is invalid"));
            } else {
                w.add(off, len, "encryption header");
            }
        }
        _ => w.error("an encrypted image without its encryption header extension".into()),
    }
}

/// After a full repair that left nothing corrupt (and no check errors), the image's
/// corrupt bit is cleared, so it can be served read-write again; `qemu-img check -r
/// all` does the same. A leaks-only repair never clears it: the bit records that
/// something was found inconsistent, which only a full check and repair may settle.
fn clear_corrupt_if_clean(
    path: &Path,
    f: &dyn MetaIo,
    report: &mut CheckReport,
) -> Result<(), OpenError> {
    let (h, _) = read_header(path, f)?;
    if !h.is_corrupt() || report.corruptions > 0 || report.check_errors > 0 {
        return Ok(());
    }
    let v = h.incompatible & !INCOMPAT_CORRUPT;
    f.meta_write(&v.to_be_bytes(), OFF_INCOMPATIBLE).map_err(|e| OpenError::io(path, e))?;
    f.meta_sync().map_err(|e| OpenError::io(path, e))?;
    report.messages.push("Repair: the image is consistent; its corrupt flag was cleared".into());
    Ok(())
}

fn walk_and_compare(
    path: &Path,
    f: &dyn MetaIo,
    h: &Header,
    file_size: u64,
    repair: Repair,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport, OpenError> {
    let io = |e| OpenError::io(path, e);
    let g = h.geometry();
    let cs = g.cluster_size();
    let file_clusters = check_size(path, file_size, &g)?;
    let reftable = read_table(
        path,
        f,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs / 8,
    )?;
    let mut w = Walk {
        f,
        h,
        g,
        file_clusters,
        counts: vec![0u64; file_clusters as usize],
        report: CheckReport::default(),
        bad_entries: Vec::new(),
        active_refs: Vec::new(),
        active_l2: Vec::new(),
        bad_l1: Vec::new(),
        bad_bitmaps: false,
        grow: false,
    };
    w.add(0, cs, "header");
    count_crypto_area(&mut w, h);
    w.walk_l1(h.l1_table_offset, h.l1_size, true, progress).map_err(io)?;
    let (snap_bytes, snaps) = read_snapshots(path, f, h, file_size)?;
    for s in &snaps {
        w.walk_l1(s.l1_offset, s.l1_size, false, &mut |_, _| {}).map_err(io)?;
    }
    if snap_bytes > 0 {
        w.add(h.snapshots_offset, snap_bytes, "snapshot table");
    }
    count_bitmaps(&mut w).map_err(io)?;
    // The refcount structure itself.
    w.add(h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs, "refcount table");
    for (ti, &e) in reftable.iter().enumerate() {
        let b = e & !REFT_RESERVED;
        if b != 0 && b.is_multiple_of(cs) {
            w.add(b, cs, &format!("refcount block {ti}"));
        }
    }
    let mut report = std::mem::take(&mut w.report);
    let stored = stored_refcounts(f, &g, &reftable, file_clusters, &mut report).map_err(io)?;
    let mut leaked = Vec::new();
    for (c, (&s, &want)) in stored.iter().zip(w.counts.iter()).enumerate() {
        if s < want {
            report.corruptions += 1;
            if report.messages.len() < 1000 {
                report.messages.push(format!("ERROR cluster {c} refcount={s} reference={want}"));
            }
        } else if s > want {
            report.leaks += 1;
            leaked.push(c);
            if report.messages.len() < 1000 {
                report.messages.push(format!("Leaked cluster {c} refcount={s} reference={want}"));
            }
        }
    }
    // COPIED flags in the active tables.
    for &(i, l2, raw) in &w.active_l2 {
        let want = stored[(l2 >> g.cluster_bits) as usize] == 1;
        if (raw & OFLAG_COPIED != 0) != want {
            report.corruptions += 1;
            report.messages.push(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={raw:#x} refcount={}",
                stored[(l2 >> g.cluster_bits) as usize]
            ));
        }
    }
    for &(_, _, raw, c) in &w.active_refs {
        let rc = stored.get(c as usize).copied().unwrap_or(0);
        let want = rc == 1;
        if (raw & OFLAG_COPIED != 0) != want {
            report.corruptions += 1;
            if report.messages.len() < 1000 {
                report.messages.push(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={raw:#x} refcount={rc}"
                ));
            }
        }
    }
    report.total_clusters = g.size.div_ceil(cs);
    // As qemu-img reports it: past the highest cluster in use, by count or by refcount.
    let counted = w.counts.iter().rposition(|c| *c > 0);
    let refcounted = stored.iter().rposition(|c| *c > 0);
    let highest = counted.max(refcounted).map_or(0, |c| c as u64 + 1);
    report.image_end_offset = highest * cs;
    match repair {
        Repair::None => {}
        Repair::Leaks => {
            if !leaked.is_empty() {
                fix_leaks(f, &g, &reftable, &w.counts, &leaked).map_err(io)?;
                report.leaks_fixed = leaked.len() as u64;
            }
        }
        Repair::All => {
            let had = report.corruptions + report.leaks;
            if had > 0 {
                let entry_bytes = 1u64 << g.l2_entry_bits();
                for &(l2, j) in &w.bad_entries {
                    f.meta_write(&[0u8; 16][..entry_bytes as usize], l2 + j as u64 * entry_bytes)
                        .map_err(io)?;
                }
                for &at in &w.bad_l1 {
                    f.meta_write(&0u64.to_be_bytes(), at).map_err(io)?;
                }
                let mut h2 = h.clone();
                if w.bad_bitmaps {
                    h2.autoclear &= !AUTOCLEAR_BITMAPS;
                    f.meta_write(&h2.autoclear.to_be_bytes(), OFF_AUTOCLEAR).map_err(io)?;
                    report.messages.push(
                        "Repair: the persistent bitmaps are invalid and were dropped".to_string(),
                    );
                }
                let h = &h2;
                // Recount without the invalid entries, then rebuild refcounts.
                f.meta_sync().map_err(io)?;
                let fixed = recount_refs(path, f, h, file_size)?;
                rebuild_refcounts(f, h, &fixed).map_err(io)?;
                // COPIED flags follow the rebuilt refcounts (which are the counts).
                let copied = |c: u64| fixed.get(c as usize).copied() == Some(1);
                for &(i, l2, raw) in &w.active_l2 {
                    let want = if copied(l2 >> g.cluster_bits) {
                        raw | OFLAG_COPIED
                    } else {
                        raw & !OFLAG_COPIED
                    };
                    if want != raw {
                        f.meta_write(&want.to_be_bytes(), h.l1_table_offset + i as u64 * 8)
                            .map_err(io)?;
                    }
                }
                for &(table, j, raw, c) in &w.active_refs {
                    if w.bad_entries.contains(&(table, j)) {
                        continue;
                    }
                    let want = if copied(c) { raw | OFLAG_COPIED } else { raw & !OFLAG_COPIED };
                    if want != raw {
                        f.meta_write(&want.to_be_bytes(), table + j as u64 * entry_bytes)
                            .map_err(io)?;
                    }
                }
                f.meta_sync().map_err(io)?;
                report.corruptions_fixed = report.corruptions;
                report.leaks_fixed = report.leaks;
            }
        }
    }
    Ok(report)
}

/// Recomputes references (without the refcount structure) after in-place fixes.
pub(crate) fn recount_refs(
    path: &Path,
    f: &dyn MetaIo,
    h: &Header,
    file_size: u64,
) -> Result<Vec<u64>, OpenError> {
    let g = h.geometry();
    let file_clusters = check_size(path, file_size, &g)?;
    let mut w = Walk {
        f,
        h,
        g,
        file_clusters,
        counts: vec![0u64; file_clusters as usize],
        report: CheckReport::default(),
        bad_entries: Vec::new(),
        active_refs: Vec::new(),
        active_l2: Vec::new(),
        bad_l1: Vec::new(),
        bad_bitmaps: false,
        grow: true,
    };
    let io = |e| OpenError::io(path, e);
    w.add(0, g.cluster_size(), "header");
    count_crypto_area(&mut w, h);
    w.walk_l1(h.l1_table_offset, h.l1_size, true, &mut |_, _| {}).map_err(io)?;
    let (snap_bytes, snaps) = read_snapshots(path, f, h, file_size)?;
    for s in &snaps {
        w.walk_l1(s.l1_offset, s.l1_size, false, &mut |_, _| {}).map_err(io)?;
    }
    if snap_bytes > 0 {
        w.add(h.snapshots_offset, snap_bytes, "snapshot table");
    }
    count_bitmaps(&mut w).map_err(io)?;
    Ok(w.counts)
}

fn count_bitmaps(w: &mut Walk<'_>) -> std::io::Result<()> {
    // With the autoclear bit clear, the extension is stale and ignored (qcow2 spec).
    if w.h.autoclear & AUTOCLEAR_BITMAPS == 0 {
        return Ok(());
    }
    let Some(ext) = w.h.extension(EXT_BITMAPS) else { return Ok(()) };
    let errors_before = w.report.corruptions;
    let r = count_bitmap_structures(w, ext);
    if w.report.corruptions > errors_before {
        w.bad_bitmaps = true;
    }
    r
}

fn count_bitmap_structures(w: &mut Walk<'_>, ext: &[u8]) -> std::io::Result<()> {
    if ext.len() < 24 {
        w.error("bitmaps extension is too short".into());
        return Ok(());
    }
    let nb = u32::from_be_bytes(ext[0..4].try_into().expect("4"));
    let dir_size = u64::from_be_bytes(ext[8..16].try_into().expect("8"));
    let dir_off = u64::from_be_bytes(ext[16..24].try_into().expect("8"));
    if dir_size > 64 << 20 || !w.add(dir_off, dir_size, "bitmap directory") {
        return Ok(());
    }
    let dir = read_at(w.f, dir_off, dir_size as usize)?;
    let mut off = 0usize;
    for _ in 0..nb {
        if off + 24 > dir.len() {
            break;
        }
        let e = &dir[off..];
        let table_off = u64::from_be_bytes(e[0..8].try_into().expect("8"));
        let table_size = u32::from_be_bytes(e[8..12].try_into().expect("4"));
        let name_size = u16::from_be_bytes(e[18..20].try_into().expect("2")) as usize;
        let extra = u32::from_be_bytes(e[20..24].try_into().expect("4")) as usize;
        if u64::from(table_size) * 8 <= 64 << 20
            && w.add(table_off, u64::from(table_size) * 8, "bitmap table")
        {
            let t = read_at(w.f, table_off, table_size as usize * 8)?;
            for d in t.chunks_exact(8) {
                let d = u64::from_be_bytes(d.try_into().expect("8")) & OFFSET_MASK;
                if d != 0 {
                    w.add(d, w.g.cluster_size(), "bitmap data");
                }
            }
        }
        off += (24 + extra + name_size).div_ceil(8) * 8;
    }
    Ok(())
}

fn fix_leaks(
    f: &dyn MetaIo,
    g: &Geometry,
    table: &[u64],
    counts: &[u64],
    leaked: &[usize],
) -> std::io::Result<()> {
    let pairs: Vec<(u64, u64)> = leaked.iter().map(|&c| (c as u64, counts[c])).collect();
    set_refcounts(f, g, table, &pairs)
}

/// Writes refcount `v` for each `(cluster, v)` (sorted by cluster) into the blocks of
/// refcount table `table` (each block read, changed and written once), then syncs.
/// Every cluster must lie inside an existing block.
pub(crate) fn set_refcounts(
    f: &dyn MetaIo,
    g: &Geometry,
    table: &[u64],
    pairs: &[(u64, u64)],
) -> std::io::Result<()> {
    let per = g.refblock_entries();
    let mut current: Option<(u64, Vec<u8>)> = None;
    for &(c, v) in pairs {
        let block = table[(c / per) as usize] & !REFT_RESERVED;
        assert!(block != 0, "cluster {c} lies inside an existing refcount block");
        if current.as_ref().is_none_or(|(b, _)| *b != block) {
            if let Some((b, data)) = current.take() {
                f.meta_write(&data, b)?;
            }
            current = Some((block, read_at(f, block, g.cluster_size() as usize)?));
        }
        let (_, data) = current.as_mut().expect("block");
        set_refcount(data, (c % per) as usize, g.refcount_order, v);
    }
    if let Some((b, data)) = current {
        f.meta_write(&data, b)?;
    }
    f.meta_sync()
}

/// Writes a new refcount table and blocks after the end of the image from `counts`
/// (references excluding any refcount structure), syncs, switches the header to them in
/// one write, and syncs again. The old structure's clusters become free.
pub(crate) fn rebuild_refcounts(f: &dyn MetaIo, h: &Header, counts: &[u64]) -> std::io::Result<()> {
    let (table, clusters) = write_refcounts(f, h, counts)?;
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&table.to_be_bytes());
    hdr[8..].copy_from_slice(&clusters.to_be_bytes());
    f.meta_write(&hdr, OFF_REFCOUNT_TABLE)?;
    f.meta_sync()
}

/// Writes a refcount table and blocks for `counts` (references excluding any refcount
/// structure) at cluster `counts.len()` onwards, counting themselves, and syncs; the
/// header is left alone. Returns the table's offset and clusters.
pub(crate) fn write_refcounts(
    f: &dyn MetaIo,
    h: &Header,
    counts: &[u64],
) -> std::io::Result<(u64, u32)> {
    let g = h.geometry();
    let cs = g.cluster_size();
    let per = g.refblock_entries();
    let start = counts.len() as u64;
    // Fixpoint: blocks B and table clusters T covering everything up to the area's end.
    let (mut t, mut b) = (1u64, 1u64);
    loop {
        let total = start + t + b;
        let nb = total.div_ceil(per);
        let nt = (nb * 8).div_ceil(cs);
        if nb == b && nt == t {
            break;
        }
        b = nb;
        t = nt;
    }
    let total = start + t + b;
    let mut all = counts.to_vec();
    all.resize(total as usize, 0);
    for c in start..total {
        all[c as usize] = 1;
    }
    if let Some(&max) = all.iter().max()
        && max > g.refcount_max()
    {
        return Err(std::io::Error::other(format!(
            "a refcount of {max} does not fit {} bits",
            g.refcount_bits()
        )));
    }
    let mut table = vec![0u8; (t * cs) as usize];
    for bi in 0..b {
        let block_cluster = start + t + bi;
        let mut data = vec![0u8; cs as usize];
        for j in 0..per {
            let c = bi * per + j;
            if c >= total {
                break;
            }
            set_refcount(&mut data, j as usize, g.refcount_order, all[c as usize]);
        }
        f.meta_write(&data, block_cluster * cs)?;
        table[(bi * 8) as usize..(bi * 8 + 8) as usize]
            .copy_from_slice(&(block_cluster * cs).to_be_bytes());
    }
    f.meta_write(&table, start * cs)?;
    f.meta_sync()?;
    Ok((start * cs, t as u32))
}

/// Repairs a read-write open of an image whose dirty bit is set (lazy refcounts after
/// a crash): refcounts are rebuilt from the tables, then the bit is cleared.
pub fn repair_if_dirty(path: &Path) -> Result<(), OpenError> {
    let f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) => return Err(OpenError::io(path, e)),
    };
    repair_if_dirty_io(path, &f)
}

/// [`repair_if_dirty`] over any [`MetaIo`].
pub fn repair_if_dirty_io(path: &Path, f: &dyn MetaIo) -> Result<(), OpenError> {
    let (h, file_size) = match read_header(path, f) {
        Ok(v) => v,
        // The real open reports header problems.
        Err(_) => return Ok(()),
    };
    if !h.is_dirty() || h.is_corrupt() {
        return Ok(());
    }
    tracing::warn!(image = %path.display(), "image has the dirty bit set (lazy refcounts, unclean shutdown): rebuilding refcounts");
    let counts = recount_refs(path, f, &h, file_size)?;
    rebuild_refcounts(f, &h, &counts).map_err(|e| OpenError::io(path, e))?;
    let v = h.incompatible & !INCOMPAT_DIRTY;
    f.meta_write(&v.to_be_bytes(), OFF_INCOMPATIBLE).map_err(|e| OpenError::io(path, e))?;
    f.meta_sync().map_err(|e| OpenError::io(path, e))?;
    Ok(())
}

/// Clears the persistent-bitmaps autoclear bit, as the qcow2 spec asks of software
/// that writes an image without maintaining its bitmaps (an offline resize, or an
/// open that found them invalid): they stop being valid, where an incremental backup
/// would otherwise miss the writes. Returns whether the bit was set.
pub(crate) fn invalidate_bitmaps(
    path: &Path,
    f: &dyn MetaIo,
    h: &Header,
) -> Result<bool, OpenError> {
    if h.autoclear & AUTOCLEAR_BITMAPS == 0 {
        return Ok(false);
    }
    tracing::warn!(image = %path.display(), "invalidating the persistent dirty bitmaps (autoclear bit cleared)");
    let v = h.autoclear & !AUTOCLEAR_BITMAPS;
    f.meta_write(&v.to_be_bytes(), OFF_AUTOCLEAR).map_err(|e| OpenError::io(path, e))?;
    f.meta_sync().map_err(|e| OpenError::io(path, e))?;
    Ok(true)
}

/// Opens a plain handle (used by tools).
pub fn open_plain(path: &Path) -> Result<File, OpenError> {
    File::open(path).map_err(|e| OpenError::io(path, e))
}
