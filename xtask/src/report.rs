//! What every benchmark measures, as rows `cargo xtask bench all` gathers into one
//! markdown table and one chart. Each benchmark module prints its own table when run
//! alone and returns its rows for `all`.

use std::path::Path;

use anyhow::Context as _;

/// The lowest and highest per-round ratio of `runs` to `base` (paired by round).
#[must_use]
pub fn ratio_range(runs: &[f64], base: &[f64]) -> (f64, f64) {
    runs.iter()
        .zip(base)
        .map(|(r, d)| r / d)
        .fold((f64::INFINITY, 0.0), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

/// A single benchmark's table cell: `median (ratio of medians, per-round range)`, the
/// median shown times `scale` (a unit change).
#[must_use]
pub fn cell(runs: &[f64], base: &[f64], scale: f64, unit: &str) -> String {
    let (lo, hi) = ratio_range(runs, base);
    let m = crate::bench::median(runs);
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    format!(
        "{:.0}{unit} ({:.2}x, {lo:.2}-{hi:.2})",
        m * scale,
        m / crate::bench::median(base)
    )
}

/// One measured path of one workload.
#[derive(Debug, Clone)]
pub struct Row {
    /// The workload, as the table's first column: `PG new conn/txn (pgbench -S -C -c 8)`.
    pub workload: String,
    /// The path measured: `direct`, `haproxy`, `nginx`, `pgbouncer transaction`,
    /// `broker`, `broker, reuse: session`, ...
    pub path: String,
    /// The median of the rounds, in `unit`.
    pub value: f64,
    /// `tps`, `req/s`, `MB/s`, `KiB`, `us`, ...
    pub unit: &'static str,
    /// `value` over the baseline's (direct) of the same workload, when the workload
    /// has one; `None` for the baseline itself and for absolute figures (memory).
    pub ratio: Option<f64>,
    /// The lowest and highest per-round ratio, when there were rounds.
    pub range: Option<(f64, f64)>,
    /// Whether a higher value is better (throughput) or worse (latency, memory).
    pub higher_is_better: bool,
    /// The target for this row, as text (`>= 0.95x`), if it has one.
    pub target: Option<String>,
}

impl Row {
    /// A baseline row (ratio 1 by definition, shown as `1.00x`).
    pub fn baseline(workload: &str, path: &str, value: f64, unit: &'static str) -> Row {
        Row {
            workload: workload.to_owned(),
            path: path.to_owned(),
            value,
            unit,
            ratio: None,
            range: None,
            higher_is_better: true,
            target: None,
        }
    }

    /// A row compared with its workload's baseline: the ratio of medians and the range
    /// of the per-round ratios (`runs` and `base` are the per-round values, paired).
    pub fn compared(
        workload: &str,
        path: &str,
        runs: &[f64],
        base: &[f64],
        unit: &'static str,
    ) -> Row {
        let value = crate::bench::median(runs);
        let b = crate::bench::median(base);
        let (lo, hi) = ratio_range(runs, base);
        Row {
            workload: workload.to_owned(),
            path: path.to_owned(),
            value,
            unit,
            ratio: (b > 0.0).then(|| value / b),
            range: (runs.len().min(base.len()) > 1).then_some((lo, hi)),
            higher_is_better: true,
            target: None,
        }
    }

    /// An absolute figure with no baseline (memory, per-connection cost).
    pub fn absolute(workload: &str, path: &str, value: f64, unit: &'static str) -> Row {
        Row {
            higher_is_better: false,
            ..Row::baseline(workload, path, value, unit)
        }
    }

    pub fn target(mut self, t: &str) -> Row {
        self.target = Some(t.to_owned());
        self
    }
}

/// The number of interleaved rounds every benchmark runs: `BENCH_ROUNDS`, default 3.
pub fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1)
}

impl Row {
    /// The ratio this row shows: its own, or 1 for a baseline.
    pub fn shown_ratio(&self) -> Option<f64> {
        match self.ratio {
            Some(r) => Some(r),
            // A baseline (direct) row: compared with itself.
            None if self.higher_is_better => Some(1.0),
            None => None,
        }
    }
}

