//! Byte sizes written as integers or as strings with a unit: `4096`, `"512KiB"`,
//! `"1G"` (binary multiples: K, M, G and T mean KiB, MiB, GiB and TiB).

use serde::{Deserialize, Deserializer};

/// A number of bytes from the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// Parses `123`, `4k`, `4KiB`, `1.5G` style sizes into bytes.
pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("`{s}`: unknown unit `{unit}`; use B, KiB, MiB, GiB or TiB")),
    };
    if num.is_empty() {
        return Err(format!("`{s}` is not a size such as 4096, \"64KiB\" or \"1GiB\""));
    }
    let bytes = if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| format!("`{s}` is not a number"))?;
        let b = v * (1u64 << shift) as f64;
        if !(0.0..=u64::MAX as f64).contains(&b) || b.fract() != 0.0 {
            return Err(format!("`{s}` is not a whole number of bytes"));
        }
        b as u64
    } else {
        let v: u64 = num.parse().map_err(|_| format!("`{s}` is too large"))?;
        v.checked_shl(shift)
            .filter(|r| r >> shift == v)
            .ok_or_else(|| format!("`{s}` is too large"))?
    };
    Ok(bytes)
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Int(u64),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Int(v) => Ok(ByteSize(v)),
            Either::Text(s) => parse_byte_size(&s).map(ByteSize).map_err(serde::de::Error::custom),
        }
    }
}
