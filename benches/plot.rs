//! Plain SVG charts for the benchmarks (no plotting dependency): a line
//! chart on logarithmic axes and a grouped bar chart. `TPMSTATE_PLOT_DIR`
//! names where benchmarks write them (docs/plots holds the recorded ones).
#![allow(dead_code)]

use std::fmt::Write;
use std::path::PathBuf;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// Where to write a chart named `name`, if `TPMSTATE_PLOT_DIR` is set.
pub fn target(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("TPMSTATE_PLOT_DIR")?);
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join(name))
}

fn header(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>
"#,
        (LEFT + W - RIGHT) / 2.0
    );
}

/// A line chart of `series` (name, points (x, y)) on log2 x and log10 y
/// axes, x labelled by `x_label(x)`.
pub fn lines(
    title: &str,
    x_name: &str,
    y_name: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_label: impl Fn(f64) -> String,
) -> String {
    let all = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in all {
        x0 = x0.min(x.log2());
        x1 = x1.max(x.log2());
        y0 = y0.min(y.log10());
        y1 = y1.max(y.log10());
    }
    let (y0, y1) = (y0.floor(), y1.ceil().max(y0.floor() + 1.0));
    let px = |x: f64| LEFT + (x.log2() - x0) / (x1 - x0).max(1e-9) * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - (y.log10() - y0) / (y1 - y0) * (H - TOP - BOTTOM);
    let mut out = String::new();
    header(&mut out, title);
    let mut decade = y0;
    while decade <= y1 {
        let v = 10f64.powf(decade);
        let y = py(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
        decade += 1.0;
    }
    if let Some((_, points)) = series.first() {
        for (x, _) in points {
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                px(*x),
                H - BOTTOM + 18.0,
                x_label(*x)
            );
        }
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_name}</text>
<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{y_name}</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 14.0,
        H / 2.0,
        H / 2.0
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for (x, y) in points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                px(*x),
                py(*y)
            );
        }
        let ly = TOP + 20.0 + i as f64 * 20.0;
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="14" height="4" fill="{c}"/><text x="{}" y="{}">{name}</text>"#,
            W - RIGHT + 12.0,
            ly - 4.0,
            W - RIGHT + 32.0,
            ly
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A horizontal bar chart: one bar per (name, value).
pub fn bars(title: &str, unit: &str, rows: &[(String, f64)]) -> String {
    let max = rows.iter().map(|r| r.1).fold(0.0, f64::max).max(1e-9);
    let mut out = String::new();
    header(&mut out, title);
    let left = 250.0;
    let step = (H - TOP - 30.0) / rows.len().max(1) as f64;
    for (i, (name, v)) in rows.iter().enumerate() {
        let y = TOP + 10.0 + i as f64 * step;
        let w = v / max * (W - left - 90.0);
        let c = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{name}</text><rect x="{left}" y="{y}" width="{w:.1}" height="{}" fill="{c}"/><text x="{}" y="{}">{v:.0} {unit}</text>"#,
            left - 8.0,
            y + step * 0.45,
            step * 0.6,
            left + w + 6.0,
            y + step * 0.45
        );
    }
    out.push_str("</svg>\n");
    out
}