/// A value as the table prints it: no decimals above 100, two below 10.
fn number(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One markdown table of `rows`: workload | path | value | ratio to direct | per-round
/// range | target; a workload's name only on its first row. `notes` follow as a list.
pub fn markdown(rows: &[Row], notes: &[String]) -> String {
    use std::fmt::Write as _;
    let mut s = String::from(
        "| workload | path | value | ratio to direct | per-round range | target |\n|---|---|---:|---:|---|---|\n",
    );
    let mut last = "";
    for r in rows {
        let workload = if r.workload == last {
            String::new()
        } else {
            r.workload.clone()
        };
        last = &r.workload;
        let ratio = match (r.ratio, r.shown_ratio()) {
            (Some(x), _) => format!("{x:.2}x"),
            (None, Some(_)) => "1.00x".to_owned(),
            (None, None) => "-".to_owned(),
        };
        let range = r
            .range
            .map_or_else(|| "-".to_owned(), |(lo, hi)| format!("{lo:.2}-{hi:.2}x"));
        let _ = writeln!(
            s,
            "| {workload} | {} | {} {} | {ratio} | {range} | {} |",
            r.path,
            number(r.value),
            r.unit,
            r.target.as_deref().unwrap_or("")
        );
    }
    if !notes.is_empty() {
        s.push('\n');
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// Where the chart's font comes from: DejaVu Sans (Debian's `fonts-dejavu-core`, which
/// `cargo xtask setup` installs), drawn by plotters' `ab_glyph` renderer, so drawing
/// text needs no fontconfig or FreeType.
const FONT_DIR: &str = "/usr/share/fonts/truetype/dejavu";

fn register_fonts() -> anyhow::Result<()> {
    use plotters::style::{FontStyle, register_font};
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    for (file, style) in [
        ("DejaVuSans.ttf", FontStyle::Normal),
        ("DejaVuSans-Bold.ttf", FontStyle::Bold),
    ] {
        let path = Path::new(FONT_DIR).join(file);
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (Debian package fonts-dejavu-core)",
                path.display()
            )
        })?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", style, bytes)
            .map_err(|_| anyhow::anyhow!("{} is not a font plotters can read", path.display()))?;
    }
    let _ = DONE.set(());
    Ok(())
}

/// A bar's colour: direct grey, the broker orange (its variants lighter), peers blue.
fn colour(path: &str) -> plotters::style::RGBColor {
    use plotters::style::RGBColor;
    if path == "direct" {
        RGBColor(150, 150, 150)
    } else if path == "broker" {
        RGBColor(222, 104, 20)
    } else if path.starts_with("broker") {
        RGBColor(243, 168, 100)
    } else {
        RGBColor(58, 108, 186)
    }
}

