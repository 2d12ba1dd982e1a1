//! `create`: new qcow2 images (v3 by default, or v2 for `compat=0.10`).
//!
//! Layout, as QEMU lays it out: the header (with a feature-name table and, if any, the
//! backing format and name) in cluster 0, then the refcount table, the refcount blocks,
//! the L1 table, and — with `preallocation=metadata` — every L2 table and a host
//! cluster for every guest cluster (the file is extended sparsely, so the data reads as
//! zeros without being written). The refcount structure is sized by a fixpoint so it
//! describes itself and everything else.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::format::qcow2::header::{Extension, Header, feature_name_table};
use crate::format::qcow2::types::*;

/// Options of a new image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    /// 2 for `compat=0.10`, 3 for `compat=1.1`.
    pub version: u32,
    pub lazy_refcounts: bool,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub preallocate_metadata: bool,
    pub compression: Compression,
    /// An external data file for the guest data (`data_file`), named as stored in the
    /// image (relative to the image's directory unless absolute); created or truncated
    /// to the virtual size, sparsely.
    pub data_file: Option<String>,
    /// `data_file_raw`: the data file is kept readable as a raw image on its own.
    pub data_file_raw: bool,
    /// `encrypt.format=luks`: the secret that opens the new volume's key slot, and how
    /// long its key derivation should take (`encrypt.iter-time`).
    pub luks: Option<(Vec<u8>, std::time::Duration)>,
    /// `extended_l2`: 128-bit L2 entries, 32 subclusters per cluster.
    pub extended_l2: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            lazy_refcounts: false,
            backing_file: None,
            backing_format: None,
            preallocate_metadata: false,
            compression: Compression::Zlib,
            data_file: None,
            data_file_raw: false,
            luks: None,
            extended_l2: false,
        }
    }
}

/// Why an image could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn invalid<T>(m: impl Into<String>) -> Result<T, CreateError> {
    Err(CreateError::Invalid(m.into()))
}

