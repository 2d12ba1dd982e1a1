//! LUKS1 as qcow2 embeds it (`crypt_method = 2`): the header and key material sit in
//! clusters the full-disk-encryption header extension points at, and every data
//! sector is encrypted with the master key, the tweak being its sector number in the
//! file (the physical offset / 512), as qcow2.txt's "Data encryption" says.
//!
//! Opening a volume (the LUKS1 on-disk format, cryptsetup's `on-disk-format.pdf`):
//! 1. The 592-byte header names the cipher (`aes`; mode `xts-plain64`, QEMU's default,
//!    or `cbc-plain64`, `cbc-plain` or `cbc-essiv:sha256`, older volumes'), the hash of
//!    the key derivation (`sha1`, `sha256`, `sha512`), the master key's length, its
//!    PBKDF2 digest (salt, iterations) and eight key slots.
//! 2. For each active slot, PBKDF2(hash, secret, slot salt, slot iterations) gives a
//!    key that decrypts the slot's key material (sectors numbered from 0); the
//!    anti-forensic merge of its stripes (XOR and hash diffusion) gives a candidate
//!    master key.
//! 3. The candidate is the master key if its PBKDF2 digest matches the header's.
//!
//! Every primitive is RustCrypto's (`aes`, `xts-mode`, `cbc`, `pbkdf2`, `hmac`, `sha1`,
//! `sha2`); this module only lays out the bytes (and the IVs: the sector number, or for
//! ESSIV that number encrypted with AES-256 under SHA-256 of the key). Untrusted headers are bounded before
//! any work: key sizes of a known cipher, at most [`MAX_STRIPES`] stripes, at most
//! [`MAX_ITERATIONS`] PBKDF2 iterations, key material inside the encryption area.
//! Secrets and keys never reach a message: errors name the field, not the value.

use aes::cipher::block_padding::NoPadding;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes256};
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use xts_mode::{Xts128, get_tweak_default};

/// The LUKS1 magic.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of a LUKS1 header (the key slots included).
pub const HEADER_LEN: usize = 592;
/// Sector size of LUKS key material and of qcow2's encrypted data.
pub const SECTOR: usize = 512;
/// PBKDF2 iterations accepted in a slot or the digest: more would take minutes of CPU
/// at open (QEMU's default iteration time of 2 s gives a few million).
pub const MAX_ITERATIONS: u32 = 20_000_000;
/// Anti-forensic stripes accepted per slot (LUKS uses 4000).
pub const MAX_STRIPES: u32 = 16_384;
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
const SLOT_INACTIVE: u32 = 0x0000_dead;
const SLOTS: usize = 8;

/// A key (the secret that opens a key slot), kept out of every `Debug` output.
#[derive(Clone)]
pub struct Secret(pub std::sync::Arc<[u8]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a LUKS volume did not open.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    #[error("invalid LUKS header: {0}")]
    Invalid(String),
    #[error("LUKS: {0} is not supported")]
    Unsupported(String),
    #[error("the key does not open any LUKS key slot (wrong key, or corrupt key slots)")]
    WrongKey,
    #[error("reading the LUKS key material: {0}")]
    Io(#[from] std::io::Error),
}

fn invalid<T>(m: impl Into<String>) -> Result<T, LuksError> {
    Err(LuksError::Invalid(m.into()))
}

/// The hash of the key derivation and the anti-forensic diffusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha1,
    Sha256,
    Sha512,
}

impl Hash {
    fn parse(s: &str) -> Result<Hash, LuksError> {
        match s {
            "sha1" => Ok(Hash::Sha1),
            "sha256" => Ok(Hash::Sha256),
            "sha512" => Ok(Hash::Sha512),
            other => Err(LuksError::Unsupported(format!("hash {other:?}"))),
        }
    }

