//! Persistent dirty bitmaps: the qcow2 bitmaps extension (docs/interop/qcow2.txt,
//! "Bitmaps extension"), read at open and written back at close, as QEMU does.
//!
//! On disk a bitmap is a directory entry (name, granularity, flags), a bitmap table of
//! one entry per data cluster (0: every bit clear, 1: every bit set, else the data
//! cluster's offset) and the data clusters, whose bit `k` of byte `j` is granule
//! `8 j + k` of the cluster's span. The extension counts only while the header's
//! `bitmaps` autoclear bit is set: software that writes the image without maintaining
//! the bitmaps clears the bit, and the bitmaps stop counting.
//!
//! The life of a bitmap in this engine:
//! - **Open read-write.** The directory is validated; each bitmap not flagged `in_use`
//!   is loaded into memory, and then every entry is flagged `in_use` in place (only the
//!   flag words change, each inside one sector, so a torn write leaves a valid
//!   directory) and synced before the first guest write. A bitmap already `in_use` at
//!   open was not stored by a clean close (a crash): it is kept but reported
//!   inconsistent, and its bits are not trusted.
//! - **Serving.** The bitmaps are ordinary named bitmaps of the disk (see
//!   `crate::api::bitmaps`), set by every shard's writes, zero writes and discards.
//! - **Close.** After the shards are closed and everything is flushed, [`store`]
//!   writes each persistent bitmap into clusters that are free (refcount 0 inside the
//!   existing refcount blocks), in the order of the other metadata updates: refcounts
//!   raised and synced, then data, tables and directory written and synced, then the
//!   header's extension switched in one write and synced, then the old structures'
//!   refcounts dropped. A power cut anywhere leaves the old bitmaps (flagged `in_use`,
//!   so inconsistent) or the new ones, and at worst leaked clusters. When the free
//!   clusters do not suffice, the new structures go after the end of the file and the
//!   refcount structure is rebuilt there (as `check -r all` does), then the leaks are
//!   repaired.

use std::path::Path;
use std::sync::Arc;

use crate::api::bitmap::DirtyBitmap;
use crate::api::bitmaps::{MAX_BITMAP_BYTES, MAX_BITMAPS};
use crate::driver::StoredBitmap;
use crate::error::OpenError;

use super::header::{Extension, Header};
use super::open::{MetaIo, read_at, read_header_any_crypt as read_header, read_table};
use super::tools::check::{
    Repair, check_io, invalidate_bitmaps, rebuild_refcounts, recount_refs, set_refcounts,
    stored_refcounts,
};
use super::types::*;

/// Directory entry flags.
pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
/// QEMU's limits: bitmaps per image, directory bytes, name bytes, granularity bits.
pub const MAX_STORED_BITMAPS: u32 = 65535;
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
const MAX_NAME_BYTES: usize = 1023;
const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// A bitmap table's largest size (QEMU's: 64 MiB of entries).
const MAX_TABLE_ENTRIES: u64 = 0x0080_0000;
/// Bits of a table entry that must be zero (all but the offset and bit 0).
const TABLE_RESERVED: u64 = !OFFSET_MASK & !1;

/// One entry of the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub granularity_bits: u8,
    pub flags: u32,
    pub kind: u8,
    pub table_offset: u64,
    pub table_size: u32,
    pub extra_data_size: u32,
    /// Where the entry's flags lie inside the directory.
    flags_at: usize,
}

impl DirEntry {
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Why the bitmap's bits cannot be used, if they cannot.
    pub fn unusable(&self) -> Option<&'static str> {
        if self.in_use() {
            Some("it was in use when the image was last closed (not stored cleanly)")
        } else if self.kind != TYPE_DIRTY_TRACKING {
            Some("its type is unknown")
        } else if self.extra_data_size > 0 && self.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            Some("it carries extra data this version does not understand")
        } else {
            None
        }
    }
}

/// The bitmap directory as read from an image.
#[derive(Debug, Clone)]
pub struct Directory {
    pub offset: u64,
    pub size: u64,
    pub entries: Vec<DirEntry>,
    raw: Vec<u8>,
}

