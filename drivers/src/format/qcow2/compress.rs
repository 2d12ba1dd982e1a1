//! Compression (for compressed writes) and decompression of compressed clusters: raw
//! deflate (zlib compression type, no zlib header) and zstd. A compressed cluster's
//! stored bytes may be followed by unrelated bytes (the tail of its last sector), so
//! decompression stops as soon as one cluster of output exists and ignores the rest
//! of the input. The contexts are made once per
//! layer and reset between clusters, so decompressing allocates nothing.

use flate2::{Decompress, FlushDecompress, Status};
use zstd::stream::raw::{Decoder, Operation};

use super::types::Compression;

pub(crate) struct Decompressor {
    kind: Compression,
    zlib: Decompress,
    zstd: Option<Decoder<'static>>,
}

impl Decompressor {
    pub(crate) fn new(kind: Compression) -> std::io::Result<Self> {
        let zstd = if kind == Compression::Zstd { Some(Decoder::new()?) } else { None };
        Ok(Decompressor { kind, zlib: Decompress::new(false), zstd })
    }

    /// The image's compression type.
    pub(crate) fn kind(&self) -> Compression {
        self.kind
    }

    /// Decompresses `input` into exactly `out.len()` bytes; false if the data is
    /// corrupt or too short.
    pub(crate) fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> bool {
        match self.kind {
            Compression::Zlib => {
                self.zlib.reset(false);
                match self.zlib.decompress(input, out, FlushDecompress::Finish) {
                    Ok(Status::StreamEnd) | Ok(Status::Ok) | Ok(Status::BufError) => {
                        self.zlib.total_out() == out.len() as u64
                    }
                    Err(_) => false,
                }
            }
            Compression::Zstd => {
                let Some(d) = self.zstd.as_mut() else { return false };
                if d.reinit().is_err() {
                    return false;
                }
                let (mut read, mut written) = (0usize, 0usize);
                while written < out.len() {
                    match d.run_on_buffers(&input[read..], &mut out[written..]) {
                        Ok(s) => {
                            if s.bytes_read == 0 && s.bytes_written == 0 {
                                return false;
                            }
                            read += s.bytes_read;
                            written += s.bytes_written;
                            if s.remaining == 0 && written < out.len() && read >= input.len() {
                                return false;
                            }
                        }
                        Err(_) => return false,
                    }
                }
                true
            }
        }
    }
}

/// Compression of whole clusters for compressed writes (a backup with `compress`):
/// raw deflate or zstd, as the image's header says. Its buffers are made on first use
/// and kept, so compressing allocates nothing after that.
pub(crate) struct Compressor {
    kind: Compression,
    zlib: flate2::Compress,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// The cluster gathered from the request's segments.
    pub(crate) input: Vec<u8>,
    /// The compressed bytes.
    pub(crate) out: Vec<u8>,
}

impl Compressor {
    pub(crate) fn new(kind: Compression, cluster_size: usize) -> std::io::Result<Self> {
        let zstd = match kind {
            Compression::Zstd => {
                Some(zstd::bulk::Compressor::new(zstd::DEFAULT_COMPRESSION_LEVEL)?)
            }
            Compression::Zlib => None,
        };
        Ok(Compressor {
            kind,
            zlib: flate2::Compress::new(flate2::Compression::default(), false),
            zstd,
            input: vec![0; cluster_size],
            out: vec![0; cluster_size],
        })
    }

    /// Compresses `input` into `out`; the compressed length, or `None` when it would
    /// not be smaller than the cluster (the cluster is then written plainly, as QEMU
    /// does).
    pub(crate) fn compress(&mut self) -> Option<usize> {
        let limit = self.input.len() - 1;
        let n = match self.kind {
            Compression::Zlib => {
                self.zlib.reset();
                let r = self.zlib.compress(
                    &self.input,
                    &mut self.out[..limit],
                    flate2::FlushCompress::Finish,
                );
                match r {
                    Ok(flate2::Status::StreamEnd) => self.zlib.total_out() as usize,
                    _ => return None,
                }
            }
            Compression::Zstd => {
                let z = self.zstd.as_mut()?;
                z.compress_to_buffer(&self.input, &mut self.out[..limit]).ok()?
            }
        };
        (n > 0 && n <= limit).then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_clusters_decompress_to_the_input() {
        for kind in [Compression::Zlib, Compression::Zstd] {
            let mut c = Compressor::new(kind, 65536).unwrap();
            for (i, b) in c.input.iter_mut().enumerate() {
                *b = (i / 100) as u8;
            }
            let n = c.compress().expect("compressible");
            assert!(n < 65536 / 4, "{kind:?}: {n}");
            let mut out = vec![0u8; 65536];
            let mut d = Decompressor::new(kind).unwrap();
            assert!(d.decompress(&c.out[..n], &mut out));
            assert_eq!(out, c.input);
            // Random bytes do not shrink: written plainly.
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for b in c.input.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            assert_eq!(c.compress(), None, "{kind:?}");
        }
    }

    #[test]
    fn zlib_and_zstd_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let mut z = vec![0u8; 70000];
        c.compress(&data, &mut z, flate2::FlushCompress::Finish).unwrap();
        z.truncate(c.total_out() as usize);
        z.extend_from_slice(&[0xAB; 300]);
        let mut out = vec![0u8; 65536];
        let mut d = Decompressor::new(Compression::Zlib).unwrap();
        assert!(d.decompress(&z, &mut out));
        assert_eq!(out, data);
        let mut s = zstd::bulk::compress(&data, 3).unwrap();
        s.extend_from_slice(&[0x17; 100]);
        let mut d = Decompressor::new(Compression::Zstd).unwrap();
        out.fill(0);
        assert!(d.decompress(&s, &mut out));
        assert_eq!(out, data);
        // Reused context, corrupt input.
        assert!(!d.decompress(&[1, 2, 3, 4], &mut out));
        assert!(d.decompress(&s, &mut out));
    }
}