    fn len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
            Hash::Sha512 => 64,
        }
    }

    pub(crate) fn pbkdf2(self, secret: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        match self {
            Hash::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(secret, salt, rounds, out),
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(secret, salt, rounds, out),
            Hash::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(secret, salt, rounds, out),
        }
    }

    /// H(be32(i) || block), truncated to `out.len()`.
    fn block(self, i: u32, block: &[u8], out: &mut [u8]) {
        fn one<D: Digest>(i: u32, block: &[u8], out: &mut [u8]) {
            let d = D::new().chain_update(i.to_be_bytes()).chain_update(block).finalize();
            out.copy_from_slice(&d[..out.len()]);
        }
        match self {
            Hash::Sha1 => one::<Sha1>(i, block, out),
            Hash::Sha256 => one::<Sha256>(i, block, out),
            Hash::Sha512 => one::<Sha512>(i, block, out),
        }
    }

    /// The anti-forensic diffusion of `buf` in place, one digest-sized block at a time.
    pub(crate) fn diffuse(self, buf: &mut [u8]) {
        let mut out = [0u8; 64];
        for (i, chunk) in buf.chunks_mut(self.len()).enumerate() {
            let n = chunk.len();
            self.block(i as u32, chunk, &mut out[..n]);
            chunk.copy_from_slice(&out[..n]);
        }
    }
}

/// One active key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    pub index: usize,
    pub iterations: u32,
    pub salt: [u8; 32],
    /// Byte offset of the key material from the start of the LUKS header.
    pub material_offset: u64,
    pub stripes: u32,
}

/// A parsed, bounded LUKS1 header.
#[derive(Debug, Clone)]
pub struct Header {
    pub cipher: String,
    pub mode: Mode,
    pub hash: Hash,
    pub key_bytes: usize,
    pub mk_digest: [u8; 20],
    pub mk_salt: [u8; 32],
    pub mk_iterations: u32,
    pub uuid: String,
    pub slots: Vec<KeySlot>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A NUL-terminated ASCII field.
fn text(b: &[u8], what: &str) -> Result<String, LuksError> {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    match std::str::from_utf8(&b[..end]) {
        Ok(s) if s.is_ascii() => Ok(s.to_string()),
        _ => invalid(format!("{what} is not ASCII")),
    }
}

impl Header {
    /// Parses the header at the start of `b`; `area_len` bounds where key material may
    /// lie (the encryption area's length).
    pub fn parse(b: &[u8], area_len: u64) -> Result<Header, LuksError> {
        if b.len() < HEADER_LEN {
            return invalid(format!("{} bytes, shorter than a header ({HEADER_LEN})", b.len()));
        }
        if b[..6] != MAGIC {
            return invalid("bad magic");
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(LuksError::Unsupported(format!("LUKS version {version}")));
        }
        let cipher = text(&b[8..40], "cipher name")?;
        let mode = text(&b[40..72], "cipher mode")?;
        let hash = Hash::parse(&text(&b[72..104], "hash")?)?;
        let key_bytes = be32(b, 108) as usize;
        let Some(mode) = Mode::parse(&mode).filter(|_| cipher == "aes") else {
            return Err(LuksError::Unsupported(format!("cipher {cipher}-{mode}")));
        };
        if !mode.key_sizes().contains(&key_bytes) {
            return invalid(format!(
                "key size {key_bytes} bytes for aes-{} ({:?})",
                mode.name(),
                mode.key_sizes()
            ));
        }
        let mut h = Header {
            cipher,
            mode,
            hash,
            key_bytes,
            mk_digest: b[112..132].try_into().expect("20"),
            mk_salt: b[132..164].try_into().expect("32"),
            mk_iterations: bounded_iterations(be32(b, 164), "master key digest")?,
            uuid: text(&b[168..208], "uuid")?,
            slots: Vec::new(),
        };
        for i in 0..SLOTS {
            let s = &b[208 + i * 48..208 + (i + 1) * 48];
            match be32(s, 0) {
                SLOT_INACTIVE => continue,
                SLOT_ACTIVE => {}
                other => return invalid(format!("key slot {i} state {other:#x}")),
            }
            let slot = KeySlot {
                index: i,
                iterations: bounded_iterations(be32(s, 4), &format!("key slot {i}"))?,
                salt: s[8..40].try_into().expect("32"),
                material_offset: u64::from(be32(s, 40)) * SECTOR as u64,
                stripes: be32(s, 44),
            };
            if slot.stripes == 0 || slot.stripes > MAX_STRIPES {
                return invalid(format!(
                    "key slot {i} has {} stripes (1 to {MAX_STRIPES})",
                    slot.stripes
                ));
            }
            let len = h.material_len(&slot);
            if slot.material_offset < HEADER_LEN as u64 || slot.material_offset + len > area_len {
                return invalid(format!(
                    "key slot {i}'s key material ({len} bytes at {}) lies outside the \
                     encryption area ({area_len} bytes)",
                    slot.material_offset
                ));
            }
            h.slots.push(slot);
        }
        if h.slots.is_empty() {
            return invalid("no active key slot");
        }
        Ok(h)
    }

