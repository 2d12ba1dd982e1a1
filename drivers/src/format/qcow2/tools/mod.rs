//! `info` and `map`: what an image is, and where each guest range of it lives through
//! the backing chain. Synchronous, for the command line; backing files are resolved
//! with the same allowed-directory rule as serving.

pub mod check;
pub mod create;
#[cfg(test)]
pub(crate) mod powercut;
pub mod resize;
pub mod snapshots;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::OpenError;

use crate::format::qcow2::header::Header;
use crate::format::qcow2::open::{MetaIo, read_at, read_header, read_table, resolve_backing};
use crate::format::qcow2::snapshot::{SnapshotInfo, read_snapshots};
use crate::format::qcow2::types::*;

/// What `info` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub filename: String,
    pub format: &'static str,
    pub virtual_size: u64,
    pub actual_size: u64,
    pub cluster_size: Option<u64>,
    pub compat: Option<&'static str>,
    pub lazy_refcounts: bool,
    pub refcount_bits: Option<u32>,
    pub corrupt: bool,
    pub dirty: bool,
    pub compression_type: Option<&'static str>,
    pub backing_filename: Option<String>,
    pub backing_format: Option<String>,
    /// The external data file (as stored in the image) and whether it is raw.
    pub data_file: Option<String>,
    pub data_file_raw: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// LUKS-encrypted (`crypt_method` 2).
    pub encrypted: bool,
    pub snapshots: Vec<SnapshotInfo>,
    /// The persistent bitmaps, as `qemu-img info` lists them.
    pub bitmaps: Vec<BitmapInfo>,
}

/// One persistent bitmap of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// `in-use` and `auto`, as QEMU names them.
    pub flags: Vec<&'static str>,
}

fn bitmap_infos(f: &File, h: &Header, file_size: u64) -> Vec<BitmapInfo> {
    let Ok(Some(dir)) = crate::format::qcow2::bitmaps::read_directory(f, h, file_size) else {
        return Vec::new();
    };
    dir.entries
        .iter()
        .map(|e| BitmapInfo {
            name: e.name.clone(),
            granularity: e.granularity(),
            flags: [(e.in_use(), "in-use"), (e.auto(), "auto")]
                .into_iter()
                .filter_map(|(on, n)| on.then_some(n))
                .collect(),
        })
        .collect()
}

fn is_qcow2(f: &dyn MetaIo) -> bool {
    read_at(f, 0, 4).is_ok_and(|m| m == MAGIC.to_be_bytes())
}

/// Describes an image (qcow2, or raw for anything else).
pub fn info(path: &Path) -> Result<ImageInfo, OpenError> {
    let f = File::open(path).map_err(|e| OpenError::io(path, e))?;
    let meta = f.metadata().map_err(|e| OpenError::io(path, e))?;
    let actual_size = meta.blocks() * 512;
    if !is_qcow2(&f) {
        return Ok(ImageInfo {
            filename: path.display().to_string(),
            format: "raw",
            virtual_size: meta.len(),
            actual_size,
            cluster_size: None,
            compat: None,
            lazy_refcounts: false,
            refcount_bits: None,
            corrupt: false,
            dirty: false,
            compression_type: None,
            backing_filename: None,
            data_file: None,
            data_file_raw: false,
            extended_l2: false,
            encrypted: false,
            backing_format: None,
            snapshots: Vec::new(),
            bitmaps: Vec::new(),
        });
    }
    let (h, file_size) = crate::format::qcow2::open::read_header_any_crypt(path, &f)?;
    let (_, snapshots) = read_snapshots(path, &f, &h, file_size)?;
    Ok(ImageInfo {
        filename: path.display().to_string(),
        format: "qcow2",
        virtual_size: h.size,
        actual_size,
        cluster_size: Some(h.cluster_size()),
        compat: Some(if h.version == 2 { "0.10" } else { "1.1" }),
        lazy_refcounts: h.lazy_refcounts(),
        refcount_bits: Some(h.geometry().refcount_bits()),
        corrupt: h.is_corrupt(),
        dirty: h.is_dirty(),
        compression_type: (h.version == 3).then_some(if h.compression() == Compression::Zstd {
            "zstd"
        } else {
            "zlib"
        }),
        backing_filename: h.backing_file.clone(),
        data_file: h.data_file(),
        data_file_raw: h.data_file_raw(),
        extended_l2: h.geometry().extended_l2,
        encrypted: h.crypt_method == 2,
        backing_format: h.backing_format(),
        snapshots,
        bitmaps: bitmap_infos(&f, &h, file_size),
    })
}

/// One range of `map` output (fields as `qemu-img map --output=json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

enum SyncLayer {
    Qcow2 { f: File, g: Geometry, l1: Vec<u64>, tables: HashMap<u64, Vec<u8>>, path: PathBuf },
    Raw { size: u64 },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Unallocated,
    Zero,
    Data(u64),
    Compressed,
}

impl SyncLayer {
    fn size(&self) -> u64 {
        match self {
            SyncLayer::Qcow2 { g, .. } => g.size,
            SyncLayer::Raw { size } => *size,
        }
    }

