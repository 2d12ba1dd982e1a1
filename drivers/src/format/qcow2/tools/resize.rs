//! `resize`: grows an image that is not in use (offline, like `qemu-img resize`).
//!
//! Growing within what the L1 table already covers only rewrites the size field. Beyond
//! that the L1 table grows, and that needs a new, larger L1 table somewhere free and
//! refcounts that account for it. The steps keep the image consistent at every point a
//! crash can interrupt (at worst leaked clusters, which `check -r leaks` frees):
//!
//! 1. The new L1 table (the old entries, then zeros) is written after the end of the
//!    file and synced. Nothing refers to it and no refcount covers it: a crash leaves
//!    only bytes past the image's end.
//! 2. The refcount structure is rebuilt after it from the counted references plus one
//!    for each cluster of the new table, written and synced, and the header switches to
//!    it in one write (the rebuild of `check -r all`). A crash leaves the new table
//!    leaked and the old refcount structure leaked.
//! 3. Size, L1 size and L1 offset change in one 24-byte header write (bytes 24..48, one
//!    sector), then sync. From here the old table is leaked.
//! 4. A leak repair frees the old L1 table and the old refcount structure.
//!
//! The image is locked as QEMU locks it, so an image in use (served, or open in QEMU)
//! is refused. Shrinking is done only when nothing past the new end is allocated (then only
//! the size field changes). An external data file grows with the image (first,
//! sparsely); such images do not shrink. Encrypted images resize like others (only
//! metadata changes). Refused: sizes that are not a multiple of 512 bytes, images
//! with a backing file (the new area would show the backing file's data, where a
//! guest expects zeros), corrupt images and images with refcount errors (`check -r all`
//! first). A dirty lazy-refcounts image is repaired first. Persistent bitmaps are
//! invalidated, as by every read-write open of this engine.

use std::fs::OpenOptions;
use std::path::Path;

use crate::error::OpenError;

use super::check::{
    Repair, check_io, invalidate_bitmaps, rebuild_refcounts, recount_refs, repair_if_dirty_io,
};
use crate::format::qcow2::open::{
    MetaIo, read_exact_or_zero, read_header_any_crypt as read_header, read_table,
};
use crate::format::qcow2::types::*;

/// What [`resize`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resized {
    pub old_size: u64,
    pub new_size: u64,
    /// L1 entries before and after (equal when the table did not have to grow).
    pub old_l1_entries: u32,
    pub new_l1_entries: u32,
}

/// Grows the qcow2 image at `path` to `new_size` bytes. The image must not be in use.
pub fn resize(path: &Path, new_size: u64) -> Result<Resized, OpenError> {
    let f =
        OpenOptions::new().read(true).write(true).open(path).map_err(|e| OpenError::io(path, e))?;
    crate::io::lock::lock_image(&f, path, true)?;
    resize_io(path, &f, new_size)
}

