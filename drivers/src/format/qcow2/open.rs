//! Opening an image on the control plane: header, tables, snapshot table and backing
//! chain are read and validated synchronously, before any reactor sees the image.
//!
//! An image is untrusted input. Every table offset is checked against the file, every
//! L1 and refcount-table entry is checked for reserved bits and alignment, and a
//! backing file is opened only if its resolved, canonical path lies inside one of the
//! disk's `allowed_backing_dirs` — an image cannot make the appliance open arbitrary
//! host files — and only if it does not appear twice in the chain (a loop).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::OpenError;
use crate::io::{EngineKind, Storage};

use super::header::Header;
use super::layer::MAX_CHAIN_DEPTH;
use super::types::*;

/// Synchronous access to an image's bytes for the control plane (opening, tools,
/// repair): a plain file, or a [`Storage`] (the simulated disk of the crash tests).
pub trait MetaIo {
    fn meta_read(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize>;
    fn meta_write(&self, buf: &[u8], off: u64) -> std::io::Result<()>;
    fn meta_sync(&self) -> std::io::Result<()>;
    fn meta_len(&self) -> std::io::Result<u64>;
}

impl MetaIo for File {
    fn meta_read(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        FileExt::read_at(self, buf, off)
    }
    fn meta_write(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        FileExt::write_all_at(self, buf, off)
    }
    fn meta_sync(&self) -> std::io::Result<()> {
        File::sync_all(self)
    }
    fn meta_len(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl MetaIo for Storage {
    fn meta_read(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        let n = self.read_sync(buf, off)?;
        // A short tail reads as end of file.
        Ok(n.min(self.size().saturating_sub(off) as usize))
    }
    fn meta_write(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.write_sync(buf, off)
    }
    fn meta_sync(&self) -> std::io::Result<()> {
        self.sync_all()
    }
    fn meta_len(&self) -> std::io::Result<u64> {
        Ok(self.size())
    }
}

/// How to open an image and its backing files.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub engine: EngineKind,
    pub direct: bool,
    pub read_only: bool,
    /// Directories backing files may live in (canonicalised by the opener).
    pub allowed_backing_dirs: Vec<PathBuf>,
    pub l2_cache_bytes: Option<u64>,
    pub refcount_cache_bytes: Option<u64>,
    /// Serve this storage instead of opening the path (the simulated disk of the crash
    /// tests; the image may then have no backing file).
    pub storage: Option<Arc<Storage>>,
    /// With `storage`: serve this storage as the image's external data file.
    pub data_storage: Option<Arc<Storage>>,
    /// Let channels read and write allocated clusters without a hop to the owning
    /// shard (see `hints`). Off only to measure what the hop costs.
    pub zero_hop: bool,
    /// Take image locks on the image (backing files are always locked). Off only for a
    /// block job writing into an image this process already has open (a commit's base).
    pub locking: bool,
    /// The secret that opens a LUKS-encrypted image's key slots.
    pub encryption_key: Option<super::luks::Secret>,
}

/// A qcow2 file's validated metadata.
pub(crate) struct OpenedQcow2 {
    pub path: PathBuf,
    pub storage: Arc<Storage>,
    /// The external data file (opened like the image: same engine, its own O_DIRECT
    /// alignment probe, same locks), when guest data lives there.
    pub data: Option<Arc<Storage>>,
    /// The data's cipher, when the image is LUKS-encrypted.
    pub crypt: Option<Arc<super::luks::SectorCipher>>,
    pub header: Header,
    pub l1: Vec<u64>,
    pub file_size: u64,
}

/// One file of a chain, opened.
#[allow(clippy::large_enum_variant)] // A handful per image, on the control plane.
pub(crate) enum OpenedLayer {
    Qcow2(OpenedQcow2),
    Raw { storage: Arc<Storage> },
}

/// The image with its chain, ready to become a shard.
pub(crate) struct OpenedImage {
    pub top: OpenedQcow2,
    pub reftable: Vec<u64>,
    /// The snapshot table's size in bytes, and its entries.
    pub snapshots: (u64, Vec<super::snapshot::SnapshotInfo>),
    pub backing: Vec<OpenedLayer>,
}

/// Reads `len` bytes at `off` from a plain (buffered) handle; bytes past the end of
/// the file read as zeros.
pub(crate) fn read_at(f: &dyn MetaIo, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.meta_read(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(buf)
}

/// Reads and validates a header from a file.
pub(crate) fn read_header(path: &Path, f: &dyn MetaIo) -> Result<(Header, u64), OpenError> {
    read_header_with(path, f, Header::parse)
}

/// [`read_header`], accepting LUKS-encrypted images (the engine's open, which decrypts).
pub(crate) fn read_header_any_crypt(
    path: &Path,
    f: &dyn MetaIo,
) -> Result<(Header, u64), OpenError> {
    read_header_with(path, f, Header::parse_any_crypt)
}

fn read_header_with(
    path: &Path,
    f: &dyn MetaIo,
    parse: fn(&[u8], u64) -> Result<Header, super::header::HeaderError>,
) -> Result<(Header, u64), OpenError> {
    let file_size = f.meta_len().map_err(|e| OpenError::io(path, e))?;
    let first = read_at(f, 0, (2u64 << 20).min(file_size.max(512)) as usize)
        .map_err(|e| OpenError::io(path, e))?;
    let header = parse(&first, file_size)
        .map_err(|e| OpenError::invalid(path, format!("invalid qcow2 image: {e}")))?;
    Ok((header, file_size))
}

/// Reads a table of big-endian u64 entries (an L1 or refcount table), a chunk at a
/// time. The table starts out zeroed by the allocator (fresh pages from the OS for a
/// large one), and chunks that hold only zero entries are never written, so the pages
/// of a mostly empty table — a huge virtual size with little data — stay unbacked:
/// resident memory follows the entries in use, not the header's table size.
pub(crate) fn read_table(
    path: &Path,
    f: &dyn MetaIo,
    off: u64,
    entries: u64,
) -> Result<Vec<u64>, OpenError> {
    const CHUNK_ENTRIES: usize = 8192;
    let mut table = vec![0u64; entries as usize];
    let mut buf = vec![0u8; CHUNK_ENTRIES.min(table.len()) * 8];
    for (i, part) in table.chunks_mut(CHUNK_ENTRIES).enumerate() {
        let bytes = &mut buf[..part.len() * 8];
        let at = off + (i * CHUNK_ENTRIES * 8) as u64;
        read_exact_or_zero(f, bytes, at).map_err(|e| OpenError::io(path, e))?;
        if bytes.iter().all(|&b| b == 0) {
            continue;
        }
        for (e, raw) in part.iter_mut().zip(bytes.chunks_exact(8)) {
            *e = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
        }
    }
    Ok(table)
}

/// Fills `buf` from `off`; bytes past the end of the file read as zeros.
pub(crate) fn read_exact_or_zero(f: &dyn MetaIo, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.meta_read(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Checks L1 entries: reserved bits, alignment, inside the file.
pub(crate) fn validate_l1(
    path: &Path,
    l1: &[u64],
    g: &Geometry,
    file_size: u64,
    what: &str,
) -> Result<(), OpenError> {
    let end = file_size.div_ceil(g.cluster_size()) * g.cluster_size();
    for (i, &raw) in l1.iter().enumerate() {
        let (off, _) = decode_l1(raw, g).map_err(|e| {
            OpenError::invalid(path, format!("{what} entry {i} ({raw:#x}) is invalid: {e:?}"))
        })?;
        if off != 0 && off + g.cluster_size() > end {
            return Err(OpenError::invalid(
                path,
                format!(
                    "{what} entry {i} points at an L2 table at {off:#x}, beyond the end of the file ({file_size} bytes)"
                ),
            ));
        }
        if off == 0 && raw & OFLAG_COPIED != 0 {
            return Err(OpenError::invalid(
                path,
                format!("{what} entry {i} is COPIED with no table"),
            ));
        }
    }
    Ok(())
}

fn open_qcow2(
    path: &Path,
    opts: &OpenOptions,
    read_only: bool,
    top: bool,
) -> Result<(OpenedQcow2, Box<dyn MetaIo>), OpenError> {
    let (storage, meta): (Arc<Storage>, Box<dyn MetaIo>) = match (&opts.storage, top) {
        (Some(s), true) => (s.clone(), Box::new(SharedStorage(s.clone()))),
        _ => (
            if opts.locking || !top {
                Storage::open_file(path, opts.engine, opts.direct, read_only)?
            } else {
                Storage::open_file_unlocked(path, opts.engine, opts.direct, read_only)?
            },
            Box::new(File::open(path).map_err(|e| OpenError::io(path, e))?),
        ),
    };
    let f = &*meta;
    let (header, file_size) = read_header_any_crypt(path, f)?;
    if header.is_corrupt() && !read_only {
        return Err(OpenError::invalid(
            path,
            "the image is marked corrupt: serve it read-only (read_only = true) or repair it \
             with `appliance check --repair all`",
        ));
    }
    let g = header.geometry();
    let l1 = read_table(path, f, header.l1_table_offset, u64::from(header.l1_size))?;
    validate_l1(path, &l1, &g, file_size, "L1 table")?;
    let data = match header.data_file() {
        Some(name) => Some(open_data_file(path, &name, opts, read_only, top)?),
        None => None,
    };
    let crypt = match (header.crypt_method, &opts.encryption_key) {
        (0, _) => None,
        (_, None) => {
            return Err(OpenError::invalid(
                path,
                "the image is LUKS-encrypted: give its key (`[disk.encryption] key_file`)",
            ));
        }
        // A chain shares the disk's one key (QEMU names a secret per layer).
        (_, Some(key)) => Some(Arc::new(super::luks::unlock_image(path, f, &header, &key.0)?)),
    };
    let opened =
        OpenedQcow2 { path: path.to_path_buf(), storage, data, crypt, header, l1, file_size };
    Ok((opened, meta))
}

/// Opens the external data file `name` of the image at `path`: resolved like a backing
/// file (relative to the image, inside the allowed directories), never the image
/// itself, through the same engine with its own alignment probe.
fn open_data_file(
    path: &Path,
    name: &str,
    opts: &OpenOptions,
    read_only: bool,
    top: bool,
) -> Result<Arc<Storage>, OpenError> {
    if opts.storage.is_some() {
        return opts.data_storage.clone().ok_or_else(|| {
            OpenError::invalid(
                path,
                "an image on this storage keeps its data in the image itself: external data \
                 files are only for images in files (or simulated ones, given their own)",
            )
        });
    }
    let dpath = resolve_confined(path, name, &opts.allowed_backing_dirs, "data file")?;
    if path.canonicalize().is_ok_and(|p| p == dpath) {
        return Err(OpenError::invalid(path, format!("data file {name:?} is the image itself")));
    }
    if opts.locking || !top {
        Storage::open_file(&dpath, opts.engine, opts.direct, read_only)
    } else {
        Storage::open_file_unlocked(&dpath, opts.engine, opts.direct, read_only)
    }
}

/// A storage used as [`MetaIo`] by value.
pub(crate) struct SharedStorage(pub Arc<Storage>);

impl MetaIo for SharedStorage {
    fn meta_read(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        self.0.meta_read(buf, off)
    }
    fn meta_write(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.0.meta_write(buf, off)
    }
    fn meta_sync(&self) -> std::io::Result<()> {
        self.0.meta_sync()
    }
    fn meta_len(&self) -> std::io::Result<u64> {
        self.0.meta_len()
    }
}

/// Resolves a backing file name against the image's directory and the allowed
/// directories.
pub(crate) fn resolve_backing(
    image: &Path,
    name: &str,
    allowed: &[PathBuf],
) -> Result<PathBuf, OpenError> {
    resolve_confined(image, name, allowed, "backing file")
}

/// Resolves a file an image names (`what`: a backing file, a data file) against the
/// image's directory; the canonical result must lie inside an allowed directory.
pub(crate) fn resolve_confined(
    image: &Path,
    name: &str,
    allowed: &[PathBuf],
    what: &str,
) -> Result<PathBuf, OpenError> {
    if name.starts_with("json:") || name.contains("://") {
        return Err(OpenError::invalid(image, format!("{what} {name:?} is not a plain file path")));
    }
    let dir = image.parent().unwrap_or(Path::new("."));
    let candidate =
        if Path::new(name).is_absolute() { PathBuf::from(name) } else { dir.join(name) };
    let canon = candidate.canonicalize().map_err(|e| {
        OpenError::invalid(image, format!("{what} {name:?} ({}): {e}", candidate.display()))
    })?;
    let inside = allowed.iter().any(|d| d.canonicalize().is_ok_and(|d| canon.starts_with(d)));
    if !inside {
        let dirs: Vec<String> = allowed.iter().map(|d| d.display().to_string()).collect();
        return Err(OpenError::invalid(
            image,
            format!(
                "{what} {name:?} resolves to {}, outside the allowed backing directories [{}]; \
                 add its directory to `allowed_backing_dirs` if it is trusted",
                canon.display(),
                dirs.join(", ")
            ),
        ));
    }
    Ok(canon)
}

fn probe_format(path: &Path) -> Result<&'static str, OpenError> {
    let f = File::open(path).map_err(|e| OpenError::io(path, e))?;
    let m = read_at(&f as &dyn MetaIo, 0, 4).map_err(|e| OpenError::io(path, e))?;
    Ok(if m == MAGIC.to_be_bytes() { "qcow2" } else { "raw" })
}

/// Opens an image and its backing chain.
pub(crate) fn open_image(path: &Path, opts: &OpenOptions) -> Result<OpenedImage, OpenError> {
    let (top, meta) = open_qcow2(path, opts, opts.read_only, true)?;
    let f = &*meta;
    let h = &top.header;
    let reftable = read_table(
        path,
        f,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * h.cluster_size() / 8,
    )?;
    let end = top.file_size.div_ceil(h.cluster_size()) * h.cluster_size();
    for (i, &e) in reftable.iter().enumerate() {
        let off = e & !REFT_RESERVED;
        if e & REFT_RESERVED != 0 || !off.is_multiple_of(h.cluster_size()) {
            return Err(OpenError::invalid(
                path,
                format!("refcount table entry {i} ({e:#x}) is invalid"),
            ));
        }
        if off != 0 && off.saturating_add(h.cluster_size()) > end {
            return Err(OpenError::invalid(
                path,
                format!(
                    "refcount table entry {i} points beyond the end of the file (truncated image?)"
                ),
            ));
        }
    }
    let snapshots = super::snapshot::read_snapshots(path, f, h, top.file_size)?;
    if opts.storage.is_some() {
        if h.backing_file.is_some() {
            return Err(OpenError::invalid(
                path,
                "an image on this storage cannot have a backing file (only images in files can)",
            ));
        }
        return Ok(OpenedImage { top, reftable, snapshots, backing: Vec::new() });
    }
    let canon_top = path.canonicalize().map_err(|e| OpenError::io(path, e))?;
    let mut seen = vec![canon_top];
    let mut backing = Vec::new();
    let mut next = h.backing_file.clone().map(|n| (n, h.backing_format(), path.to_path_buf()));
    while let Some((name, fmt, from)) = next.take() {
        if seen.len() >= MAX_CHAIN_DEPTH {
            return Err(OpenError::invalid(
                path,
                format!("backing chain deeper than {MAX_CHAIN_DEPTH}"),
            ));
        }
        let bpath = resolve_backing(&from, &name, &opts.allowed_backing_dirs)?;
        if seen.contains(&bpath) {
            return Err(OpenError::invalid(
                &from,
                format!("backing file {} makes a loop in the backing chain", bpath.display()),
            ));
        }
        seen.push(bpath.clone());
        let fmt = match fmt.as_deref() {
            Some("qcow2") => "qcow2",
            Some("raw") => "raw",
            Some(other) => {
                return Err(OpenError::invalid(
                    &from,
                    format!("backing format {other:?} is not supported"),
                ));
            }
            None => probe_format(&bpath)?,
        };
        if fmt == "qcow2" {
            let (layer, _) = open_qcow2(&bpath, opts, true, false)?;
            next = layer
                .header
                .backing_file
                .clone()
                .map(|n| (n, layer.header.backing_format(), bpath.clone()));
            backing.push(OpenedLayer::Qcow2(layer));
        } else {
            let storage = Storage::open_file(&bpath, opts.engine, opts.direct, true)?;
            backing.push(OpenedLayer::Raw { storage });
        }
    }
    Ok(OpenedImage { top, reftable, snapshots, backing })
}