/// A bitmap to store at close.
pub struct ToStore<'a> {
    pub name: &'a str,
    pub map: &'a DirtyBitmap,
    /// Recording (QEMU's `auto` flag: it tracks writes from the next open on).
    pub auto: bool,
    /// Stored flagged `in_use` with no data: its bits were not trustworthy.
    pub inconsistent: bool,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Table entries a bitmap of `granularity` over `size` bytes has with `cs`-byte clusters.
fn table_entries(size: u64, granularity: u64, cs: u64) -> u64 {
    size.div_ceil(granularity).div_ceil(cs * 8)
}

/// Reads and validates the bitmap directory; `None` when the image has no valid
/// bitmaps extension (absent, or the autoclear bit clear). Each error names the field.
pub fn read_directory(
    f: &dyn MetaIo,
    h: &Header,
    file_size: u64,
) -> Result<Option<Directory>, String> {
    if h.autoclear & AUTOCLEAR_BITMAPS == 0 {
        return Ok(None);
    }
    let Some(ext) = h.extension(EXT_BITMAPS) else { return Ok(None) };
    if ext.len() != 24 {
        return Err(format!("the bitmaps extension is {} bytes, not 24", ext.len()));
    }
    let (nb, reserved, size, offset) = (be32(ext, 0), be32(ext, 4), be64(ext, 8), be64(ext, 16));
    let cs = h.cluster_size();
    if nb == 0 || nb > MAX_STORED_BITMAPS || reserved != 0 {
        return Err(format!("the bitmaps extension names {nb} bitmaps (reserved {reserved})"));
    }
    if size == 0 || size > MAX_DIRECTORY_BYTES || size < u64::from(nb) * 24 {
        return Err(format!("the bitmap directory size {size} is invalid for {nb} bitmaps"));
    }
    if offset == 0 || !offset.is_multiple_of(cs) || offset.saturating_add(size) > file_size {
        return Err(format!("the bitmap directory offset {offset:#x} is invalid"));
    }
    let raw = read_at(f, offset, size as usize).map_err(|e| format!("bitmap directory: {e}"))?;
    let mut entries = Vec::with_capacity(nb as usize);
    let mut at = 0usize;
    for i in 0..nb {
        let e = parse_entry(&raw, at, h, file_size).map_err(|m| format!("bitmap {i}: {m}"))?;
        at += (24 + e.extra_data_size as usize + e.name.len()).div_ceil(8) * 8;
        if entries.iter().any(|o: &DirEntry| o.name == e.name) {
            return Err(format!("bitmap name {:?} appears twice", e.name));
        }
        entries.push(e);
    }
    if at as u64 != size {
        return Err(format!("the bitmap directory is {size} bytes but its entries take {at}"));
    }
    Ok(Some(Directory { offset, size, entries, raw }))
}

fn parse_entry(raw: &[u8], at: usize, h: &Header, file_size: u64) -> Result<DirEntry, String> {
    if at + 24 > raw.len() {
        return Err("the entry runs past the directory".into());
    }
    let e = &raw[at..];
    let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
    let extra = be32(e, 20);
    let name_at = 24 + extra as usize;
    if extra > 1 << 20 || at + name_at + name_size > raw.len() {
        return Err("the entry runs past the directory".into());
    }
    if name_size == 0 || name_size > MAX_NAME_BYTES {
        return Err(format!("name length {name_size} is outside 1..={MAX_NAME_BYTES}"));
    }
    let name = std::str::from_utf8(&e[name_at..name_at + name_size])
        .map_err(|_| "the name is not UTF-8".to_string())?
        .to_string();
    let d = DirEntry {
        name,
        table_offset: be64(e, 0),
        table_size: be32(e, 8),
        flags: be32(e, 12),
        kind: e[16],
        granularity_bits: e[17],
        extra_data_size: extra,
        flags_at: at + 12,
    };
    if !GRANULARITY_BITS.contains(&d.granularity_bits) {
        return Err(format!("granularity bits {} outside 9..=31", d.granularity_bits));
    }
    let cs = h.cluster_size();
    let want = table_entries(h.size, d.granularity(), cs);
    if u64::from(d.table_size) != want || want > MAX_TABLE_ENTRIES {
        return Err(format!("the table has {} entries, not {want}", d.table_size));
    }
    let end = d.table_offset.saturating_add(u64::from(d.table_size) * 8);
    if d.table_offset == 0 || !d.table_offset.is_multiple_of(cs) || end > file_size {
        return Err(format!("the table offset {:#x} is invalid", d.table_offset));
    }
    if d.flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) != 0 {
        return Err(format!("unknown flags {:#x}", d.flags));
    }
    Ok(d)
}

