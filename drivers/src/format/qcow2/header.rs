//! The qcow2 header: parsing with every check QEMU makes at open, each failing with a
//! message that names the field, and serialisation for image creation.
//!
//! An image is untrusted input: every offset and size is checked against the format's
//! limits and the file's size before anything is read through it.

use super::types::*;

/// A header extension, kept verbatim so unknown ones survive header rewrites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A parsed, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// Header bytes between the known fields and `header_length` (future fields).
    pub extra_fields: Vec<u8>,
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
}

/// A header problem, described for a human.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HeaderError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError(m.into()))
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl Header {
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            refcount_order: self.refcount_order,
            size: self.size,
            version: self.version,
            external_data: self.incompatible & INCOMPAT_DATA_FILE != 0,
            extended_l2: self.incompatible & INCOMPAT_EXTL2 != 0,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn compression(&self) -> Compression {
        if self.compression_type == 1 { Compression::Zstd } else { Compression::Zlib }
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }

    pub fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT).map(|d| String::from_utf8_lossy(d).into_owned())
    }

    /// The external data file's name (validated at parse), when the image has one.
    pub fn data_file(&self) -> Option<String> {
        if self.incompatible & INCOMPAT_DATA_FILE == 0 {
            return None;
        }
        self.extension(EXT_DATA_FILE).map(|d| String::from_utf8_lossy(d).into_owned())
    }

    /// Whether the data file is kept readable as a raw image (`data_file_raw`).
    pub fn data_file_raw(&self) -> bool {
        self.data_file().is_some() && self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions.iter().find(|e| e.kind == kind).map(|e| e.data.as_slice())
    }

    /// The name of feature `bit` of `kind` (0 incompatible, 1 compatible, 2 autoclear)
    /// from the image's feature-name table.
    pub fn feature_name(&self, kind: u8, bit: u8) -> Option<String> {
        let table = self.extension(EXT_FEATURE_NAMES)?;
        table.chunks_exact(48).find(|e| e[0] == kind && e[1] == bit).map(|e| {
            let name = &e[2..48];
            let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            String::from_utf8_lossy(&name[..end]).into_owned()
        })
    }

    /// Parses and validates a header from the image's first bytes (at least one
    /// cluster, or the whole file if shorter). `file_size` bounds every table.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header, HeaderError> {
        let h = Self::parse_any_crypt(buf, file_size)?;
        if h.crypt_method != 0 {
            return err(format!(
                "encrypted images (crypt_method {}) are not supported",
                h.crypt_method
            ));
        }
        Ok(h)
    }

    /// [`Header::parse`], accepting LUKS encryption (`crypt_method` 2; the legacy AES
    /// method 1 stays refused): for code that handles the encryption itself.
    pub fn parse_any_crypt(buf: &[u8], file_size: u64) -> Result<Header, HeaderError> {
        if buf.len() < V2_HEADER_LEN as usize {
            return err(format!("file too short for a qcow2 header ({} bytes)", buf.len()));
        }
        if be32(buf, 0) != MAGIC {
            return err("not a qcow2 image (bad magic)");
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return err(format!("unsupported qcow2 version {version} (2 and 3 are supported)"));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return err(format!(
                "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} \
                 (512 bytes to 2 MiB clusters)"
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            extra_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return err("file too short for a version 3 header");
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN || !h.header_length.is_multiple_of(8) {
                return err(format!(
                    "header_length {} must be at least {V3_HEADER_LEN} and a multiple of 8",
                    h.header_length
                ));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > buf.len() {
                return err(format!("header_length {} exceeds the first cluster", h.header_length));
            }
            if h.header_length > V3_HEADER_LEN {
                h.compression_type = buf[104];
                let known_end = 112.min(h.header_length as usize);
                if h.header_length as usize > known_end {
                    h.extra_fields = buf[known_end..h.header_length as usize].to_vec();
                }
            }
        }
        h.parse_extensions(buf, cluster_size)?;
        h.validate(file_size)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8], cluster_size: u64) -> Result<(), HeaderError> {
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        }
        .min(buf.len() as u64) as usize;
        let mut off = self.header_length as usize;
        loop {
            if off + 8 > end {
                // No explicit end marker before the limit: QEMU accepts this.
                break;
            }
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let data_end = off + 8 + len;
            if data_end > end {
                return err(format!(
                    "header extension {kind:#x} of {len} bytes runs past the header area"
                ));
            }
            if self.extensions.iter().any(|e| e.kind == kind) && kind != 0 {
                return err(format!("header extension {kind:#x} appears twice"));
            }
            self.extensions.push(Extension { kind, data: buf[off + 8..data_end].to_vec() });
            off = data_end.div_ceil(8) * 8;
        }
        if self.backing_file_offset != 0 {
            let start = self.backing_file_offset;
            let len = u64::from(self.backing_file_size);
            if len > u64::from(MAX_BACKING_NAME) || len == 0 {
                return err(format!(
                    "backing file name length {len} is outside 1..={MAX_BACKING_NAME}"
                ));
            }
            let end = match start.checked_add(len) {
                Some(e) if e <= cluster_size && e <= buf.len() as u64 => e,
                _ => return err("backing file name lies outside the first cluster"),
            };
            let raw = &buf[start as usize..end as usize];
            let name = std::str::from_utf8(raw)
                .map_err(|_| HeaderError("backing file name is not UTF-8".into()))?;
            if name.contains('\0') {
                return err("backing file name contains a NUL byte");
            }
            self.backing_file = Some(name.to_string());
        }
        Ok(())
    }

    /// Names of the unknown incompatible features set.
    fn unknown_incompatible(&self) -> Vec<String> {
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        (0..64u8)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| match self.feature_name(0, b) {
                Some(n) => format!("{n} (bit {b})"),
                None => format!("unknown feature bit {b}"),
            })
            .collect()
    }

    /// An external data file needs its name (UTF-8, no NUL, at most as long as a
    /// backing file name), no internal snapshots and, when raw, no backing file.
    fn validate_data_file(&self) -> Result<(), HeaderError> {
        let Some(name) = self.extension(EXT_DATA_FILE) else {
            return err("the external data file bit is set but no data file name is stored");
        };
        let ok = std::str::from_utf8(name).is_ok_and(|n| !n.is_empty() && !n.contains('\0'));
        if !ok || name.len() > MAX_BACKING_NAME as usize {
            return err(format!(
                "the data file name ({} bytes) is not 1 to {MAX_BACKING_NAME} bytes of UTF-8 \
                 without NUL",
                name.len()
            ));
        }
        if self.nb_snapshots > 0 {
            return err("an image with an external data file cannot hold internal snapshots");
        }
        if self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 && self.backing_file_offset != 0 {
            return err("a raw external data file (data_file_raw) cannot have a backing file");
        }
        Ok(())
    }

    fn validate(&self, file_size: u64) -> Result<(), HeaderError> {
        let g = self.geometry();
        let cs = g.cluster_size();
        let unknown = self.unknown_incompatible();
        if !unknown.is_empty() {
            return err(format!("unsupported incompatible features: {}", unknown.join(", ")));
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return err(format!(
                "refcount_order {} exceeds {MAX_REFCOUNT_ORDER}",
                self.refcount_order
            ));
        }
        if self.crypt_method != 0 && self.crypt_method != 2 {
            return err(format!(
                "encrypted images (crypt_method {}) are not supported",
                self.crypt_method
            ));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            self.validate_data_file()?;
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 && self.cluster_bits < MIN_EXTL2_CLUSTER_BITS {
            return err(format!(
                "extended L2 entries need clusters of at least {} bytes (subclusters of 512), not {cs}",
                1u64 << MIN_EXTL2_CLUSTER_BITS
            ));
        }
        let has_compression_bit = self.incompatible & INCOMPAT_COMPRESSION != 0;
        match (has_compression_bit, self.compression_type) {
            (false, 0) | (true, 1) => {}
            (true, 0) => return err("compression type bit set but compression_type is zlib (0)"),
            (false, t) => {
                return err(format!("compression_type {t} without the compression type bit"));
            }
            (true, t) => return err(format!("unknown compression_type {t}")),
        }
        let needed = g.l1_entries_needed();
        if u64::from(self.l1_size) < needed {
            return err(format!(
                "L1 table too small: {} entries for a virtual size of {} bytes needing {needed}",
                self.l1_size, self.size
            ));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return err(format!(
                "l1_size {} (an L1 table of {l1_bytes} bytes) exceeds the limit of {MAX_L1_BYTES} bytes (32 MiB, as QEMU)",
                self.l1_size
            ));
        }
        check_table("L1 table", self.l1_table_offset, l1_bytes, cs, file_size, self.l1_size > 0)?;
        if self.refcount_table_clusters == 0 {
            return err("refcount table has no clusters");
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return err(format!(
                "refcount_table_clusters {} (a refcount table of {rt_bytes} bytes) exceeds the limit of {MAX_REFTABLE_BYTES} bytes (8 MiB, as QEMU)",
                self.refcount_table_clusters
            ));
        }
        check_table("refcount table", self.refcount_table_offset, rt_bytes, cs, file_size, true)?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return err(format!(
                "{} snapshots exceed the limit of {MAX_SNAPSHOTS}",
                self.nb_snapshots
            ));
        }
        if self.nb_snapshots > 0 {
            check_table("snapshot table", self.snapshots_offset, 40, cs, file_size, true)?;
        }
        // Overlaps between the fixed structures.
        let ranges = [
            ("header", 0, cs),
            ("L1 table", self.l1_table_offset, l1_bytes.max(1)),
            ("refcount table", self.refcount_table_offset, rt_bytes),
        ];
        for i in 0..ranges.len() {
            for j in i + 1..ranges.len() {
                let (a, ao, al) = ranges[i];
                let (b, bo, bl) = ranges[j];
                if (i != 1 || self.l1_size > 0) && ao < bo + bl && bo < ao + al {
                    return err(format!("{a} overlaps the {b}"));
                }
            }
        }
        Ok(())
    }

    /// Serialises the header, its extensions (with a feature-name table for the
    /// features this implementation knows) and the backing file name into `cluster`.
    pub fn write_to(&self, cluster: &mut [u8]) -> Result<(), HeaderError> {
        cluster.fill(0);
        let b = cluster;
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        let mut off = V2_HEADER_LEN as usize;
        if self.version >= 3 {
            b[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > V3_HEADER_LEN {
                b[104] = self.compression_type;
                let end = self.header_length as usize;
                b[112.min(end)..end].copy_from_slice(&self.extra_fields[..end - 112.min(end)]);
            }
            off = self.header_length as usize;
        }
        for e in &self.extensions {
            let need = 8 + e.data.len().div_ceil(8) * 8;
            if off + need + 8 > b.len() {
                return err("header extensions do not fit in the first cluster");
            }
            b[off..off + 4].copy_from_slice(&e.kind.to_be_bytes());
            b[off + 4..off + 8].copy_from_slice(&(e.data.len() as u32).to_be_bytes());
            b[off + 8..off + 8 + e.data.len()].copy_from_slice(&e.data);
            off += need;
        }
        // End-of-extensions marker.
        off += 8;
        if let Some(name) = &self.backing_file {
            if off + name.len() > b.len() {
                return err("backing file name does not fit in the first cluster");
            }
            b[off..off + name.len()].copy_from_slice(name.as_bytes());
            b[8..16].copy_from_slice(&(off as u64).to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        Ok(())
    }
}

/// The feature-name table this implementation writes into new images.
pub fn feature_name_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut t = Vec::with_capacity(names.len() * 48);
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        t.extend_from_slice(&e);
    }
    t
}

fn check_table(
    what: &str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_size: u64,
    present: bool,
) -> Result<(), HeaderError> {
    if !present {
        return Ok(());
    }
    if !offset.is_multiple_of(cluster_size) {
        return err(format!("{what} offset {offset:#x} is not aligned to a cluster"));
    }
    if offset == 0 {
        return err(format!("{what} overlaps the header (offset 0)"));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= MAX_HOST_OFFSET => {
            if end > file_size.div_ceil(cluster_size) * cluster_size {
                return err(format!(
                    "{what} at {offset:#x} ({bytes} bytes) extends beyond the end of the file \
                     ({file_size} bytes): the image is truncated"
                ));
            }
            Ok(())
        }
        _ => err(format!("{what} offset {offset:#x} with {bytes} bytes is out of range")),
    }
}