    /// Bytes of a slot's key material, whole sectors.
    pub fn material_len(&self, slot: &KeySlot) -> u64 {
        (self.key_bytes as u64 * u64::from(slot.stripes)).div_ceil(SECTOR as u64) * SECTOR as u64
    }

    /// Finds the master key with `secret`: tries every active slot; `read(off, buf)`
    /// reads the encryption area at `off`.
    pub fn unlock(
        &self,
        secret: &[u8],
        mut read: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<SectorCipher, LuksError> {
        let mut derived = vec![0u8; self.key_bytes];
        for slot in &self.slots {
            self.hash.pbkdf2(secret, &slot.salt, slot.iterations, &mut derived);
            let mut material = vec![0u8; self.material_len(slot) as usize];
            read(slot.material_offset, &mut material)?;
            SectorCipher::new(self.mode, &derived)?.decrypt(&mut material, 0);
            let split = &material[..self.key_bytes * slot.stripes as usize];
            let candidate = self.af_merge(split, slot.stripes as usize);
            let mut digest = [0u8; 20];
            self.hash.pbkdf2(&candidate, &self.mk_salt, self.mk_iterations, &mut digest);
            let differ = digest.iter().zip(&self.mk_digest).fold(0u8, |d, (a, b)| d | (a ^ b));
            if differ == 0 {
                return SectorCipher::new(self.mode, &candidate);
            }
        }
        Err(LuksError::WrongKey)
    }

    /// The anti-forensic merge: XOR each stripe in and diffuse, the last one only XORed.
    fn af_merge(&self, split: &[u8], stripes: usize) -> Vec<u8> {
        let n = self.key_bytes;
        let mut d = vec![0u8; n];
        for (i, stripe) in split.chunks_exact(n).enumerate() {
            d.iter_mut().zip(stripe).for_each(|(a, b)| *a ^= b);
            if i + 1 < stripes {
                self.hash.diffuse(&mut d);
            }
        }
        d
    }
}

fn bounded_iterations(n: u32, what: &str) -> Result<u32, LuksError> {
    if n == 0 || n > MAX_ITERATIONS {
        return invalid(format!("{what}: {n} PBKDF2 iterations (1 to {MAX_ITERATIONS})"));
    }
    Ok(n)
}

/// The sector modes of LUKS1 volumes QEMU makes and opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// XTS, the tweak the sector number (64 bits): QEMU's default.
    XtsPlain64,
    /// CBC, the IV the sector number (64 bits, or its low 32 bits for `plain`).
    CbcPlain64,
    CbcPlain,
    /// CBC, the IV the sector number encrypted with AES-256 keyed by SHA-256(key).
    CbcEssivSha256,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "xts-plain64" => Mode::XtsPlain64,
            "cbc-plain64" => Mode::CbcPlain64,
            "cbc-plain" => Mode::CbcPlain,
            "cbc-essiv:sha256" => Mode::CbcEssivSha256,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::XtsPlain64 => "xts-plain64",
            Mode::CbcPlain64 => "cbc-plain64",
            Mode::CbcPlain => "cbc-plain",
            Mode::CbcEssivSha256 => "cbc-essiv:sha256",
        }
    }

    /// Key bytes of AES-128 and AES-256 in this mode (XTS takes two keys).
    fn key_sizes(self) -> [usize; 2] {
        if self == Mode::XtsPlain64 { [32, 64] } else { [16, 32] }
    }
}

/// A volume's sector cipher over 512-byte sectors: the master key's, or a key slot's
/// (made once per open, shared).
#[allow(clippy::large_enum_variant)] // One per image, behind an Arc, never moved.
pub enum SectorCipher {
    Aes128(Xts128<Aes128>),
    Aes256(Xts128<Aes256>),
    Cbc128(Cbc<Aes128>),
    Cbc256(Cbc<Aes256>),
}

/// AES-CBC per sector, with its IV generator.
pub struct Cbc<C> {
    key: C,
    mode: Mode,
    /// ESSIV's cipher.
    essiv: Option<Aes256>,
}