/// Creates (or truncates) `path` as a qcow2 image.
pub fn create(path: &Path, o: &CreateOptions) -> Result<(), CreateError> {
    if !o.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&o.cluster_size) {
        return invalid(format!(
            "cluster_size {} must be a power of two from 512 to 2M",
            o.cluster_size
        ));
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return invalid(format!(
            "refcount_bits {} must be a power of two from 1 to 64",
            o.refcount_bits
        ));
    }
    if o.version != 2 && o.version != 3 {
        return invalid(format!("version {} is not 2 (compat=0.10) or 3 (compat=1.1)", o.version));
    }
    if o.version == 2 {
        if o.refcount_bits != 16 {
            return invalid("compat=0.10 images only support refcount_bits=16");
        }
        if o.lazy_refcounts {
            return invalid("lazy_refcounts requires compat=1.1");
        }
        if o.compression == Compression::Zstd {
            return invalid("compression_type=zstd requires compat=1.1");
        }
    }
    if let Some(b) = &o.backing_file
        && (b.is_empty() || b.len() > MAX_BACKING_NAME as usize)
    {
        return invalid(format!("backing file name must be 1 to {MAX_BACKING_NAME} bytes"));
    }
    if let Some(f) = &o.backing_format
        && f != "qcow2"
        && f != "raw"
    {
        return invalid(format!("backing format {f:?} is not qcow2 or raw"));
    }
    check_data_file(o)?;
    if o.extended_l2 && o.version != 3 {
        return invalid("extended_l2 requires compat=1.1");
    }
    if o.extended_l2 && o.cluster_size < 1 << MIN_EXTL2_CLUSTER_BITS {
        return invalid(format!(
            "extended_l2 needs cluster_size of at least {} (subclusters of 512 bytes)",
            1u64 << MIN_EXTL2_CLUSTER_BITS
        ));
    }
    let cluster_bits = o.cluster_size.trailing_zeros();
    let refcount_order = o.refcount_bits.trailing_zeros();
    let g = Geometry {
        cluster_bits,
        refcount_order,
        size: o.size,
        version: o.version,
        external_data: o.data_file.is_some(),
        extended_l2: o.extended_l2,
    };
    let cs = o.cluster_size;
    let l1_size = g.l1_entries_needed();
    if l1_size * 8 > MAX_L1_BYTES {
        return invalid(format!(
            "size {} needs an L1 table larger than {MAX_L1_BYTES} bytes; use larger clusters",
            o.size
        ));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    if o.luks.is_some() && o.version != 3 {
        return invalid("encrypt.format=luks requires compat=1.1");
    }
    let luks_clusters = match o.luks {
        Some(_) => super::super::luks_format::area_len().div_ceil(cs),
        None => 0,
    };
    // A raw data file is consistent on its own: every cluster is mapped (QEMU forces
    // metadata preallocation with data_file_raw too).
    let prealloc = o.preallocate_metadata || o.data_file_raw;
    // A preallocated cluster is data: over a backing file it would hide the backing
    // file's bytes. With subclusters it can be preallocated and stay unallocated.
    if prealloc && o.backing_file.is_some() && !o.extended_l2 {
        return invalid(
            "a backing file and preallocation=metadata go together only with extended_l2=on",
        );
    }
    let (l2_tables, data_clusters) = if prealloc { (l1_size, o.size.div_ceil(cs)) } else { (0, 0) };
    // With a data file the guest's clusters live there, at their guest offsets.
    let (data_clusters, data_at) = match o.data_file {
        Some(_) => (0, Some(0)),
        None => (data_clusters, None),
    };
    // Fixpoint: refcount table clusters T and blocks B covering all clusters.
    let per = g.refblock_entries();
    let fixed = 1 + l1_clusters + luks_clusters + l2_tables + data_clusters;
    let (mut t, mut b) = (1u64, 1u64);
    loop {
        let total = fixed + t + b;
        let nb = total.div_ceil(per);
        let nt = (nb * 8).div_ceil(cs);
        if nb == b && nt == t {
            break;
        }
        b = nb;
        t = nt;
    }
    if t * cs > MAX_REFTABLE_BYTES {
        return invalid("the image needs a refcount table larger than 8 MiB; use larger clusters");
    }
    let reftable_off = cs;
    let blocks_off = reftable_off + t * cs;
    let l1_off = blocks_off + b * cs;
    let luks_off = l1_off + l1_clusters * cs;
    let l2_off = luks_off + luks_clusters * cs;
    let data_off = l2_off + l2_tables * cs;
    let total_clusters = fixed + t + b;

    let mut extensions = Vec::new();
    if let Some(f) = &o.backing_format {
        extensions.push(Extension { kind: EXT_BACKING_FORMAT, data: f.as_bytes().to_vec() });
    }
    if let Some(name) = &o.data_file {
        extensions.push(Extension { kind: EXT_DATA_FILE, data: name.as_bytes().to_vec() });
    }
    let volume = match &o.luks {
        Some((secret, iter_time)) => {
            let v = super::super::luks_format::format(secret, *iter_time)
                .map_err(|e| CreateError::Io { path: path.display().to_string(), source: e })?;
            let mut d = luks_off.to_be_bytes().to_vec();
            d.extend_from_slice(&(v.area.len() as u64).to_be_bytes());
            extensions.push(Extension { kind: EXT_CRYPTO, data: d });
            Some(v)
        }
        None => None,
    };
    if o.version == 3 {
        extensions.push(Extension { kind: EXT_FEATURE_NAMES, data: feature_name_table() });
    }
    let zstd = o.compression == Compression::Zstd;
    let data_bits = if o.data_file.is_some() { INCOMPAT_DATA_FILE } else { 0 }
        | if o.extended_l2 { INCOMPAT_EXTL2 } else { 0 };
    let header = Header {
        version: o.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: o.size,
        crypt_method: if volume.is_some() { 2 } else { 0 },
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: reftable_off,
        refcount_table_clusters: t as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: data_bits | if zstd { INCOMPAT_COMPRESSION } else { 0 },
        compatible: if o.lazy_refcounts { COMPAT_LAZY_REFCOUNTS } else { 0 },
        autoclear: if o.data_file_raw { AUTOCLEAR_DATA_FILE_RAW } else { 0 },
        refcount_order,
        header_length: if o.version == 3 { 112 } else { V2_HEADER_LEN },
        compression_type: u8::from(zstd),
        extra_fields: Vec::new(),
        extensions,
        backing_file: o.backing_file.clone(),
    };
    let mut first = vec![0u8; cs as usize];
    header.write_to(&mut first).map_err(|e| CreateError::Invalid(e.0))?;

    let io = |e| CreateError::Io { path: path.display().to_string(), source: e };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io)?;
    f.write_all_at(&first, 0).map_err(io)?;
    // Refcount table and blocks: every cluster of the layout has refcount 1.
    let mut table = vec![0u8; (t * cs) as usize];
    for bi in 0..b {
        table[(bi * 8) as usize..(bi * 8 + 8) as usize]
            .copy_from_slice(&(blocks_off + bi * cs).to_be_bytes());
        let mut block = vec![0u8; cs as usize];
        for j in 0..per {
            let c = bi * per + j;
            if c >= total_clusters {
                break;
            }
            set_refcount(&mut block, j as usize, refcount_order, 1);
        }
        f.write_all_at(&block, blocks_off + bi * cs).map_err(io)?;
    }
    f.write_all_at(&table, reftable_off).map_err(io)?;
    let mut l1 = vec![0u8; (l1_clusters * cs) as usize];
    if prealloc {
        let entries = g.l2_entries();
        for i in 0..l1_size {
            let table_off = l2_off + i * cs;
            set_be64_at(&mut l1, i as usize, table_off | OFLAG_COPIED);
            let mut l2 = vec![0u8; cs as usize];
            for j in 0..entries {
                let c = i * entries + j;
                if c >= o.size.div_ceil(cs) {
                    break;
                }
                let host = data_at.map_or(data_off + c * cs, |base| base + c * cs);
                let e = match o.backing_file {
                    // Reserved, every subcluster still reading from the backing file.
                    Some(_) => L2Entry::Sub { host: Some(host), copied: true, alloc: 0, zero: 0 },
                    None => L2Entry::Normal { host, copied: true },
                };
                set_l2_at(&mut l2, j as usize, &e, &g);
            }
            f.write_all_at(&l2, table_off).map_err(io)?;
        }
    }
    f.write_all_at(&l1, l1_off).map_err(io)?;
    if let Some(v) = &volume {
        f.write_all_at(&v.area, luks_off).map_err(io)?;
    }
    f.set_len(total_clusters * cs).map_err(io)?;
    f.sync_all().map_err(io)?;
    if let Some(name) = &o.data_file {
        let data = data_file_path(path, name);
        let dio = |e| CreateError::Io { path: data.display().to_string(), source: e };
        let d = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!o.data_file_raw)
            .open(&data)
            .map_err(dio)?;
        if !o.data_file_raw || d.metadata().map_err(dio)?.len() < o.size {
            d.set_len(o.size).map_err(dio)?;
        }
        d.sync_all().map_err(dio)?;
    }
    Ok(())
}

/// The data file named `name` in the image at `image`: relative names are relative to
/// the image's directory (as QEMU resolves them).
pub fn data_file_path(image: &Path, name: &str) -> std::path::PathBuf {
    match Path::new(name) {
        p if p.is_absolute() => p.to_path_buf(),
        p => image.parent().unwrap_or(Path::new(".")).join(p),
    }
}

fn check_data_file(o: &CreateOptions) -> Result<(), CreateError> {
    let Some(name) = &o.data_file else {
        return if o.data_file_raw { invalid("data_file_raw requires data_file") } else { Ok(()) };
    };
    if o.version != 3 {
        return invalid("data_file requires compat=1.1");
    }
    if name.is_empty() || name.len() > MAX_BACKING_NAME as usize || name.contains('\0') {
        return invalid(format!("data file name must be 1 to {MAX_BACKING_NAME} bytes, no NUL"));
    }
    if o.data_file_raw && o.backing_file.is_some() {
        return invalid("data_file_raw cannot be used with a backing file");
    }
    Ok(())
}
