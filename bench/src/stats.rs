//! Small summaries of per-round numbers.

use serde::Serialize;

/// Median and range of a set of per-round values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    /// `None` when there are no (finite) values.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Spread { median, min: v[0], max: v[n - 1], n })
    }

    /// `1.23 (1.10–1.30)`, or just the median for one value.
    pub fn ratio_text(&self) -> String {
        if self.n <= 1 || (self.max - self.min).abs() < 0.005 {
            format!("{:.2}", self.median)
        } else {
            format!("{:.2} ({:.2}–{:.2})", self.median, self.min, self.max)
        }
    }
}

/// IOPS for tables: `123.4k`, `1.23M`, `950`.
pub fn fmt_iops(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if x >= 1e3 {
        format!("{:.2}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Spread::of(&[1.0, 4.0]).unwrap().median, 2.5);
        assert!(Spread::of(&[f64::NAN]).is_none());
        assert_eq!(Spread::of(&[1.5]).unwrap().ratio_text(), "1.50");
        assert_eq!(s.ratio_text(), "2.00 (1.00–3.00)");
        assert_eq!(fmt_iops(123_456.0), "123.5k");
        assert_eq!(fmt_iops(2_500_000.0), "2.50M");
    }
}