/// Draw `rows` that have a ratio to direct as one PNG at `out`: grouped horizontal bars
/// per workload on a logarithmic axis, a line at 1.0x, each bar labelled with its ratio
/// and value. Rows without a ratio (absolute figures) are left to the table.
pub fn chart(rows: &[Row], title: &str, out: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    register_fonts()?;
    let bars: Vec<(&Row, f64)> = rows
        .iter()
        .filter_map(|r| r.shown_ratio().filter(|x| *x > 0.0).map(|x| (r, x)))
        .collect();
    anyhow::ensure!(!bars.is_empty(), "no row has a ratio to chart");
    let workloads = {
        let mut w: Vec<&str> = Vec::new();
        for (r, _) in &bars {
            if !w.contains(&r.workload.as_str()) {
                w.push(&r.workload);
            }
        }
        w
    };
    // The axis: powers of ten around the smallest and largest ratio.
    let lo = bars.iter().map(|b| b.1).fold(f64::INFINITY, f64::min);
    let hi = bars.iter().map(|b| b.1).fold(0.0, f64::max);
    let min = 10f64.powf((lo.min(0.5) / 1.2).log10().floor());
    let max = [1.0, 2.0, 5.0]
        .iter()
        .flat_map(|m| (0..4).map(move |k| m * 10f64.powi(k)))
        .filter(|v| *v >= (hi * 1.25).max(2.0))
        .fold(f64::INFINITY, f64::min);

    let (heading, slot, gap) = (30i32, 22i32, 10i32);
    let (top, bottom) = (90i32, 60i32);
    let height = top + bottom + workloads.len() as i32 * (heading + gap) + bars.len() as i32 * slot;
    let (width, x0, x1) = (1720i32, 600i32, 1360i32);
    let x = |v: f64| {
        x0 + ((v.ln() - min.ln()) / (max.ln() - min.ln()) * f64::from(x1 - x0)).round() as i32
    };

    let root = BitMapBackend::new(out, (width as u32, height as u32)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e}", out.display());
    root.fill(&WHITE).map_err(e)?;
    let font = |size: f64, style: FontStyle, h: HPos| {
        TextStyle::from(("sans-serif", size, style).into_font()).pos(Pos::new(h, VPos::Center))
    };
    // Even sizes only: plotters' ab_glyph renderer truncates half a size towards zero
    // when it places each glyph, which shifts some glyphs a pixel at odd sizes.
    let normal = |size| font(size, FontStyle::Normal, HPos::Left);
    root.draw(&Text::new(
        title.to_owned(),
        (20, 28),
        font(24.0, FontStyle::Bold, HPos::Left),
    ))
    .map_err(e)?;
    root.draw(&Text::new(
        "ratio to direct (log scale; right of the 1.0x line: faster than direct), then the median value".to_owned(),
        (20, 58),
        normal(16.0),
    ))
    .map_err(e)?;

    // The legend, top right: what each colour is.
    let mut lx = width - 540;
    for (name, sample) in [
        ("direct", "direct"),
        ("peer (haproxy, nginx, pgbouncer)", "peer"),
        ("broker", "broker"),
        ("broker variant", "broker, x"),
    ] {
        root.draw(&Rectangle::new(
            [(lx, 21), (lx + 14, 35)],
            colour(sample).filled(),
        ))
        .map_err(e)?;
        root.draw(&Text::new(name.to_owned(), (lx + 20, 28), normal(14.0)))
            .map_err(e)?;
        lx += 20 + 16 + 7 * name.len() as i32;
    }

    // Grid and ticks: 1, 2, 5 per decade.
    let (plot_top, plot_bottom) = (top - 6, height - bottom + 6);
    let mut decade = min;
    while decade < max * 1.01 {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v < min * 0.999 || v > max * 1.001 {
                continue;
            }
            let xv = x(v);
            let style = if (v - 1.0).abs() < 1e-9 {
                BLACK.stroke_width(2)
            } else {
                RGBColor(215, 215, 215).stroke_width(1)
            };
            root.draw(&PathElement::new(
                vec![(xv, plot_top), (xv, plot_bottom)],
                style,
            ))
            .map_err(e)?;
            let label = format!("{}x", (v * 100.0).round() / 100.0);
            for y in [plot_top - 12, plot_bottom + 14] {
                root.draw(&Text::new(
                    label.clone(),
                    (xv, y),
                    font(14.0, FontStyle::Normal, HPos::Center),
                ))
                .map_err(e)?;
            }
        }
        decade *= 10.0;
    }

    let mut y = top;
    for w in &workloads {
        y += gap;
        root.draw(&Text::new(
            (*w).to_owned(),
            (20, y + heading / 2),
            font(18.0, FontStyle::Bold, HPos::Left),
        ))
        .map_err(e)?;
        y += heading;
        for (r, ratio) in bars.iter().filter(|(r, _)| r.workload == *w) {
            let mid = y + slot / 2;
            root.draw(&Text::new(
                r.path.clone(),
                (x0 - 12, mid),
                font(16.0, FontStyle::Normal, HPos::Right),
            ))
            .map_err(e)?;
            let end = x(*ratio).max(x0 + 2);
            root.draw(&Rectangle::new(
                [(x0, y + 3), (end, y + slot - 3)],
                colour(&r.path).filled(),
            ))
            .map_err(e)?;
            let worse = if r.higher_is_better {
                ""
            } else {
                " (lower is better)"
            };
            // The figures in columns right of the plot, clear of the bars and the grid.
            root.draw(&Text::new(
                format!("{ratio:.2}x"),
                (x1 + 80, mid),
                font(16.0, FontStyle::Bold, HPos::Right),
            ))
            .map_err(e)?;
            root.draw(&Text::new(
                format!("{} {}{worse}", number(r.value), r.unit),
                (x1 + 96, mid),
                normal(14.0),
            ))
            .map_err(e)?;
            y += slot;
        }
    }
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Row> {
        let w = "PG new conn/txn (pgbench -S -C -c 8)";
        vec![
            Row::baseline(w, "direct", 812.0, "tps"),
            Row::compared(w, "haproxy", &[700.0, 760.0], &[800.0, 820.0], "tps"),
            Row::compared(w, "broker", &[2300.0, 2500.0], &[800.0, 820.0], "tps").target(">= 2.5x"),
            Row::compared(
                w,
                "broker, reuse: session",
                &[21000.0, 23000.0],
                &[800.0, 820.0],
                "tps",
            ),
            Row::compared("HTTP keep-alive 1 KB", "direct", &[9.0], &[9.0], "req/s"),
            Row::compared("HTTP keep-alive 1 KB", "nginx", &[4.0], &[9.0], "req/s"),
            Row::absolute("Idle memory", "broker, 10,000 connections", 9.5, "KiB"),
        ]
    }

    #[test]
    fn the_table_has_one_row_per_path_and_the_notes() {
        let md = markdown(&sample(), &["MSSQL: not built".to_owned()]);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(
            lines[0],
            "| workload | path | value | ratio to direct | per-round range | target |"
        );
        assert_eq!(
            lines[2],
            "| PG new conn/txn (pgbench -S -C -c 8) | direct | 812 tps | 1.00x | - |  |"
        );
        // The workload is named once; the ratio is of medians, the range per round.
        assert_eq!(
            lines[4],
            "|  | broker | 2400 tps | 2.96x | 2.88-3.05x | >= 2.5x |"
        );
        assert!(md.contains("| Idle memory | broker, 10,000 connections | 9.50 KiB | - | - |  |"));
        assert!(md.ends_with("- MSSQL: not built\n"));
    }

    #[test]
    fn the_chart_is_a_png_with_text() {
        if !Path::new(FONT_DIR).join("DejaVuSans.ttf").exists() {
            eprintln!("skipped: no DejaVu font (cargo xtask setup installs fonts-dejavu-core)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("all.png");
        chart(&sample(), "cargo xtask bench all: test", &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // `BENCH_CHART_KEEP=path` keeps a copy to look at.
        if let Ok(keep) = std::env::var("BENCH_CHART_KEEP") {
            std::fs::copy(&png, keep).unwrap();
        }
    }
}