impl<C: BlockCipher + BlockEncrypt + BlockDecrypt + Clone> Cbc<C> {
    fn new(key: C, mode: Mode, raw: &[u8]) -> Cbc<C> {
        let essiv = (mode == Mode::CbcEssivSha256)
            .then(|| Aes256::new_from_slice(&Sha256::digest(raw)).expect("a 32-byte key"));
        Cbc { key, mode, essiv }
    }

    /// The IV of sector `n`.
    fn iv(&self, n: u64) -> [u8; 16] {
        let n = if self.mode == Mode::CbcPlain { n & 0xffff_ffff } else { n };
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&n.to_le_bytes());
        if let Some(e) = &self.essiv {
            e.encrypt_block((&mut iv).into());
        }
        iv
    }

    fn crypt(&self, buf: &mut [u8], first: u64, encrypt: bool) {
        for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let iv = self.iv(first + i as u64);
            if encrypt {
                cbc::Encryptor::inner_iv_init(self.key.clone(), GenericArray::from_slice(&iv))
                    .encrypt_padded_mut::<NoPadding>(sector, SECTOR)
                    .expect("whole blocks");
            } else {
                cbc::Decryptor::inner_iv_init(self.key.clone(), GenericArray::from_slice(&iv))
                    .decrypt_padded_mut::<NoPadding>(sector)
                    .expect("whole blocks");
            }
        }
    }
}

impl SectorCipher {
    /// A cipher for `key` in `mode`: AES-128 or AES-256 by its length (twice that for
    /// XTS).
    pub fn new(mode: Mode, key: &[u8]) -> Result<SectorCipher, LuksError> {
        let bad = |_| LuksError::Invalid(format!("a {}-byte {} key", key.len(), mode.name()));
        if mode != Mode::XtsPlain64 {
            return Ok(match key.len() {
                16 => SectorCipher::Cbc128(Cbc::new(
                    Aes128::new_from_slice(key).map_err(bad)?,
                    mode,
                    key,
                )),
                32 => SectorCipher::Cbc256(Cbc::new(
                    Aes256::new_from_slice(key).map_err(bad)?,
                    mode,
                    key,
                )),
                n => return invalid(format!("a {n}-byte {} key", mode.name())),
            });
        }
        let (k1, k2) = key.split_at(key.len() / 2);
        Ok(match key.len() {
            32 => SectorCipher::Aes128(Xts128::new(
                Aes128::new_from_slice(k1).map_err(bad)?,
                Aes128::new_from_slice(k2).map_err(bad)?,
            )),
            64 => SectorCipher::Aes256(Xts128::new(
                Aes256::new_from_slice(k1).map_err(bad)?,
                Aes256::new_from_slice(k2).map_err(bad)?,
            )),
            n => return invalid(format!("a {n}-byte XTS key")),
        })
    }

    /// Encrypts whole sectors in place, the first being sector `first`.
    pub fn encrypt(&self, buf: &mut [u8], first: u64) {
        assert!(buf.len().is_multiple_of(SECTOR), "encryption of part of a sector");
        match self {
            SectorCipher::Aes128(x) => {
                x.encrypt_area(buf, SECTOR, u128::from(first), get_tweak_default)
            }
            SectorCipher::Aes256(x) => {
                x.encrypt_area(buf, SECTOR, u128::from(first), get_tweak_default)
            }
            SectorCipher::Cbc128(c) => c.crypt(buf, first, true),
            SectorCipher::Cbc256(c) => c.crypt(buf, first, true),
        }
    }

    /// Decrypts whole sectors in place, the first being sector `first`.
    pub fn decrypt(&self, buf: &mut [u8], first: u64) {
        assert!(buf.len().is_multiple_of(SECTOR), "decryption of part of a sector");
        match self {
            SectorCipher::Aes128(x) => {
                x.decrypt_area(buf, SECTOR, u128::from(first), get_tweak_default)
            }
            SectorCipher::Aes256(x) => {
                x.decrypt_area(buf, SECTOR, u128::from(first), get_tweak_default)
            }
            SectorCipher::Cbc128(c) => c.crypt(buf, first, false),
            SectorCipher::Cbc256(c) => c.crypt(buf, first, false),
        }
    }
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        let mode = match self {
            SectorCipher::Aes128(_) | SectorCipher::Aes256(_) => Mode::XtsPlain64,
            SectorCipher::Cbc128(c) => c.mode,
            SectorCipher::Cbc256(c) => c.mode,
        };
        write!(f, "SectorCipher(aes-{})", mode.name())
    }
}