/// The data clusters of entry `e`'s table (after validating every table entry).
fn table_of(f: &dyn MetaIo, path: &Path, h: &Header, e: &DirEntry) -> Result<Vec<u64>, String> {
    let t = read_table(path, f, e.table_offset, u64::from(e.table_size))
        .map_err(|x| format!("bitmap {:?}: {x}", e.name))?;
    let (cs, size) = (h.cluster_size(), f.meta_len().unwrap_or(0));
    for (i, &v) in t.iter().enumerate() {
        let off = v & OFFSET_MASK;
        let bad = v & TABLE_RESERVED != 0
            || (off != 0 && v & 1 != 0)
            || (off != 0 && (!off.is_multiple_of(cs) || off + cs > size));
        if bad {
            return Err(format!("bitmap {:?}: table entry {i} ({v:#x}) is invalid", e.name));
        }
    }
    Ok(t)
}

/// Loads entry `e` (which must be usable) as a bitmap over the image's size.
pub fn load(f: &dyn MetaIo, path: &Path, h: &Header, e: &DirEntry) -> Result<DirtyBitmap, String> {
    let table = table_of(f, path, h, e)?;
    let map = DirtyBitmap::new(h.size, e.granularity());
    let cs = h.cluster_size();
    let words_per = (cs / 8) as usize;
    for (i, &v) in table.iter().enumerate() {
        let first = i * words_per;
        let words = words_per.min(map.words().saturating_sub(first));
        let off = v & OFFSET_MASK;
        if off == 0 && v & 1 == 0 {
            continue;
        }
        let data = if off == 0 {
            vec![0xffu8; words * 8]
        } else {
            read_at(f, off, words * 8).map_err(|x| format!("bitmap {:?}: {x}", e.name))?
        };
        for (k, w) in data.chunks_exact(8).enumerate() {
            map.or_word(first + k, u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
    }
    Ok(map)
}

/// Flags every entry `in_use` in place and syncs: from here until [`store`], a crash
/// leaves the bitmaps inconsistent rather than silently stale.
pub fn mark_in_use(f: &dyn MetaIo, dir: &Directory) -> std::io::Result<()> {
    let mut raw = dir.raw.clone();
    for e in &dir.entries {
        raw[e.flags_at..e.flags_at + 4].copy_from_slice(&(e.flags | FLAG_IN_USE).to_be_bytes());
    }
    f.meta_write(&raw, dir.offset)?;
    f.meta_sync()
}

/// One bitmap serialised: its data clusters (index in the table, bytes) and its
/// directory entry fields.
struct Serialised<'a> {
    b: &'a ToStore<'a>,
    table_size: u64,
    data: Vec<(usize, Vec<u8>)>,
}

fn serialise<'a>(b: &'a ToStore<'a>, h: &Header) -> Serialised<'a> {
    let cs = h.cluster_size();
    let table_size = table_entries(h.size, b.map.granularity(), cs);
    let words_per = (cs / 8) as usize;
    let mut data = Vec::new();
    for i in 0..table_size as usize {
        if b.inconsistent {
            break;
        }
        let first = i * words_per;
        let n = words_per.min(b.map.words().saturating_sub(first));
        if (first..first + n).all(|w| b.map.word(w) == 0) {
            continue;
        }
        let mut buf = vec![0u8; cs as usize];
        for k in 0..n {
            buf[k * 8..k * 8 + 8].copy_from_slice(&b.map.word(first + k).to_le_bytes());
        }
        data.push((i, buf));
    }
    Serialised { b, table_size, data }
}

fn entry_bytes(s: &Serialised<'_>, table_offset: u64) -> Vec<u8> {
    let name = s.b.name.as_bytes();
    let mut e = vec![0u8; (24 + name.len()).div_ceil(8) * 8];
    e[0..8].copy_from_slice(&table_offset.to_be_bytes());
    e[8..12].copy_from_slice(&(s.table_size as u32).to_be_bytes());
    let mut flags = if s.b.auto { FLAG_AUTO } else { 0 };
    if s.b.inconsistent {
        flags |= FLAG_IN_USE;
    }
    e[12..16].copy_from_slice(&flags.to_be_bytes());
    e[16] = TYPE_DIRTY_TRACKING;
    e[17] = s.b.map.granularity().trailing_zeros() as u8;
    e[18..20].copy_from_slice(&(name.len() as u16).to_be_bytes());
    e[24..24 + name.len()].copy_from_slice(name);
    e
}

/// The clusters the old directory, tables and data occupy.
fn old_clusters(f: &dyn MetaIo, path: &Path, h: &Header, file_size: u64) -> Vec<u64> {
    let Ok(Some(dir)) = read_directory(f, h, file_size) else { return Vec::new() };
    let cs = h.cluster_size();
    let span = |off: u64, len: u64| (off / cs)..(off + len).div_ceil(cs);
    let mut v: Vec<u64> = span(dir.offset, dir.size).collect();
    for e in &dir.entries {
        let Ok(t) = table_of(f, path, h, e) else { continue };
        v.extend(span(e.table_offset, u64::from(e.table_size) * 8));
        v.extend(t.iter().map(|x| x & OFFSET_MASK).filter(|&o| o != 0).map(|o| o / cs));
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Writes `bitmaps` into the closed image (replacing whatever bitmaps it stored) with
/// the ordering the module documents. `path` names the image in errors.
pub fn store(f: &dyn MetaIo, path: &Path, bitmaps: &[ToStore<'_>]) -> Result<(), OpenError> {
    let io = |e: std::io::Error| OpenError::io(path, e);
    let (h, file_size) = read_header(path, f)?;
    let had = h.autoclear & AUTOCLEAR_BITMAPS != 0 && h.extension(EXT_BITMAPS).is_some();
    if bitmaps.is_empty() && !had {
        return Ok(());
    }
    if h.version < 3 {
        return Err(OpenError::invalid(path, "compat=0.10 images cannot store bitmaps"));
    }
    // The extension must fit the header cluster before anything is written.
    new_header(f, path, (!bitmaps.is_empty()).then(|| vec![0u8; 24]))?;
    let old = old_clusters(f, path, &h, file_size);
    let ser: Vec<Serialised<'_>> = bitmaps.iter().map(|b| serialise(b, &h)).collect();
    let cs = h.cluster_size();
    let dir_len: u64 = ser.iter().map(|s| (24 + s.b.name.len()).div_ceil(8) as u64 * 8).sum();
    let need: u64 =
        ser.iter().map(|s| s.data.len() as u64 + (s.table_size * 8).div_ceil(cs)).sum::<u64>()
            + dir_len.div_ceil(cs);
    let g = h.geometry();
    let rt = read_table(
        path,
        f,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs / 8,
    )?;
    // 1. Refcounts first (a crash from here leaks them at worst); without room for
    //    them, everything goes after the end and the refcounts are rebuilt after it.
    let mut rebuild = None;
    let (free, stored) = free_clusters(f, &g, &rt, need).map_err(io)?;
    let clusters: Vec<u64> = match free {
        Some(v) => {
            let pairs: Vec<(u64, u64)> = v.iter().map(|&c| (c, 1)).collect();
            set_refcounts(f, &g, &rt, &pairs).map_err(io)?;
            v
        }
        None => {
            let mut counts = recount_refs(path, f, &h, file_size)?;
            let start = (counts.len() as u64).max(file_size.div_ceil(cs));
            counts.resize(start as usize, 0);
            counts.resize((start + need) as usize, 1);
            rebuild = Some(counts);
            (start..start + need).collect()
        }
    };
    // 2. Data, tables and directory, into the clusters taken.
    let mut next = clusters.iter().copied();
    let mut dir = Vec::with_capacity(dir_len as usize);
    for s in &ser {
        let mut table = vec![0u8; ((s.table_size * 8).div_ceil(cs) * cs) as usize];
        for (i, buf) in &s.data {
            let c = next.next().expect("counted");
            f.meta_write(buf, c * cs).map_err(io)?;
            table[i * 8..i * 8 + 8].copy_from_slice(&(c * cs).to_be_bytes());
        }
        let table_at = write_run(f, &mut next, &table, cs).map_err(io)?;
        dir.extend(entry_bytes(s, table_at));
    }
    let dir_at = if dir.is_empty() { 0 } else { write_run(f, &mut next, &dir, cs).map_err(io)? };
    f.meta_sync().map_err(io)?;
    if let Some(counts) = &rebuild {
        rebuild_refcounts(f, &h, counts).map_err(io)?;
    }
    // 3. The header switch, in one write of the header area.
    let mut ext = Vec::with_capacity(24);
    ext.extend((bitmaps.len() as u32).to_be_bytes());
    ext.extend(0u32.to_be_bytes());
    ext.extend(dir_len.to_be_bytes());
    ext.extend(dir_at.to_be_bytes());
    switch_header(f, path, (!bitmaps.is_empty()).then_some(ext))?;
    // 4. The old structures (and after a rebuild, the old refcount structure) freed.
    if rebuild.is_some() {
        check_io(path, f, Repair::Leaks, &mut |_, _| {})?;
    } else if !old.is_empty() {
        // Bitmap clusters are never shared: one whose refcount is not 1 is also
        // something else in a corrupt image, and is left alone (leaked at worst).
        let only = |c: &&u64| stored.get(**c as usize) == Some(&1);
        let pairs: Vec<(u64, u64)> = old.iter().filter(only).map(|&c| (c, 0)).collect();
        set_refcounts(f, &g, &rt, &pairs).map_err(io)?;
    }
    Ok(())
}

/// Writes `buf` (whole clusters) into the next clusters, which must be contiguous
/// where the buffer spans several: a table or directory is one run. Returns its offset.
fn write_run(
    f: &dyn MetaIo,
    next: &mut impl Iterator<Item = u64>,
    buf: &[u8],
    cs: u64,
) -> std::io::Result<u64> {
    let n = (buf.len() as u64).div_ceil(cs);
    let first = next.next().expect("counted");
    for k in 1..n {
        let c = next.next().expect("counted");
        assert_eq!(c, first + k, "multi-cluster bitmap structures are placed in one run");
    }
    let mut padded = buf.to_vec();
    padded.resize((n * cs) as usize, 0);
    f.meta_write(&padded, first * cs)?;
    Ok(first * cs)
}

/// `need` free clusters inside the existing refcount blocks, as one run from the first
/// long enough gap (tables and directories span clusters and must be contiguous);
/// `None` when there is no such run. Also the stored refcounts it read.
type Placement = (Option<Vec<u64>>, Vec<u64>);

fn free_clusters(
    f: &dyn MetaIo,
    g: &Geometry,
    rt: &[u64],
    need: u64,
) -> std::io::Result<Placement> {
    let covered =
        rt.iter().take_while(|&&e| e & !REFT_RESERVED != 0).count() as u64 * g.refblock_entries();
    let mut report = Default::default();
    let stored = stored_refcounts(f, g, rt, covered, &mut report)?;
    if need == 0 {
        return Ok((Some(Vec::new()), stored));
    }
    let mut run = 0u64;
    for c in 1..covered {
        run = if stored[c as usize] == 0 { run + 1 } else { 0 };
        if run == need {
            return Ok((Some((c + 1 - need..=c).collect()), stored));
        }
    }
    Ok((None, stored))
}

/// The header area with the bitmaps extension replaced (or removed with `None`) and
/// the autoclear bit to match: (the old first cluster, the new one).
fn new_header(
    f: &dyn MetaIo,
    path: &Path,
    ext: Option<Vec<u8>>,
) -> Result<(Vec<u8>, Vec<u8>), OpenError> {
    let (mut h, _) = read_header(path, f)?;
    let cs = h.cluster_size() as usize;
    let first = read_at(f, 0, cs).map_err(|e| OpenError::io(path, e))?;
    match (ext, h.extensions.iter().position(|e| e.kind == EXT_BITMAPS)) {
        (Some(data), Some(i)) => h.extensions[i].data = data,
        (Some(data), None) => h.extensions.push(Extension { kind: EXT_BITMAPS, data }),
        (None, Some(i)) => {
            h.extensions.remove(i);
        }
        (None, None) => {}
    }
    if h.extensions.iter().any(|e| e.kind == EXT_BITMAPS) {
        h.autoclear |= AUTOCLEAR_BITMAPS;
    } else {
        h.autoclear &= !AUTOCLEAR_BITMAPS;
    }
    let mut new = vec![0u8; cs];
    h.write_to(&mut new)
        .map_err(|e| OpenError::invalid(path, format!("cannot store bitmaps: {}", e.0)))?;
    Ok((first, new))
}

/// Writes [`new_header`]'s header area in one write, then syncs.
fn switch_header(f: &dyn MetaIo, path: &Path, ext: Option<Vec<u8>>) -> Result<(), OpenError> {
    let (first, new) = new_header(f, path, ext)?;
    let end = super::header_area_end(&first).max(super::header_area_end(&new));
    let end = (end.div_ceil(512) * 512).min(new.len() as u64) as usize;
    f.meta_write(&new[..end], 0).map_err(|e| OpenError::io(path, e))?;
    f.meta_sync().map_err(|e| OpenError::io(path, e))
}

/// Loads the image's bitmaps at open. A read-write open then flags them in use. An
/// invalid extension or directory is reported and the bitmaps dropped (the autoclear
/// bit cleared, as for software that does not maintain them; a read-only open only
/// ignores them); a bitmap too large for memory refuses a read-write open (dropping
/// it would lose what it recorded) and is skipped by a read-only one.
pub fn load_all(
    f: &dyn MetaIo,
    path: &Path,
    h: &mut Header,
    read_only: bool,
) -> Result<Vec<StoredBitmap>, OpenError> {
    let file_size = f.meta_len().map_err(|e| OpenError::io(path, e))?;
    let dir = match read_directory(f, h, file_size) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(Vec::new()),
        Err(m) => return drop_invalid(f, path, h, read_only, &m),
    };
    if dir.entries.len() > MAX_BITMAPS {
        let n = dir.entries.len();
        let m = format!("the image stores {n} bitmaps; at most {MAX_BITMAPS} are served");
        if read_only {
            tracing::warn!(image = %path.display(), "{m}; they are ignored");
            return Ok(Vec::new());
        }
        return Err(OpenError::invalid(path, m));
    }
    let mut out = Vec::with_capacity(dir.entries.len());
    for e in &dir.entries {
        if let Err(m) = fits_memory(h.size, e) {
            if read_only {
                tracing::warn!(image = %path.display(), bitmap = %e.name, "{m}; ignored");
                continue;
            }
            return Err(OpenError::invalid(path, format!("bitmap {:?}: {m}", e.name)));
        }
        let (map, inconsistent) = match e.unusable() {
            Some(why) => {
                tracing::warn!(image = %path.display(), bitmap = %e.name, "bitmap is inconsistent: {why}; clear or remove it before using it for a backup");
                (DirtyBitmap::new(h.size, e.granularity()), true)
            }
            None => match load(f, path, h, e) {
                Ok(m) => (m, false),
                Err(m) => return drop_invalid(f, path, h, read_only, &m),
            },
        };
        out.push(StoredBitmap {
            name: e.name.clone(),
            map: Arc::new(map),
            auto: e.auto(),
            inconsistent,
        });
    }
    if !read_only {
        mark_in_use(f, &dir).map_err(|e| OpenError::io(path, e))?;
    }
    Ok(out)
}

/// Whether a bitmap of entry `e` over `size` bytes fits the per-bitmap memory limit.
fn fits_memory(size: u64, e: &DirEntry) -> Result<(), String> {
    let bytes = size.div_ceil(e.granularity()).div_ceil(8);
    if bytes > MAX_BITMAP_BYTES {
        return Err(format!(
            "at granularity {} it needs {bytes} bytes of memory, more than the limit of \
             {MAX_BITMAP_BYTES}",
            e.granularity()
        ));
    }
    Ok(())
}

fn drop_invalid(
    f: &dyn MetaIo,
    path: &Path,
    h: &mut Header,
    read_only: bool,
    why: &str,
) -> Result<Vec<StoredBitmap>, OpenError> {
    tracing::warn!(image = %path.display(), "the persistent bitmaps are invalid ({why}): they are dropped");
    if !read_only {
        invalidate_bitmaps(path, f, h)?;
        h.autoclear &= !AUTOCLEAR_BITMAPS;
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    //! Storing bitmaps: round trips, replacement without leaks, both placements (free
    //! clusters inside the refcount blocks, and after the end with a refcount rebuild),
    //! and every power cut during a store.

    use super::*;
    use crate::format::qcow2::create::{CreateOptions, create};
    use crate::format::qcow2::tools::powercut::{Mem, cut};

    /// A fresh image of `size` bytes, its path and bytes.
    fn image(size: u64, cs: u64, refcount_bits: u32) -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img.qcow2");
        let o = CreateOptions { size, cluster_size: cs, refcount_bits, ..Default::default() };
        create(&p, &o).unwrap();
        let data = std::fs::read(&p).unwrap();
        (dir, data)
    }

    /// A bitmap with one chunk set every `every` chunks, and a run of 10000 set.
    fn pattern(size: u64, granularity: u64, every: u64) -> DirtyBitmap {
        let m = DirtyBitmap::new(size, granularity);
        for c in (0..m.chunks()).step_by(every as usize) {
            m.set_range(c * granularity, 1);
        }
        m.set_range(granularity * 7, granularity * 10000);
        m
    }

    fn store_all(m: &Mem, path: &Path, maps: &[(&str, &DirtyBitmap, bool)]) {
        let to: Vec<ToStore<'_>> = maps
            .iter()
            .map(|(n, map, auto)| ToStore { name: n, map, auto: *auto, inconsistent: false })
            .collect();
        store(m, path, &to).unwrap();
    }

    fn clean(m: &Mem, path: &Path, what: &str) -> (u64, u64) {
        let r = check_io(path, m, Repair::None, &mut |_, _| {}).unwrap();
        assert_eq!((r.corruptions, r.check_errors), (0, 0), "{what}: {:?}", r.messages);
        (r.corruptions, r.leaks)
    }

    /// The bitmaps the image holds: name, flags, words.
    fn loaded(m: &Mem, path: &Path) -> Vec<(String, u32, Vec<u64>)> {
        let (h, size) = read_header(path, m).unwrap();
        let Some(dir) = read_directory(m, &h, size).unwrap() else { return Vec::new() };
        dir.entries
            .iter()
            .map(|e| {
                let words = if e.in_use() {
                    Vec::new()
                } else {
                    let b = load(m, path, &h, e).unwrap();
                    (0..b.words()).map(|w| b.word(w)).collect()
                };
                (e.name.clone(), e.flags, words)
            })
            .collect()
    }

    fn words(b: &DirtyBitmap) -> Vec<u64> {
        (0..b.words()).map(|w| b.word(w)).collect()
    }

    #[test]
    fn stored_bitmaps_load_back_and_replacing_them_leaks_nothing() {
        for (size, cs, bits) in [(64 << 20, 65536, 16), (64 << 20, 4096, 16), (512 << 20, 1024, 64)]
        {
            let (dir, initial) = image(size, cs, bits);
            let path = dir.path().join("img.qcow2");
            let m = Mem::with(initial);
            let a = pattern(size, 512, 4096);
            let b = pattern(size, 65536, 3);
            store_all(&m, &path, &[("a", &a, true), ("b", &b, false)]);
            assert_eq!(clean(&m, &path, "stored"), (0, 0));
            let got = loaded(&m, &path);
            assert_eq!(got.len(), 2);
            assert_eq!((got[0].0.as_str(), got[0].1, &got[0].2), ("a", FLAG_AUTO, &words(&a)));
            assert_eq!((got[1].0.as_str(), got[1].1, &got[1].2), ("b", 0, &words(&b)));
            // As an open marks them, then a second store replaces them.
            let (h, fsize) = read_header(&path, &m).unwrap();
            mark_in_use(&m, &read_directory(&m, &h, fsize).unwrap().unwrap()).unwrap();
            assert!(loaded(&m, &path).iter().all(|(_, f, _)| f & FLAG_IN_USE != 0));
            let c = pattern(size, 4096, 7);
            store_all(&m, &path, &[("c", &c, true)]);
            assert_eq!(clean(&m, &path, "replaced"), (0, 0));
            assert_eq!(loaded(&m, &path), vec![("c".to_string(), FLAG_AUTO, words(&c))]);
            // None left: the extension and its autoclear bit go.
            store_all(&m, &path, &[]);
            assert_eq!(clean(&m, &path, "removed"), (0, 0));
            let (h, _) = read_header(&path, &m).unwrap();
            assert!(h.extension(EXT_BITMAPS).is_none() && h.autoclear & AUTOCLEAR_BITMAPS == 0);
        }
    }

    #[test]
    fn every_power_cut_during_a_store_leaves_old_or_new_bitmaps() {
        // 64 KiB clusters place in free clusters; 1 KiB clusters with 64-bit
        // refcounts (128 clusters a block) and a dense bitmap need a rebuild.
        for (size, cs, bits, gran) in [(64 << 20, 65536, 16, 65536), (512 << 20, 1024, 64, 512)] {
            let (dir, fresh) = image(size, cs, bits);
            let path = dir.path().join("img.qcow2");
            let m = Mem::with(fresh);
            let old = pattern(size, gran, 5);
            store_all(&m, &path, &[("old", &old, true)]);
            let (h, fsize) = read_header(&path, &m).unwrap();
            mark_in_use(&m, &read_directory(&m, &h, fsize).unwrap().unwrap()).unwrap();
            let initial = m.data.borrow().clone();
            let m = Mem::with(initial.clone());
            let new = pattern(size, gran, 4096);
            store_all(&m, &path, &[("new", &new, true), ("n2", &old, false)]);
            let (after, _) = read_header(&path, &m).unwrap();
            let rebuilt = after.refcount_table_offset != h.refcount_table_offset;
            assert_eq!(rebuilt, cs == 1024, "cluster {cs}: the placement path taken");
            let log = m.log.into_inner();
            let want_old = vec![("old".to_string(), FLAG_AUTO | FLAG_IN_USE, Vec::new())];
            let want_new = vec![
                ("new".to_string(), FLAG_AUTO, words(&new)),
                ("n2".to_string(), 0, words(&old)),
            ];
            for k in 0..=log.len() {
                let (all, synced) = cut(&initial, &log, k);
                for (img, how) in [(all, "all written"), (synced, "synced only")] {
                    let what = format!("cluster {cs}, cut at op {k} of {} ({how})", log.len());
                    let m = Mem::with(img);
                    clean(&m, &path, &what);
                    let got = loaded(&m, &path);
                    assert!(got == want_old || got == want_new, "{what}: {got:?}");
                }
            }
        }
    }
}