/// [`resize`] over any [`MetaIo`]; `path` names the image in messages.
pub fn resize_io(path: &Path, f: &dyn MetaIo, new_size: u64) -> Result<Resized, OpenError> {
    let invalid = |m: String| OpenError::invalid(path, m);
    let io = |e| OpenError::io(path, e);
    if !new_size.is_multiple_of(512) {
        return Err(invalid(format!("the new size {new_size} is not a multiple of 512 bytes")));
    }
    repair_if_dirty_io(path, f)?;
    let (h, _) = read_header(path, f)?;
    if h.is_corrupt() {
        return Err(invalid(
            "the image is marked corrupt; repair it (check -r all) before resizing".into(),
        ));
    }
    if let Some(d) = h.data_file().filter(|_| new_size < h.size) {
        return Err(invalid(format!(
            "images with an external data file ({d}) are not shrunk (the data file keeps its \
             size)"
        )));
    }
    if h.backing_file.is_some() {
        return Err(invalid(
            "images with a backing file are not resized: the new area would show the backing \
             file's data instead of zeros"
                .into(),
        ));
    }
    let mut g = h.geometry();
    g.size = new_size;
    let needed = g.l1_entries_needed();
    if needed * 8 > MAX_L1_BYTES {
        return Err(invalid(format!(
            "a size of {new_size} bytes needs an L1 table larger than {MAX_L1_BYTES} bytes \
             with {}-byte clusters",
            g.cluster_size()
        )));
    }
    let mut done = Resized {
        old_size: h.size,
        new_size,
        old_l1_entries: h.l1_size,
        new_l1_entries: h.l1_size,
    };
    if new_size == h.size {
        return Ok(done);
    }
    let report = check_io(path, f, Repair::None, &mut |_, _| {})?;
    if report.corruptions > 0 || report.check_errors > 0 {
        return Err(invalid(format!(
            "the image has {} corruption(s); repair it (check -r all) before resizing",
            report.corruptions + report.check_errors
        )));
    }
    if new_size < h.size {
        return shrink(path, f, &h, new_size);
    }
    if let Some(name) = h.data_file() {
        // The data file first (growing it is harmless on its own): a raw one must be
        // as large as the image.
        grow_data_file(&super::create::data_file_path(path, &name), new_size)?;
    }
    invalidate_bitmaps(path, f, &h)?;

    if needed > u64::from(h.l1_size) {
        let cs = g.cluster_size();
        // 1. The new table after the end of the file.
        let (_, file_size) = read_header(path, f)?;
        let mut counts = recount_refs(path, f, &h, file_size)?;
        let start = (counts.len() as u64).max(file_size.div_ceil(cs));
        counts.resize(start as usize, 0);
        let clusters = (needed * 8).div_ceil(cs);
        let old = read_table(path, f, h.l1_table_offset, u64::from(h.l1_size))?;
        let mut table = vec![0u8; (clusters * cs) as usize];
        for (i, e) in old.iter().enumerate() {
            table[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        f.meta_write(&table, start * cs).map_err(io)?;
        f.meta_sync().map_err(io)?;
        // 2. Refcounts that include it.
        counts.resize((start + clusters) as usize, 1);
        rebuild_refcounts(f, &h, &counts).map_err(io)?;
        // 3. The header switch.
        let mut hdr = [0u8; 24];
        hdr[..8].copy_from_slice(&new_size.to_be_bytes());
        hdr[8..12].copy_from_slice(&h.crypt_method.to_be_bytes());
        hdr[12..16].copy_from_slice(&(needed as u32).to_be_bytes());
        hdr[16..].copy_from_slice(&(start * cs).to_be_bytes());
        f.meta_write(&hdr, OFF_SIZE).map_err(io)?;
        f.meta_sync().map_err(io)?;
        // 4. Free the old table and refcount structure.
        check_io(path, f, Repair::Leaks, &mut |_, _| {})?;
        done.new_l1_entries = needed as u32;
    } else {
        f.meta_write(&new_size.to_be_bytes(), OFF_SIZE).map_err(io)?;
        f.meta_sync().map_err(io)?;
    }
    // The result must open as a valid image.
    read_header(path, f)?;
    Ok(done)
}

/// Grows the external data file at `data` to at least `len` bytes (sparsely), synced.
fn grow_data_file(data: &Path, len: u64) -> Result<(), OpenError> {
    let io = |e| OpenError::io(data, e);
    let d = OpenOptions::new().read(true).write(true).open(data).map_err(io)?;
    if d.metadata().map_err(io)?.len() < len {
        d.set_len(len).map_err(io)?;
    }
    d.sync_all().map_err(io)
}

/// Shrinks the image to `new_size` if nothing is lost: every guest cluster past the new
/// end unallocated or reading as zeros, and the bytes past it in the cluster the new end
/// falls in zeros too (they would show again if the image grew). Only the size field
/// changes (one sector, then sync): the L1 table may cover more than the size, and L2
/// tables past it stay referenced, holding nothing. Images with internal snapshots
/// are refused, as by QEMU.
fn shrink(
    path: &Path,
    f: &dyn MetaIo,
    h: &crate::format::qcow2::header::Header,
    new_size: u64,
) -> Result<Resized, OpenError> {
    let invalid = |m: String| OpenError::invalid(path, m);
    let io = |e| OpenError::io(path, e);
    if h.nb_snapshots > 0 {
        return Err(invalid(format!(
            "shrinking an image with internal snapshots ({}) is not supported",
            h.nb_snapshots
        )));
    }
    let g = h.geometry();
    let (cs, per_l2) = (g.cluster_size(), g.l2_entries());
    let l1 = read_table(path, f, h.l1_table_offset, u64::from(h.l1_size))?;
    let in_use = |c: u64, raw: u64| {
        invalid(format!(
            "shrinking from {} to {new_size} bytes would lose data: guest offset {:#x} is \
             allocated (L2 entry {raw:#x})",
            h.size,
            c * cs
        ))
    };
    let mut l2 = vec![0u8; cs as usize];
    for c in new_size / cs..h.size.div_ceil(cs) {
        let l1e = l1.get((c / per_l2) as usize).copied().unwrap_or(0) & OFFSET_MASK;
        if l1e == 0 {
            continue;
        }
        if c == new_size / cs || c % per_l2 == 0 {
            read_exact_or_zero(f, &mut l2, l1e).map_err(io)?;
        }
        let (raw, bitmap) = l2_raw_at(&l2, (c % per_l2) as usize, &g);
        match L2Entry::decode2(raw, bitmap, &g).map_err(|_| in_use(c, raw))? {
            L2Entry::Unallocated | L2Entry::Zero { .. } | L2Entry::Sub { alloc: 0, .. } => {}
            L2Entry::Normal { host, .. } if c * cs < new_size => {
                // The cluster the new end falls in: its bytes past the end must be zeros.
                let from = g.offset_in_cluster(new_size);
                let to = if h.size < (c + 1) * cs { g.offset_in_cluster(h.size) } else { cs };
                let mut tail = vec![0u8; (to - from) as usize];
                read_exact_or_zero(f, &mut tail, host + from).map_err(io)?;
                if tail.iter().any(|b| *b != 0) {
                    return Err(in_use(c, raw));
                }
            }
            _ => return Err(in_use(c, raw)),
        }
    }
    invalidate_bitmaps(path, f, h)?;
    f.meta_write(&new_size.to_be_bytes(), OFF_SIZE).map_err(io)?;
    f.meta_sync().map_err(io)?;
    read_header(path, f)?;
    Ok(Resized { old_size: h.size, new_size, old_l1_entries: h.l1_size, new_l1_entries: h.l1_size })
}

#[cfg(test)]
mod tests {
    //! Crash consistency of a growing resize: the writes and syncs of one resize are
    //! recorded, then every prefix is replayed as a power cut, both with everything up to
    //! the cut on disk and with only what the last sync before it made durable. Every
    //! such image must check without corruption, at the old or the new size.

    use super::*;
    use crate::format::qcow2::create::{CreateOptions, create};
    use crate::format::qcow2::tools::powercut::{Mem, cut};

    fn image(version: u32, cluster_size: u64, refcount_bits: u32) -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img.qcow2");
        let o = CreateOptions {
            size: 256 << 10,
            cluster_size,
            refcount_bits,
            version,
            preallocate_metadata: true,
            ..CreateOptions::default()
        };
        create(&p, &o).unwrap();
        let data = std::fs::read(&p).unwrap();
        (dir, data)
    }

    fn verify(path: &Path, data: Vec<u8>, sizes: [u64; 2], what: &str) {
        let m = Mem::with(data);
        let (h, _) = read_header(path, &m).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(sizes.contains(&h.size), "{what}: size {}", h.size);
        let r = check_io(path, &m, Repair::None, &mut |_, _| {}).unwrap();
        assert_eq!((r.corruptions, r.check_errors), (0, 0), "{what}: {:?}", r.messages);
    }

    #[test]
    fn every_power_cut_during_l1_growth_leaves_a_consistent_image() {
        for (version, cs, bits) in [(3, 512, 16), (2, 512, 16), (3, 4096, 1), (3, 1024, 64)] {
            let (dir, initial) = image(version, cs, bits);
            let path = dir.path().join("img.qcow2");
            let new_size = 64 << 20;
            let m = Mem::with(initial.clone());
            let (old, _) = read_header(&path, &m).unwrap();
            let r = resize_io(&path, &m, new_size).unwrap();
            assert!(r.new_l1_entries > r.old_l1_entries);
            let (new, _) = read_header(&path, &m).unwrap();
            assert_ne!(old.l1_table_offset, new.l1_table_offset, "the L1 table moved");
            assert_eq!(u64::from(new.l1_size), new.geometry().l1_entries_needed());
            let done = check_io(&path, &m, Repair::None, &mut |_, _| {}).unwrap();
            assert_eq!((done.corruptions, done.leaks), (0, 0), "{:?}", done.messages);
            let log = m.log.into_inner();
            let sizes = [256 << 10, new_size];
            for k in 0..=log.len() {
                let (all, synced) = cut(&initial, &log, k);
                let what = format!("v{version} cluster {cs} refcount {bits}, cut at op {k}");
                verify(&path, all, sizes, &format!("{what} (all written)"));
                verify(&path, synced, sizes, &format!("{what} (synced only)"));
            }
        }
    }

    #[test]
    fn growth_within_the_l1_table_only_changes_the_size() {
        let (dir, initial) = image(3, 65536, 16);
        let path = dir.path().join("img.qcow2");
        let m = Mem::with(initial);
        // One L1 entry maps 512 MiB of 64 KiB clusters.
        let r = resize_io(&path, &m, 256 << 20).unwrap();
        assert_eq!((r.old_l1_entries, r.new_l1_entries), (1, 1));
        let (h, _) = read_header(&path, &m).unwrap();
        assert_eq!(h.size, 256 << 20);
        assert!(m.log.borrow().len() <= 3, "only the size field is rewritten");
        // Nothing is allocated: shrinking only rewrites the size too.
        let r = resize_io(&path, &m, 1 << 20).unwrap();
        assert_eq!((r.old_size, r.new_size), (256 << 20, 1 << 20));
        assert_eq!(read_header(&path, &m).unwrap().0.size, 1 << 20);
        let done = check_io(&path, &m, Repair::None, &mut |_, _| {}).unwrap();
        assert_eq!((done.corruptions, done.leaks), (0, 0), "{:?}", done.messages);
        assert!(resize_io(&path, &m, (256 << 20) + 1).is_err(), "unaligned sizes are refused");
    }
}