    /// The state at `p` and how far it extends (at least to the end of the cluster).
    fn state(&mut self, p: u64) -> Result<(State, u64), OpenError> {
        match self {
            SyncLayer::Raw { size } => Ok((State::Data(p), *size - p)),
            SyncLayer::Qcow2 { f, g, l1, tables, path } => {
                let cs = g.cluster_size();
                let in_cluster = p & (cs - 1);
                let l1i = (p >> (g.cluster_bits + g.l2_bits())) as usize;
                let raw = l1.get(l1i).copied().unwrap_or(0);
                let (l2, _) = decode_l1(raw, g).map_err(|e| {
                    OpenError::invalid(path.as_path(), format!("L1 entry {l1i}: {e:?}"))
                })?;
                if l2 == 0 {
                    let end = ((l1i as u64) + 1) << (g.cluster_bits + g.l2_bits());
                    return Ok((State::Unallocated, end.min(g.size) - p));
                }
                if let std::collections::hash_map::Entry::Vacant(e) = tables.entry(l2) {
                    let t = read_at(f, l2, cs as usize)
                        .map_err(|e| OpenError::io(path.as_path(), e))?;
                    e.insert(t);
                }
                let t = &tables[&l2];
                let j = ((p >> g.cluster_bits) & (g.l2_entries() - 1)) as usize;
                let (w0, w1) = l2_raw_at(t, j, g);
                let e = L2Entry::decode2(w0, w1, g).map_err(|e| {
                    OpenError::invalid(path.as_path(), format!("L2 entry at {p:#x}: {e:?}"))
                })?;
                if let L2Entry::Sub { host, .. } = e {
                    let s0 = (in_cluster >> g.subcluster_bits()) as u32;
                    let len = (u64::from(e.sub_run_end(s0)) << g.subcluster_bits()) - in_cluster;
                    let st = match e.sub_state(s0) {
                        SubState::Data => State::Data(host.unwrap_or(0) + in_cluster),
                        SubState::Zero => State::Zero,
                        SubState::Unallocated => State::Unallocated,
                    };
                    return Ok((st, len));
                }
                let st = match e {
                    L2Entry::Unallocated => State::Unallocated,
                    L2Entry::Zero { .. } => State::Zero,
                    L2Entry::Normal { host, .. } => State::Data(host + in_cluster),
                    L2Entry::Compressed { .. } => State::Compressed,
                    L2Entry::Sub { .. } => unreachable!("handled above"),
                };
                Ok((st, cs - in_cluster))
            }
        }
    }
}

fn open_chain(path: &Path, allowed: &[PathBuf]) -> Result<Vec<SyncLayer>, OpenError> {
    let mut chain = Vec::new();
    let mut next = Some((path.to_path_buf(), None::<String>));
    let mut seen: Vec<PathBuf> = Vec::new();
    while let Some((p, fmt)) = next.take() {
        let canon = p.canonicalize().map_err(|e| OpenError::io(&p, e))?;
        if seen.contains(&canon) {
            return Err(OpenError::invalid(&p, "backing chain loops"));
        }
        seen.push(canon);
        let f = File::open(&p).map_err(|e| OpenError::io(&p, e))?;
        let qcow2 = match fmt.as_deref() {
            Some("raw") => false,
            Some(_) => true,
            None => is_qcow2(&f),
        };
        if !qcow2 {
            let size = f.metadata().map_err(|e| OpenError::io(&p, e))?.len();
            chain.push(SyncLayer::Raw { size });
            break;
        }
        let (h, _): (Header, u64) = read_header(&p, &f)?;
        let l1 = read_table(&p, &f, h.l1_table_offset, u64::from(h.l1_size))?;
        if let Some(b) = &h.backing_file {
            next = Some((resolve_backing(&p, b, allowed)?, h.backing_format()));
        }
        chain.push(SyncLayer::Qcow2 { f, g: h.geometry(), l1, tables: HashMap::new(), path: p });
    }
    Ok(chain)
}

/// Maps every guest range of an image through its backing chain.
pub fn map(path: &Path, allowed_backing_dirs: &[PathBuf]) -> Result<Vec<MapEntry>, OpenError> {
    let mut chain = open_chain(path, allowed_backing_dirs)?;
    let size = chain[0].size();
    let mut out: Vec<MapEntry> = Vec::new();
    let mut p = 0u64;
    while p < size {
        let mut step = size - p;
        let mut entry = MapEntry {
            start: p,
            length: 0,
            depth: chain.len() - 1,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: None,
        };
        for (depth, layer) in chain.iter_mut().enumerate() {
            if p >= layer.size() {
                entry.depth = depth;
                break;
            }
            let (st, run) = layer.state(p)?;
            step = step.min(run).min(layer.size() - p);
            match st {
                State::Unallocated => continue,
                State::Zero => {
                    entry = MapEntry { depth, present: true, zero: true, data: false, ..entry };
                }
                State::Data(host) => {
                    entry = MapEntry {
                        depth,
                        present: true,
                        zero: false,
                        data: true,
                        offset: Some(host),
                        ..entry
                    };
                }
                State::Compressed => {
                    entry = MapEntry {
                        depth,
                        present: true,
                        zero: false,
                        data: true,
                        compressed: true,
                        ..entry
                    };
                }
            }
            break;
        }
        entry.length = step;
        match out.last_mut() {
            Some(last)
                if last.depth == entry.depth
                    && last.present == entry.present
                    && last.zero == entry.zero
                    && last.data == entry.data
                    && last.compressed == entry.compressed
                    && match (last.offset, entry.offset) {
                        (Some(a), Some(b)) => a + last.length == b,
                        (None, None) => true,
                        _ => false,
                    } =>
            {
                last.length += step;
            }
            _ => out.push(entry),
        }
        p += step;
    }
    Ok(out)
}
