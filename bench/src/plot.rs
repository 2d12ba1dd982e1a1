//! Grouped bar charts as plain SVG (no font or drawing library: text is left to the
//! viewer, so the output is the same on every machine).

use std::fmt::Write;

/// One bar: the median and, when there were several rounds, its range.
#[derive(Debug, Clone, Copy)]
pub struct Bar {
    pub value: f64,
    pub min: f64,
    pub max: f64,
}

/// A grouped bar chart: one group per category, one bar per series.
pub struct Chart<'a> {
    pub title: &'a str,
    /// Lines of small print under the chart (machine, tools, date).
    pub notes: Vec<String>,
    pub y_label: &'a str,
    pub categories: Vec<String>,
    /// Series names and colours.
    pub series: Vec<(String, &'static str)>,
    /// `values[category][series]`.
    pub values: Vec<Vec<Option<Bar>>>,
    /// Horizontal reference lines (value, label).
    pub reference: Vec<(f64, String)>,
    /// Print each bar's value above it.
    pub label_bars: bool,
}

pub const COLORS: [&str; 6] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#9467bd", "#d62728"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A "nice" tick step for an axis up to `max`.
fn nice_step(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_tick(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl Chart<'_> {
    /// Renders the chart as a standalone SVG document.
    pub fn svg(&self) -> String {
        let nc = self.categories.len().max(1);
        let ns = self.series.len().max(1);
        let bar_w = 16.0;
        let group_w = ns as f64 * bar_w + 26.0;
        let right = if self.reference.is_empty() { 30.0 } else { 90.0 };
        let (left, top) = (80.0, 70.0);
        let plot_w = (group_w * nc as f64).max(700.0);
        let plot_h = 360.0;
        let label_h = 170.0;
        let notes_h = 16.0 * self.notes.len() as f64 + 10.0;
        let width = left + plot_w + right;
        let height = top + plot_h + label_h + notes_h;
        let group_w = plot_w / nc as f64;
        let mut ymax = self
            .values
            .iter()
            .flatten()
            .flatten()
            .map(|b| b.max.max(b.value))
            .chain(self.reference.iter().map(|r| r.0))
            .fold(0.0, f64::max);
        if ymax <= 0.0 {
            ymax = 1.0;
        }
        let step = nice_step(ymax * 1.08);
        let ytop = (ymax * 1.08 / step).ceil() * step;
        let y = |v: f64| top + plot_h - (v / ytop).clamp(0.0, 1.0) * plot_h;

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="28" font-size="18" font-weight="bold">{}</text>"#,
            left,
            esc(self.title)
        );
        // Legend.
        let mut lx = left;
        for (i, (name, color)) in self.series.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<rect x="{lx:.1}" y="42" width="12" height="12" fill="{color}"/><text x="{:.1}" y="53" font-size="12">{}</text>"#,
                lx + 16.0,
                esc(name)
            );
            lx +=
                24.0 + 7.0 * name.len() as f64 + if i + 1 < self.series.len() { 10.0 } else { 0.0 };
        }
        // Grid and y axis.
        let mut t = 0.0;
        while t <= ytop + step * 0.01 {
            let yy = y(t);
            let _ = writeln!(
                s,
                r##"<line x1="{left:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
                left + plot_w,
                left - 6.0,
                yy + 4.0,
                fmt_tick(t)
            );
            t += step;
        }
        let _ = writeln!(
            s,
            r#"<text transform="translate(18 {:.1}) rotate(-90)" font-size="12" text-anchor="middle">{}</text>"#,
            top + plot_h / 2.0,
            esc(self.y_label)
        );
        // Bars.
        for (ci, row) in self.values.iter().enumerate() {
            let gx = left + ci as f64 * group_w + (group_w - ns as f64 * bar_w) / 2.0;
            for (si, bar) in row.iter().enumerate() {
                let Some(b) = bar else { continue };
                let color = self.series.get(si).map_or("#000", |s| s.1);
                let x = gx + si as f64 * bar_w;
                let (y0, y1) = (y(b.value), y(0.0));
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{}: {}</title></rect>"#,
                    x + 1.0,
                    bar_w - 2.0,
                    (y1 - y0).max(0.0),
                    esc(self.series.get(si).map_or("", |s| s.0.as_str())),
                    trim(b.value)
                );
                if b.max > b.min {
                    let cx = x + bar_w / 2.0;
                    let _ = writeln!(
                        s,
                        r#"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="black" stroke-width="1"/>"#,
                        y(b.min),
                        y(b.max)
                    );
                }
                if self.label_bars {
                    let _ = writeln!(
                        s,
                        r#"<text transform="translate({:.1} {:.1}) rotate(-90)" font-size="9">{}</text>"#,
                        x + bar_w / 2.0 + 3.0,
                        y(b.value.max(b.max)) - 3.0,
                        trim(b.value)
                    );
                }
            }
            let cx = left + (ci as f64 + 0.5) * group_w;
            let _ = writeln!(
                s,
                r#"<text transform="translate({cx:.1} {:.1}) rotate(-40)" font-size="11" text-anchor="end">{}</text>"#,
                top + plot_h + 14.0,
                esc(&self.categories[ci])
            );
        }
        // Reference lines.
        for (v, label) in &self.reference {
            let yy = y(*v);
            let _ = writeln!(
                s,
                r##"<line x1="{left:.1}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#d62728" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" font-size="10" fill="#d62728">{}</text>"##,
                left + plot_w,
                left + plot_w + 4.0,
                yy + 3.0,
                esc(label)
            );
        }
        // Axes.
        let _ = writeln!(
            s,
            r#"<line x1="{left:.1}" y1="{top:.1}" x2="{left:.1}" y2="{:.1}" stroke="black"/><line x1="{left:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
            top + plot_h,
            top + plot_h,
            left + plot_w,
            top + plot_h
        );
        for (i, n) in self.notes.iter().enumerate() {
            let _ = writeln!(
                s,
                r##"<text x="10" y="{:.1}" font-size="11" fill="#444">{}</text>"##,
                top + plot_h + label_h + 14.0 + 16.0 * i as f64,
                esc(n)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let c = Chart {
            title: "IOPS <test>",
            notes: vec!["machine & tools".into()],
            y_label: "IOPS",
            categories: vec!["a".into(), "b".into()],
            series: vec![("x".into(), COLORS[0]), ("y".into(), COLORS[1])],
            values: vec![
                vec![Some(Bar { value: 10.0, min: 9.0, max: 11.0 }), None],
                vec![
                    Some(Bar { value: 5.0, min: 5.0, max: 5.0 }),
                    Some(Bar { value: 7.0, min: 6.0, max: 8.0 }),
                ],
            ],
            reference: vec![(1.0, "1.0".into())],
            label_bars: true,
        };
        let s = c.svg();
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("IOPS &lt;test&gt;") && s.contains("machine &amp; tools"));
        assert_eq!(s.matches("<rect x=").count(), 2 + 3);
        assert_eq!(nice_step(60.0), 10.0);
    }
}
