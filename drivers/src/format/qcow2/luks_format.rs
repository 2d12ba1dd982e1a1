//! Making a new LUKS1 volume for `create -o encrypt.format=luks` (as qemu-img does):
//! aes-256-xts-plain64 with a random master key, sha256 PBKDF2, one active key slot
//! (slot 0) and the other seven laid out but inactive.
//!
//! The slot's PBKDF2 iterations come from a short measurement, so unlocking takes
//! about `iter_time` (QEMU's `encrypt.iter-time`, 2 s by default); the master key
//! digest gets an eighth of them (at least 1000), as cryptsetup does. The master key
//! is split into 4000 anti-forensic stripes (random stripes, the last one the key XOR
//! the diffused rest), encrypted with the slot key, sectors numbered from 0. Random
//! bytes come from the OS (`getrandom`).

use std::time::{Duration, Instant};

use super::luks::{HEADER_LEN, Hash, MAGIC, SECTOR, SectorCipher};

/// Bytes of the aes-256-xts master key.
const KEY_BYTES: usize = 64;
const STRIPES: u32 = 4000;
/// Key material areas are aligned to 4 KiB, as QEMU lays them out.
const ALIGN: u64 = 4096;
const SLOTS: u64 = 8;

/// A new volume: the bytes of its area (header and key material; write them at the
/// start of the area) and the master key's cipher.
pub struct NewVolume {
    pub area: Vec<u8>,
}

fn random(buf: &mut [u8]) -> std::io::Result<()> {
    getrandom::fill(buf).map_err(|e| std::io::Error::other(format!("random bytes: {e}")))
}

/// Bytes of one slot's key material, rounded to the alignment.
fn material_stride() -> u64 {
    (KEY_BYTES as u64 * u64::from(STRIPES)).div_ceil(ALIGN) * ALIGN
}

/// Bytes of the whole area: the header's 4 KiB and eight key material areas.
pub fn area_len() -> u64 {
    ALIGN + SLOTS * material_stride()
}

/// PBKDF2-SHA256 iterations that take about `iter_time` here (at least 1000).
fn iterations_for(iter_time: Duration) -> u32 {
    let probe = 20_000u32;
    let mut out = [0u8; KEY_BYTES];
    let t = Instant::now();
    Hash::Sha256.pbkdf2(b"probe", &[0u8; 32], probe, &mut out);
    let per_sec = f64::from(probe) / t.elapsed().as_secs_f64().max(1e-6);
    let n = per_sec * iter_time.as_secs_f64();
    (n as u32).clamp(1000, super::luks::MAX_ITERATIONS)
}

/// Formats a volume whose slot 0 opens with `secret`.
pub fn format(secret: &[u8], iter_time: Duration) -> std::io::Result<NewVolume> {
    let mut mk = [0u8; KEY_BYTES];
    random(&mut mk)?;
    let slot_iters = iterations_for(iter_time);
    let mk_iters = (slot_iters / 8).max(1000);
    let (mut mk_salt, mut slot_salt, mut uuid) = ([0u8; 32], [0u8; 32], [0u8; 16]);
    random(&mut mk_salt)?;
    random(&mut slot_salt)?;
    random(&mut uuid)?;
    let mut mk_digest = [0u8; 20];
    Hash::Sha256.pbkdf2(&mk, &mk_salt, mk_iters, &mut mk_digest);

    let mut area = vec![0u8; area_len() as usize];
    let h = &mut area[..HEADER_LEN];
    h[..6].copy_from_slice(&MAGIC);
    h[6..8].copy_from_slice(&1u16.to_be_bytes());
    h[8..11].copy_from_slice(b"aes");
    h[40..51].copy_from_slice(b"xts-plain64");
    h[72..78].copy_from_slice(b"sha256");
    h[104..108].copy_from_slice(&((area_len() / SECTOR as u64) as u32).to_be_bytes());
    h[108..112].copy_from_slice(&(KEY_BYTES as u32).to_be_bytes());
    h[112..132].copy_from_slice(&mk_digest);
    h[132..164].copy_from_slice(&mk_salt);
    h[164..168].copy_from_slice(&mk_iters.to_be_bytes());
    h[168..204].copy_from_slice(uuid_text(&uuid).as_bytes());
    for i in 0..SLOTS as usize {
        let s = &mut h[208 + i * 48..208 + (i + 1) * 48];
        let offset = ALIGN + i as u64 * material_stride();
        let state: u32 = if i == 0 { 0x00ac_71f3 } else { 0x0000_dead };
        s[..4].copy_from_slice(&state.to_be_bytes());
        if i == 0 {
            s[4..8].copy_from_slice(&slot_iters.to_be_bytes());
            s[8..40].copy_from_slice(&slot_salt);
        }
        s[40..44].copy_from_slice(&((offset / SECTOR as u64) as u32).to_be_bytes());
        s[44..48].copy_from_slice(&STRIPES.to_be_bytes());
    }
    // Slot 0's key material: the split master key, encrypted with the slot key.
    let len = KEY_BYTES * STRIPES as usize;
    let material = &mut area[ALIGN as usize..ALIGN as usize + len];
    af_split(&mk, material)?;
    let mut slot_key = [0u8; KEY_BYTES];
    Hash::Sha256.pbkdf2(secret, &slot_salt, slot_iters, &mut slot_key);
    SectorCipher::new(super::luks::Mode::XtsPlain64, &slot_key)
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .encrypt(material, 0);
    Ok(NewVolume { area })
}

/// Splits `mk` into `out` (stripes of its length): random stripes, then the last
/// one such that the merge (XOR and diffuse each in turn) gives `mk` back.
fn af_split(mk: &[u8], out: &mut [u8]) -> std::io::Result<()> {
    let n = mk.len();
    let stripes = out.len() / n;
    random(&mut out[..(stripes - 1) * n])?;
    let mut d = vec![0u8; n];
    for stripe in out[..(stripes - 1) * n].chunks_exact(n) {
        d.iter_mut().zip(stripe).for_each(|(a, b)| *a ^= b);
        Hash::Sha256.diffuse(&mut d);
    }
    let last = &mut out[(stripes - 1) * n..];
    for ((o, a), b) in last.iter_mut().zip(&d).zip(mk) {
        *o = a ^ b;
    }
    Ok(())
}

/// A random (version 4) UUID as text.
fn uuid_text(b: &[u8; 16]) -> String {
    let mut b = *b;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::qcow2::luks::Header;

    #[test]
    fn a_new_volume_opens_with_its_secret_only() {
        let v = format(b"s3cret", Duration::from_millis(5)).unwrap();
        let h = Header::parse(&v.area, v.area.len() as u64).unwrap();
        assert_eq!((h.key_bytes, h.slots.len()), (64, 1));
        let read = |at: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&v.area[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        h.unlock(b"s3cret", read).unwrap();
        assert!(matches!(h.unlock(b"secret", read), Err(super::super::luks::LuksError::WrongKey)));
    }
}
