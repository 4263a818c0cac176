//! Line charts as self-contained SVG (no scripts, no external resources).

use std::fmt::Write;

pub const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

impl Series {
    pub fn new(name: &str, color: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            color: color.into(),
            points,
            dashed: false,
        }
    }

    pub fn dashed(mut self) -> Series {
        self.dashed = true;
        self
    }
}

#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Logarithmic y axis (values <= 0 are drawn at the bottom).
    pub log_y: bool,
    /// Fixed x ticks (position, label) instead of computed ones.
    pub x_ticks: Option<Vec<(f64, String)>>,
    /// Labelled points drawn over the lines.
    pub markers: Vec<(f64, f64, String)>,
    /// Vertical lines with a label (phase boundaries).
    pub vlines: Vec<(f64, String)>,
}

const W: f64 = 760.0;
const H: f64 = 300.0;
const ML: f64 = 72.0;
const MR: f64 = 16.0;
const MT: f64 = 34.0;
const MB: f64 = 48.0;

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// About `n` round tick values covering [lo, hi].
pub fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if !lo.is_finite() || !hi.is_finite() || hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut out = Vec::new();
    let mut v = first;
    while v <= hi + step * 1e-9 && out.len() < 100 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

/// A compact label: 1 200 000 -> "1.2M", 0.25 -> "0.25".
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if a >= 1e9 {
        format!("{}G", trim(format!("{:.2}", v / 1e9)))
    } else if a >= 1e6 {
        format!("{}M", trim(format!("{:.2}", v / 1e6)))
    } else if a >= 1e4 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        trim(format!("{v:.2}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

pub fn render(c: &Chart) -> String {
    let pts = c.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.clone() {
        if !x.is_finite() || !y.is_finite() {
            continue;
        }
        x0 = x0.min(x);
        x1 = x1.max(x);
        if !c.log_y || y > 0.0 {
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if let Some(t) = &c.x_ticks {
        for (x, _) in t {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
        }
    }
    let empty = x0 > x1;
    if empty {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y0 > y1 {
        (y0, y1) = (0.0, 1.0);
    }
    let (ly0, ly1, y_ticks): (f64, f64, Vec<f64>) = if c.log_y {
        let a = y0.max(1e-6).log10().floor();
        let b = y1.max(1e-6).log10().ceil().max(a + 1.0);
        let ticks = (a as i32..=b as i32).map(|e| 10f64.powi(e)).collect();
        (a, b, ticks)
    } else {
        let lo = y0.min(0.0);
        let hi = if y1 <= lo { lo + 1.0 } else { y1 * 1.05 };
        let ticks = nice_ticks(lo, hi, 5);
        let hi = ticks.last().copied().unwrap_or(hi).max(hi);
        (lo, hi, ticks)
    };
    let pw = W - ML - MR;
    let ph = H - MT - MB;
    let sx = |x: f64| ML + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| {
        let v = if c.log_y {
            if y <= 0.0 { ly0 } else { y.log10() }
        } else {
            y
        };
        MT + ph - ((v - ly0) / (ly1 - ly0)).clamp(-0.02, 1.02) * ph
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r##"<rect x="0" y="0" width="{W}" height="{H}" fill="#fff"/><text x="{}" y="18" font-size="14" font-weight="bold">{}</text>"##,
        ML,
        escape(&c.title)
    );
    // Grid and y ticks.
    for &t in &y_ticks {
        let y = sy(t);
        let _ = write!(
            s,
            r##"<line x1="{ML}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            ML + pw,
            ML - 6.0,
            y + 4.0,
            fmt_num(t)
        );
    }
    let x_ticks: Vec<(f64, String)> = match &c.x_ticks {
        Some(t) => t.clone(),
        None => nice_ticks(x0, x1, 8)
            .into_iter()
            .map(|v| (v, fmt_num(v)))
            .collect(),
    };
    for (t, label) in &x_ticks {
        let x = sx(*t);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{MT}" y2="{}" stroke="#f0f0f0"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            MT + ph,
            MT + ph + 16.0,
            escape(label)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="#888"/><text x="{}" y="{}" text-anchor="middle">{}</text><text transform="translate(14,{}) rotate(-90)" text-anchor="middle">{}</text>"##,
        ML + pw / 2.0,
        H - 8.0,
        escape(&c.x_label),
        MT + ph / 2.0,
        escape(&c.y_label)
    );
    for (x, label) in &c.vlines {
        if *x < x0 || *x > x1 {
            continue;
        }
        let px = sx(*x);
        let _ = write!(
            s,
            r##"<line x1="{px:.1}" x2="{px:.1}" y1="{MT}" y2="{}" stroke="#999" stroke-dasharray="3,3"/><text x="{:.1}" y="{}" fill="#666">{}</text>"##,
            MT + ph,
            px + 3.0,
            MT + 11.0,
            escape(label)
        );
    }
    for se in &c.series {
        let mut d = String::new();
        for (i, &(x, y)) in se
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .enumerate()
        {
            let _ = write!(
                d,
                "{}{:.1},{:.1}",
                if i == 0 { "M" } else { " L" },
                sx(x),
                sy(y)
            );
        }
        if d.is_empty() {
            continue;
        }
        let dash = if se.dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<path d="{d}" fill="none" stroke="{}" stroke-width="1.8"{dash}/>"#,
            escape(&se.color)
        );
        if se.points.len() == 1 {
            let (x, y) = se.points[0];
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                sx(x),
                sy(y),
                escape(&se.color)
            );
        }
    }
    for (x, y, label) in &c.markers {
        // Labels near the right edge go to the left of their point.
        let right = sx(*x) > ML + pw * 0.8;
        let _ = write!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#000"/><text x="{:.1}" y="{:.1}" font-size="10"{}>{}</text>"##,
            sx(*x),
            sy(*y),
            if right { sx(*x) - 5.0 } else { sx(*x) + 5.0 },
            sy(*y) + if right { 12.0 } else { -5.0 },
            if right { r#" text-anchor="end""# } else { "" },
            escape(label)
        );
    }
    // Legend, top right.
    let mut lx = ML + pw - 8.0;
    for se in c.series.iter().rev() {
        let w = 24.0 + 6.5 * se.name.chars().count() as f64;
        lx -= w;
        let _ = write!(
            s,
            r#"<line x1="{lx:.1}" x2="{:.1}" y1="{}" y2="{}" stroke="{}" stroke-width="2"/><text x="{:.1}" y="{}">{}</text>"#,
            lx + 16.0,
            MT - 8.0,
            MT - 8.0,
            escape(&se.color),
            lx + 19.0,
            MT - 4.0,
            escape(&se.name)
        );
    }
    if empty {
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#999">no data</text>"##,
            ML + pw / 2.0,
            MT + ph / 2.0
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        assert_eq!(
            nice_ticks(0.0, 1.0e6, 4),
            vec![0.0, 250e3, 500e3, 750e3, 1e6]
        );
        assert_eq!(nice_ticks(5.0, 5.0, 5), vec![5.0]);
    }

    #[test]
    fn numbers_are_compact() {
        assert_eq!(fmt_num(1_200_000.0), "1.2M");
        assert_eq!(fmt_num(25_000.0), "25k");
        assert_eq!(fmt_num(250.0), "250");
        assert_eq!(fmt_num(2.5), "2.5");
        assert_eq!(fmt_num(0.125), "0.125");
        assert_eq!(fmt_num(0.0), "0");
    }

    #[test]
    fn renders_well_formed_svg() {
        let c = Chart {
            title: "Latency <p99> & co".into(),
            x_label: "t (s)".into(),
            y_label: "ms".into(),
            series: vec![
                Series::new("p50", COLORS[0], vec![(0.0, 1.0), (1.0, 2.0), (2.0, 1.5)]),
                Series::new("p99", COLORS[1], vec![(0.0, 3.0), (1.0, 30.0)]).dashed(),
            ],
            log_y: true,
            markers: vec![(1.0, 30.0, "max".into())],
            vlines: vec![(0.5, "start".into())],
            ..Default::default()
        };
        let svg = render(&c);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("Latency &lt;p99&gt; &amp; co"));
        assert_eq!(svg.matches("<path").count(), 2);
        assert!(svg.contains("stroke-dasharray=\"6,4\""));
        assert!(!svg.contains("NaN"));
        let empty = render(&Chart::default());
        assert!(empty.contains("no data"));
        assert!(!empty.contains("NaN") && !empty.contains("inf"));
    }
}