/// Opens the LUKS volume of the qcow2 image `h` (read through `f`) with `secret`:
/// the encryption header extension's area, bounded by the file, its header parsed and
/// a key slot unlocked.
pub fn unlock_image(
    path: &std::path::Path,
    f: &dyn super::open::MetaIo,
    h: &super::header::Header,
    secret: &[u8],
) -> Result<SectorCipher, crate::error::OpenError> {
    use crate::error::OpenError;
    let bad = |m: String| OpenError::invalid(path, m);
    if h.crypt_method != 2 {
        return Err(bad(format!("crypt_method {} is not LUKS (2)", h.crypt_method)));
    }
    let Some(ext) = h.extension(super::types::EXT_CRYPTO) else {
        return Err(bad("a LUKS image without its encryption header extension".into()));
    };
    if ext.len() < 16 {
        return Err(bad(format!("the encryption header extension has {} bytes", ext.len())));
    }
    let off = u64::from_be_bytes(ext[..8].try_into().expect("8"));
    let len = u64::from_be_bytes(ext[8..16].try_into().expect("8"));
    let file_len = f.meta_len().map_err(|e| OpenError::io(path, e))?;
    if !off.is_multiple_of(h.cluster_size()) || off.checked_add(len).is_none_or(|e| e > file_len) {
        return Err(bad(format!(
            "the LUKS header area ({len} bytes at {off:#x}) is unaligned or past the end of the \
             file ({file_len} bytes)"
        )));
    }
    let mut first = vec![0u8; HEADER_LEN];
    super::open::read_exact_or_zero(f, &mut first, off).map_err(|e| OpenError::io(path, e))?;
    let luks = Header::parse(&first, len).map_err(|e| bad(e.to_string()))?;
    luks.unlock(secret, |at, buf| super::open::read_exact_or_zero(f, buf, off + at))
        .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    //! Against QEMU: images qemu-img encrypts open with their secret, data qemu-io wrote
    //! decrypts to what it wrote (the tweak being the physical sector), and wrong keys,
    //! corrupt key material and hostile headers are refused by name.

    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::*;
    use crate::format::qcow2::open::{MetaIo, read_at};

    const SECRET: &str = "hunter2";

    fn qemu_img_encrypted(dir: &Path, opts: &str) -> PathBuf {
        let p = dir.join("enc.qcow2");
        let o = format!("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10{opts}");
        // QEMU times its PBKDF2 by the thread's CPU time, which a loaded machine can
        // leave unmeasurable ("Unable to get accurate CPU usage"): tried again then.
        for attempt in 1.. {
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "--object"])
                .arg(format!("secret,id=s0,data={SECRET}"))
                .args(["-o", &o])
                .arg(&p)
                .arg("4M")
                .output()
                .expect("qemu-img (qemu-utils) runs");
            let err = String::from_utf8_lossy(&st.stderr);
            if st.status.success() {
                break;
            }
            assert!(attempt < 50 && err.contains("accurate CPU usage"), "qemu-img create: {err}");
            std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
        }
        let spec = format!("driver=qcow2,file.filename={},encrypt.key-secret=s0", p.display());
        let st = Command::new("qemu-io")
            .args(["--object", &format!("secret,id=s0,data={SECRET}"), "--image-opts", &spec])
            .args(["-c", "write -P 0x5a 0 64k", "-c", "write -P 0x3c 1M 4k"])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        p
    }

    fn header(f: &std::fs::File) -> crate::format::qcow2::header::Header {
        let len = f.meta_len().unwrap();
        let b = read_at(f, 0, 65536.min(len as usize)).unwrap();
        crate::format::qcow2::header::Header::parse_any_crypt(&b, len).unwrap()
    }

    /// The host offset of guest offset `guest` (an allocated cluster), from the tables.
    fn host_of(f: &std::fs::File, h: &crate::format::qcow2::header::Header, guest: u64) -> u64 {
        let g = h.geometry();
        let mask = 0x00ff_ffff_ffff_fe00u64;
        let l1i = guest >> (g.cluster_bits + g.l2_bits());
        let l1 = read_at(f, h.l1_table_offset + l1i * 8, 8).unwrap();
        let l2 = u64::from_be_bytes(l1.try_into().unwrap()) & mask;
        let l2i = (guest >> g.cluster_bits) & (g.l2_entries() - 1);
        let e = read_at(f, l2 + l2i * 8, 8).unwrap();
        (u64::from_be_bytes(e.try_into().unwrap()) & mask) + g.offset_in_cluster(guest)
    }

    #[test]
    fn qemu_encrypted_images_open_and_their_data_decrypts() {
        for opts in [
            "",
            ",encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1",
            ",cluster_size=4096",
            // The CBC modes of older volumes.
            ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
            ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.cipher-alg=aes-128",
            ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let p = qemu_img_encrypted(dir.path(), opts);
            let f = std::fs::File::open(&p).unwrap();
            let h = header(&f);
            let cipher = unlock_image(&p, &f, &h, SECRET.as_bytes()).unwrap();
            for (guest, len, byte) in [(0u64, 65536usize, 0x5au8), (1 << 20, 4096, 0x3c)] {
                let host = host_of(&f, &h, guest);
                let mut data = read_at(&f, host, len).unwrap();
                assert!(
                    !data.windows(16).any(|w| w == [byte; 16]),
                    "{opts}: plaintext in the file"
                );
                cipher.decrypt(&mut data, host / SECTOR as u64);
                assert!(data.iter().all(|b| *b == byte), "{opts}: decrypts at {guest:#x}");
                // And back: the appliance's encryption is QEMU's.
                let mut again = data.clone();
                cipher.encrypt(&mut again, host / SECTOR as u64);
                assert_eq!(again, read_at(&f, host, len).unwrap(), "{opts}");
            }
            let e = unlock_image(&p, &f, &h, b"hunter3").unwrap_err().to_string();
            assert!(e.contains("does not open any LUKS key slot"), "{e}");
            assert!(!e.contains("hunter"), "the key stays out of messages: {e}");
        }
    }

    /// Rewrites bytes of the LUKS area (at `at` from its start) and returns the error.
    fn damaged(at: u64, bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = qemu_img_encrypted(dir.path(), "");
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let h = header(&f);
        let ext = h.extension(crate::format::qcow2::types::EXT_CRYPTO).unwrap().to_vec();
        let off = u64::from_be_bytes(ext[..8].try_into().unwrap());
        f.meta_write(bytes, off + at).unwrap();
        let started = std::time::Instant::now();
        let e = unlock_image(&p, &f, &h, SECRET.as_bytes()).unwrap_err().to_string();
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "bounded: {e}");
        e
    }

    #[test]
    fn hostile_luks_headers_get_clear_errors() {
        // Absurd iteration counts (slot 0, then the digest), key size, stripes.
        let e = damaged(208 + 4, &u32::MAX.to_be_bytes());
        assert!(e.contains("key slot 0") && e.contains("PBKDF2 iterations"), "{e}");
        let e = damaged(164, &u32::MAX.to_be_bytes());
        assert!(e.contains("master key digest") && e.contains("iterations"), "{e}");
        let e = damaged(108, &4096u32.to_be_bytes());
        assert!(e.contains("key size 4096"), "{e}");
        let e = damaged(208 + 44, &u32::MAX.to_be_bytes());
        assert!(e.contains("stripes"), "{e}");
        // Key material past the area, a corrupt key slot, a bad magic, another cipher.
        let e = damaged(208 + 40, &(1u32 << 30).to_be_bytes());
        assert!(e.contains("outside the encryption area"), "{e}");
        let e = damaged(4096 + 100, &[0xff; 64]);
        assert!(e.contains("does not open any LUKS key slot"), "{e}");
        let e = damaged(0, b"XXXX");
        assert!(e.contains("bad magic"), "{e}");
        let e = damaged(8, b"twofish\0");
        assert!(e.contains("cipher twofish") && e.contains("not supported"), "{e}");
    }

    #[test]
    fn a_truncated_header_is_refused() {
        assert!(Header::parse(&[0u8; 100], 1 << 20).unwrap_err().to_string().contains("shorter"));
    }
}
