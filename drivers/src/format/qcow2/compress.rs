//! Decompression of compressed clusters: raw deflate (zlib compression type, no zlib
//! header) and zstd. A compressed cluster's stored bytes may be followed by unrelated
//! bytes (the tail of its last sector), so decompression stops as soon as one cluster
//! of output exists and ignores the rest of the input. The contexts are made once per
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

#[cfg(test)]
mod tests {
    use super::*;

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
