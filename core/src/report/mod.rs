//! `coordinator sweep report`: the figures a paper needs, as SVG and PNG, one self-contained
//! HTML page and a Markdown table, from a sweep's statistics and its per-seed curves.
//!
//! Figures: the score histogram with a density estimate and the mean, min and max marked; every
//! seed's per-epoch curve with the mean and the min-max band; the best-of-k curve; the variance
//! by source when the sweep's factors are crossed.

pub mod paper;
mod plot;

use crate::domain::Scored;
use crate::metric::Direction;
use crate::stats::outcomes::Outcomes;
use crate::stats::{self, SweepStats};
pub use plot::escape;
use plot::{Plot, padded};
use std::collections::BTreeMap;
use std::fmt::Write;

/// The font the figures are drawn with, so that PNGs have text on any host (DejaVu Sans; its
/// licence is `assets/DejaVuSans.LICENSE`).
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// One output file.
#[derive(Debug, Clone, PartialEq)]
pub struct File {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// What a report is made from.
pub struct Input<'a> {
    pub sweep_id: &'a str,
    pub sweep_name: &'a str,
    pub stats: &'a SweepStats,
    pub runs: &'a [Scored],
    /// (seed, epoch, value), by seed and epoch.
    pub curves: &'a [(i64, u32, f64)],
    /// What became of every seed (the statistics describe the converged ones).
    pub outcomes: &'a Outcomes,
}

const BLUE: &str = "#0072b2";
const RED: &str = "#d55e00";
const GREY: &str = "#555555";
const GREEN: &str = "#009e73";

/// How the report's SVGs are read for rasterising: with the built-in font (parsed once per
/// report, not per figure).
fn svg_options() -> resvg::usvg::Options<'static> {
    let mut opt = resvg::usvg::Options {
        font_family: "DejaVu Sans".into(),
        ..Default::default()
    };
    opt.fontdb_mut().load_font_data(FONT.to_vec());
    opt
}

/// Rasterises one of the report's SVGs at twice its size.
fn png(svg: &str, opt: &resvg::usvg::Options) -> anyhow::Result<Vec<u8>> {
    use resvg::{tiny_skia, usvg};
    let tree = usvg::Tree::from_str(svg, opt)?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width() * 2, size.height() * 2)
        .ok_or_else(|| anyhow::anyhow!("cannot allocate a {size:?} image"))?;
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(2.0, 2.0),
        &mut pixmap.as_mut(),
    );
    Ok(pixmap.encode_png()?)
}

/// The score histogram with a Gaussian kernel density estimate (Silverman's bandwidth) scaled
/// to counts, and the mean, min and max marked.
fn histogram(input: &Input) -> String {
    let s = &input.stats.summary;
    let metric = input.stats.metric.to_string();
    let values = stats::sorted(input.runs.iter().map(|r| r.value));
    let n = values.len() as f64;
    let iqr = s.q3 - s.q1;
    // Freedman-Diaconis bins, 8 to 60 of them.
    let bins = if iqr > 0.0 && s.gap > 0.0 {
        ((s.gap / (2.0 * iqr * n.powf(-1.0 / 3.0))).ceil() as usize).clamp(8, 60)
    } else {
        (n.sqrt().ceil() as usize).clamp(1, 60)
    };
    let (lo, hi) = if s.gap > 0.0 {
        (s.min, s.max)
    } else {
        padded(s.min, s.max, 0.5)
    };
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for v in &values {
        counts[(((v - lo) / width) as usize).min(bins - 1)] += 1;
    }
    let top = *counts.iter().max().unwrap_or(&1) as f64;
    let (x0, x1) = padded(lo, hi, 0.08);
    let mut p = Plot::new(
        &format!("{}: {metric} over {} seeds", input.sweep_name, s.n),
        &metric,
        "seeds",
        (x0, x1),
        (0.0, top * 1.15),
    );
    for (i, c) in counts.iter().enumerate() {
        let a = lo + i as f64 * width;
        p.rect(a, 0.0, a + width, *c as f64, "#9ecae1");
    }
    let spread = s.std.min(iqr / 1.34);
    let h = 0.9 * if spread > 0.0 { spread } else { s.std } * n.powf(-0.2);
    if h > 0.0 {
        // Binned above 5,000 seeds: 2,048 fine bins stand in for the scores.
        let fine: Vec<(f64, f64)> = if values.len() > 5000 {
            let k = 2048;
            let w = (hi - lo) / k as f64;
            let mut c = vec![0.0; k];
            for v in &values {
                c[(((v - lo) / w) as usize).min(k - 1)] += 1.0;
            }
            c.into_iter()
                .enumerate()
                .filter(|(_, c)| *c > 0.0)
                .map(|(i, c)| (lo + (i as f64 + 0.5) * w, c))
                .collect()
        } else {
            values.iter().map(|v| (*v, 1.0)).collect()
        };
        let norm = width / (h * (2.0 * std::f64::consts::PI).sqrt());
        let curve: Vec<(f64, f64)> = (0..=200)
            .map(|i| {
                let x = x0 + (x1 - x0) * i as f64 / 200.0;
                let d: f64 = fine
                    .iter()
                    .map(|(v, c)| c * (-0.5 * ((x - v) / h).powi(2)).exp())
                    .sum();
                (x, d * norm)
            })
            .collect();
        p.line(&curve, BLUE, 2.0, 1.0);
        p.legend(BLUE, "density estimate (scaled to seeds)");
    }
    p.legend("#9ecae1", "seeds per bin");
    p.marker(s.mean, "black", false, &format!("mean {:.4}", s.mean));
    let (min_seed, max_seed) = s.min_max_seeds();
    let (min_colour, max_colour) = match s.direction {
        Direction::Max => (RED, GREEN),
        Direction::Min => (GREEN, RED),
    };
    p.marker(
        s.min,
        min_colour,
        true,
        &format!("min {:.4} (seed {min_seed})", s.min),
    );
    p.marker(
        s.max,
        max_colour,
        true,
        &format!("max {:.4} (seed {max_seed})", s.max),
    );
    p.svg()
}

/// The most seed curves a report draws; past it, a sample ([`curve_sample`]).
pub const MAX_CURVES: usize = 300;

/// The seeds whose curves a report draws: None (every seed) up to [`MAX_CURVES`] runs, else
/// that many spread evenly over the runs ranked by score, the worst and the best among them, so
/// that the sample shows the whole distribution and its black swans.
pub fn curve_sample(runs: &[Scored]) -> Option<Vec<i64>> {
    if runs.len() <= MAX_CURVES {
        return None;
    }
    let mut ranked: Vec<&Scored> = runs.iter().collect();
    ranked.sort_by(|a, b| a.value.total_cmp(&b.value).then(a.seed.cmp(&b.seed)));
    let last = ranked.len() - 1;
    Some(
        (0..MAX_CURVES)
            .map(|i| ranked[i * last / (MAX_CURVES - 1)].seed)
            .collect(),
    )
}

/// The seeds' curves over epochs (a sample past [`MAX_CURVES`]), the interquartile and min-max
/// bands and the mean.
fn curves(input: &Input) -> Option<String> {
    let e = &input.stats.epochs;
    if e.is_empty() {
        return None;
    }
    let metric = input.stats.metric.to_string();
    let lo = e.iter().map(|x| x.min).fold(f64::INFINITY, f64::min);
    let hi = e.iter().map(|x| x.max).fold(f64::NEG_INFINITY, f64::max);
    let last = e.last().map_or(1, |x| x.epoch) as f64;
    let first = e.first().map_or(1, |x| x.epoch) as f64;
    let mut p = Plot::new(
        &format!("{}: {metric} per epoch", input.sweep_name),
        "epoch",
        &metric,
        padded(first, last, 0.02),
        padded(lo, hi, 0.05),
    );
    // Epochs are whole numbers: label only those.
    p.x_labels(
        plot::ticks(first, last, 8)
            .into_iter()
            .filter(|t| t.fract() == 0.0)
            .map(|t| (t, format!("{t:.0}")))
            .collect(),
    );
    let lower: Vec<(f64, f64)> = e.iter().map(|x| (x.epoch as f64, x.min)).collect();
    let upper: Vec<(f64, f64)> = e.iter().map(|x| (x.epoch as f64, x.max)).collect();
    p.band(&lower, &upper, BLUE, 0.15);
    let q1: Vec<(f64, f64)> = e.iter().map(|x| (x.epoch as f64, x.q1)).collect();
    let q3: Vec<(f64, f64)> = e.iter().map(|x| (x.epoch as f64, x.q3)).collect();
    p.band(&q1, &q3, BLUE, 0.3);
    let mut by_seed: BTreeMap<i64, Vec<(f64, f64)>> = BTreeMap::new();
    for (seed, epoch, v) in input.curves {
        by_seed.entry(*seed).or_default().push((*epoch as f64, *v));
    }
    let opacity = (3.0 / (by_seed.len() as f64).sqrt()).clamp(0.03, 0.6);
    for pts in by_seed.values() {
        p.line(pts, GREY, 0.8, opacity);
    }
    let mean: Vec<(f64, f64)> = e.iter().map(|x| (x.epoch as f64, x.mean)).collect();
    p.line(&mean, BLUE, 2.5, 1.0);
    p.legend(BLUE, "mean across seeds");
    p.legend("#a3bcdc", "interquartile band");
    p.legend("#c6d7ec", "min-max band");
    let seeds = input.stats.summary.n;
    if (by_seed.len() as u64) < seeds {
        p.legend(
            GREY,
            &format!(
                "a sample of {} of {seeds} seeds, spread over the scores",
                by_seed.len()
            ),
        );
    } else {
        p.legend(GREY, &format!("each of {} seeds", by_seed.len()));
    }
    Some(p.svg())
}

/// The expected best and worst of k seeds against k, on a log scale.
fn best_of_k(input: &Input) -> String {
    let s = &input.stats.summary;
    let values = stats::sorted(input.runs.iter().map(|r| r.value));
    let n = values.len();
    // About 60 k values spread evenly in log k.
    let mut ks: Vec<usize> = (0..=60)
        .map(|i| (n as f64).powf(i as f64 / 60.0).round() as usize)
        .filter(|k| (1..=n).contains(k))
        .collect();
    ks.dedup();
    let points: Vec<stats::describe::BestOfK> = ks
        .into_iter()
        .map(|k| stats::describe::best_of_k(&values, k, s.direction))
        .collect();
    let metric = input.stats.metric.to_string();
    let mut p = Plot::new(
        &format!("{}: expected best and worst of k seeds", input.sweep_name),
        "k (seeds tried)",
        &metric,
        (1.0, (n as f64).max(10.0)),
        padded(s.min, s.max, 0.05),
    )
    .log_x();
    let best: Vec<(f64, f64)> = points
        .iter()
        .map(|b| (b.k as f64, b.best_worst(s.direction).0))
        .collect();
    let worst: Vec<(f64, f64)> = points
        .iter()
        .map(|b| (b.k as f64, b.best_worst(s.direction).1))
        .collect();
    p.line(&best, GREEN, 2.5, 1.0);
    p.line(&worst, RED, 2.5, 1.0);
    p.line(
        &[(1.0, s.mean), ((n as f64).max(10.0), s.mean)],
        "black",
        1.2,
        1.0,
    );
    p.legend(GREEN, "expected best of k");
    p.legend(RED, "expected worst of k");
    p.legend("black", "mean");
    p.svg()
}

/// Each source's variance component with its 95% interval (an interval reaching past twice the
/// largest estimate is cut at the top of the plot).
fn variance(input: &Input) -> Option<String> {
    let c = input.stats.variance_components.as_ref()?;
    let largest = c.components.iter().map(|x| x.variance).fold(0.0, f64::max);
    let top = if largest > 0.0 { 2.0 * largest } else { 1.0 };
    let k = c.components.len() as f64;
    let mut p = Plot::new(
        &format!(
            "{}: variance of {} by source",
            input.sweep_name, input.stats.metric
        ),
        "source (share of the total)",
        "variance component",
        (0.0, k),
        (0.0, top),
    );
    for (i, x) in c.components.iter().enumerate() {
        let centre = i as f64 + 0.5;
        p.rect(centre - 0.3, 0.0, centre + 0.3, x.variance, "#9ecae1");
        if let Some(iv) = x.interval {
            p.line(&[(centre, iv.low), (centre, iv.high)], "black", 1.5, 1.0);
            p.line(
                &[(centre - 0.05, iv.low), (centre + 0.05, iv.low)],
                "black",
                1.5,
                1.0,
            );
            p.line(
                &[(centre - 0.05, iv.high), (centre + 0.05, iv.high)],
                "black",
                1.5,
                1.0,
            );
        }
    }
    p.x_labels(
        c.components
            .iter()
            .enumerate()
            .map(|(i, x)| {
                (
                    i as f64 + 0.5,
                    format!("{} ({:.0}%)", x.source, 100.0 * x.share),
                )
            })
            .collect(),
    );
    p.legend("#9ecae1", "estimate");
    p.legend("black", "95% interval");
    Some(p.svg())
}

/// A statistic for people: four decimals, or scientific notation for very small or large
/// values; rounding residue (the best of one seed minus the mean) reads as 0.
pub fn f(v: f64) -> String {
    if v.abs() < 1e-12 {
        "0.0000".into()
    } else if v.abs() < 1e-3 || v.abs() >= 1e5 {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// The Markdown table to paste into a paper.
fn markdown(input: &Input) -> String {
    let st = input.stats;
    let s = &st.summary;
    let inflation = |k: usize| {
        st.best_of_k
            .iter()
            .find(|b| b.k == k)
            .map_or("-".into(), |b| best_vs_mean(b, s.direction))
    };
    let (min_seed, max_seed) = s.min_max_seeds();
    let mut out = format!(
        "| sweep | metric | seeds | mean ± std | median | min (seed) | max (seed) | max - min | best of 5 vs mean | best of 10 vs mean |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {}{} | {} | {} ± {} | {} | {} ({}) | {} ({}) | {} | {} | {} |\n",
        input.sweep_name,
        st.metric,
        s.direction.note(),
        s.n,
        f(s.mean),
        f(s.std),
        f(s.median),
        f(s.min),
        min_seed,
        f(s.max),
        max_seed,
        f(s.gap),
        inflation(5),
        inflation(10),
    );
    if let Some(i) = &st.intervals {
        let _ = writeln!(
            out,
            "\n95% interval of the mean: [{}, {}] ({}); of the std: [{}, {}] ({}).",
            f(i.mean.low),
            f(i.mean.high),
            i.mean.method.as_str(),
            f(i.std.low),
            f(i.std.high),
            i.std.method.as_str()
        );
    }
    let o = input.outcomes;
    let _ = writeln!(
        out,
        "\nSeeds: {}. The statistics above are over the {} converged seeds.",
        o.line(),
        o.converged
    );
    if !o.diverged_seeds.is_empty() {
        out += "\n| diverged seed | in epoch | last finite value (epoch) |\n|---:|---:|---:|\n";
        for d in &o.diverged_seeds {
            let last = d
                .last_value
                .map_or("-".into(), |v| format!("{} ({})", f(v), d.epochs));
            let _ = writeln!(out, "| {} | {} | {last} |", d.seed, d.epoch);
        }
    }
    for c in &o.failure_causes {
        let _ = writeln!(out, "\nFailed ({} seeds): {}", c.seeds, c.cause);
    }
    out
}

/// E[best of k] - mean, signed: "+" when higher is better, "-" when lower is.
fn best_vs_mean(b: &stats::describe::BestOfK, direction: Direction) -> String {
    match direction {
        Direction::Max => format!("+{}", f(b.inflation)),
        Direction::Min => format!("-{}", f(b.inflation)),
    }
}

/// The report page's style, shared with the dashboard.
pub const STYLE: &str = r#"body{font-family:"DejaVu Sans",sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}
svg{max-width:100%;height:auto}"#;

/// The report's self-contained HTML page alone (no PNGs drawn).
pub fn page(input: &Input) -> String {
    html(input, &figures(input))
}

/// The self-contained page: tables and the figures inline.
fn html(input: &Input, figures: &[Figure]) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{name}: seed statistics</title>\n<style>{STYLE}</style>\n</head><body>\n<h1>{name}</h1>\n{body}<h2>Markdown</h2>\n<pre>{md}</pre>\n<p>Made by seedsweep (<code>coordinator sweep report</code>).</p>\n</body></html>\n",
        name = escape(input.sweep_name),
        body = body(input, figures, &|seed| seed.to_string()),
        md = escape(&markdown(input)),
    )
}

/// The report's tables and figures (HTML, no page around them), each seed named by `seed`
/// (plain, or a link). The summary row's cells carry `data-stat` names for machines.
pub fn body(input: &Input, figures: &[Figure], seed: &dyn Fn(i64) -> String) -> String {
    let st = input.stats;
    let s = &st.summary;
    let (min_seed, max_seed) = s.min_max_seeds();
    let mut h = format!(
        r#"<p>Sweep <code>{id}</code>, metric <code>{metric}</code>{lower}, {n} finished seeds.</p>
<table><tr><th>n</th><th>mean</th><th>std</th><th>median</th><th>q1</th><th>q3</th><th>min (seed)</th><th>max (seed)</th><th>max - min</th></tr>
<tr><td data-stat="n">{n}</td><td data-stat="mean">{mean}</td><td data-stat="std">{std}</td><td data-stat="median">{median}</td><td>{q1}</td><td>{q3}</td><td><span data-stat="min">{min}</span> ({ws})</td><td><span data-stat="max">{max}</span> ({bs})</td><td>{gap}</td></tr></table>
"#,
        id = escape(input.sweep_id),
        metric = st.metric,
        lower = s.direction.note(),
        n = s.n,
        mean = f(s.mean),
        std = f(s.std),
        median = f(s.median),
        q1 = f(s.q1),
        q3 = f(s.q3),
        min = f(s.min),
        ws = seed(min_seed),
        max = f(s.max),
        bs = seed(max_seed),
        gap = f(s.gap),
    );
    if let Some(i) = &st.intervals {
        let _ = writeln!(
            h,
            "<p>95% intervals: mean [{}, {}] ({}), std [{}, {}] ({}).</p>",
            f(i.mean.low),
            f(i.mean.high),
            i.mean.method.as_str(),
            f(i.std.low),
            f(i.std.high),
            i.std.method.as_str()
        );
    }
    if let Some(t) = &st.test_set {
        let _ = writeln!(
            h,
            "<p>Test set ({} examples, {} runs): binomial std {}, independent-errors std {}, distribution-wise std {}, split-half correlation {}.</p>",
            t.test_examples,
            t.runs,
            f(t.binomial_std),
            f(t.independent_errors_std),
            f(t.distribution_std),
            t.split_half_correlation.map_or("-".into(), f)
        );
    }
    outcomes_html(&mut h, input.outcomes, seed);
    h += "<h2>Black swans</h2>\n";
    if st.black_swans.is_empty() {
        h += "<p>None: no seed has |robust z| &gt; 3.5 or |z| &gt; 3.</p>\n";
    } else {
        h += "<table id=\"black-swans\"><tr><th>seed</th><th>score</th><th>side</th><th>luck</th><th>z</th><th>robust z</th><th>flagged by</th></tr>\n";
        for b in &st.black_swans {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>",
                seed(b.seed),
                f(b.score),
                b.side.as_str(),
                if b.lucky { "lucky" } else { "unlucky" },
                b.z,
                b.robust_z.map_or("-".into(), |r| format!("{r:.2}")),
                stats::describe::flags(&b.flagged_by).join(", ")
            );
        }
        h += "</table>\n";
    }
    for (_, caption, svg) in figures {
        let _ = writeln!(
            h,
            "<figure>{svg}<figcaption>{}</figcaption></figure>",
            escape(caption)
        );
    }
    h += "<h2>Best of k</h2>\n<table><tr><th>k</th><th>E[best]</th><th>E[worst]</th><th>E[best] - mean</th></tr>\n";
    for b in &st.best_of_k {
        let (best, worst) = b.best_worst(s.direction);
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            b.k,
            f(best),
            f(worst),
            best_vs_mean(b, s.direction)
        );
    }
    h += "</table>\n";
    if !st.epochs.is_empty() {
        h += "<h2>Per epoch</h2>\n<table><tr><th>epoch</th><th>n</th><th>mean</th><th>std</th><th>min</th><th>median</th><th>max</th></tr>\n";
        for e in &st.epochs {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                e.epoch,
                e.n,
                f(e.mean),
                f(e.std),
                f(e.min),
                f(e.median),
                f(e.max)
            );
        }
        h += "</table>\n";
    }
    h
}

/// The counts of every outcome, the diverged seeds (the blackest swans) and the failures' causes.
fn outcomes_html(h: &mut String, o: &Outcomes, seed: &dyn Fn(i64) -> String) {
    let _ = writeln!(
        h,
        "<p id=\"outcomes\">Seeds: {}. The statistics above are over the {} converged seeds.</p>",
        escape(&o.line()),
        o.converged
    );
    if !o.diverged_seeds.is_empty() {
        *h += "<table id=\"diverged\"><tr><th>diverged seed</th><th>in epoch</th><th>last finite value (epoch)</th></tr>\n";
        for d in &o.diverged_seeds {
            let last = d
                .last_value
                .map_or("-".into(), |v| format!("{} ({})", f(v), d.epochs));
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{last}</td></tr>",
                seed(d.seed),
                d.epoch
            );
        }
        *h += "</table>\n";
    }
    for c in &o.failure_causes {
        let _ = writeln!(h, "<p>Failed ({} seeds): {}</p>", c.seeds, escape(&c.cause));
    }
}

/// One figure: its file name (without extension), its caption and its SVG.
pub type Figure = (&'static str, &'static str, String);

/// The report's figures, as SVG: what `sweep report` writes and the dashboard shows.
pub fn figures(input: &Input) -> Vec<Figure> {
    let mut figures: Vec<Figure> = vec![(
        "histogram",
        "Scores over seeds: histogram, density estimate, mean, min and max.",
        histogram(input),
    )];
    if let Some(svg) = curves(input) {
        figures.push((
            "curves",
            "The seeds' per-epoch curves (past 300 seeds, a sample of 300 spread over the scores, the best and the worst included), the mean, the interquartile and the min-max bands.",
            svg,
        ));
    }
    figures.push((
        "best_of_k",
        "What reporting the best (or worst) of k seeds would claim.",
        best_of_k(input),
    ));
    if let Some(svg) = variance(input) {
        figures.push((
            "variance",
            "Variance by seed factor (random-effects ANOVA, 95% intervals).",
            svg,
        ));
    }
    figures
}

/// Every file of the report.
pub fn build(input: &Input) -> anyhow::Result<Vec<File>> {
    let figures = figures(input);
    let mut files = Vec::new();
    let opt = svg_options();
    for (name, _, svg) in &figures {
        files.push(File {
            name: format!("{name}.svg"),
            bytes: svg.clone().into_bytes(),
        });
        files.push(File {
            name: format!("{name}.png"),
            bytes: png(svg, &opt)?,
        });
    }
    files.push(File {
        name: "report.html".into(),
        bytes: html(input, &figures).into_bytes(),
    });
    files.push(File {
        name: "summary.md".into(),
        bytes: markdown(input).into_bytes(),
    });
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Metric;

    fn input_files(n: i64) -> Vec<File> {
        let runs: Vec<Scored> = (0..n)
            .map(|s| Scored {
                seed: s,
                factors: [s % 4, s / 4, 0, 0],
                value: 0.93 + 0.004 * ((s * 37 % 11) as f64 - 5.0) / 5.0
                    - if s == 3 { 0.05 } else { 0.0 },
            })
            .collect();
        let curves: Vec<(i64, u32, f64)> = runs
            .iter()
            .flat_map(|r| (1..=5).map(move |e| (r.seed, e, r.value - 0.05 * (5 - e) as f64)))
            .collect();
        let points: Vec<(u32, f64)> = curves.iter().map(|c| (c.1, c.2)).collect();
        let stats = stats::analyse(
            Metric::TestAccuracy,
            crate::metric::Direction::Max,
            &runs,
            stats::describe::epoch_spread(&points),
            None,
            None,
            &[],
        )
        .unwrap();
        build(&Input {
            sweep_id: "id",
            sweep_name: "demo <sweep>",
            stats: &stats,
            runs: &runs,
            curves: &curves,
            outcomes: &Outcomes::new(n as u64, vec![], vec![]),
        })
        .unwrap()
    }

    #[test]
    fn past_the_limit_the_curves_are_a_sample_spread_over_the_scores() {
        let runs = |n: i64| -> Vec<Scored> {
            (0..n)
                .map(|s| Scored {
                    seed: s,
                    factors: [s; 4],
                    // Scores in a scrambled order of the seeds.
                    value: ((s * 7919) % n) as f64,
                })
                .collect()
        };
        assert_eq!(curve_sample(&runs(MAX_CURVES as i64)), None);
        let many = runs(100_000);
        let sample = curve_sample(&many).unwrap();
        assert_eq!(sample.len(), MAX_CURVES);
        let score = |seed: i64| many[seed as usize].value;
        assert_eq!(score(sample[0]), 0.0, "the worst");
        assert_eq!(score(*sample.last().unwrap()), 99_999.0, "the best");
        let median = score(sample[MAX_CURVES / 2]);
        assert!((median - 50_000.0).abs() < 500.0, "{median}");
        let mut distinct = sample.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), MAX_CURVES);
    }

    #[test]
    fn writes_every_figure_as_svg_and_png_and_the_pages() {
        let files = input_files(16);
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        for want in [
            "histogram.svg",
            "histogram.png",
            "curves.svg",
            "curves.png",
            "best_of_k.svg",
            "best_of_k.png",
            "variance.svg",
            "variance.png",
            "report.html",
            "summary.md",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for f in &files {
            if f.name.ends_with(".png") {
                assert_eq!(&f.bytes[1..4], b"PNG", "{}", f.name);
                assert!(f.bytes.len() > 5_000, "{} is nearly empty", f.name);
            }
        }
        let html = String::from_utf8(
            files
                .iter()
                .find(|f| f.name == "report.html")
                .unwrap()
                .bytes
                .clone(),
        )
        .unwrap();
        assert!(
            html.contains("demo &lt;sweep&gt;")
                && html.contains("<svg")
                && html.contains("Black swans")
        );
        assert!(!html.contains("src=\"http"), "self-contained");
        let md = String::from_utf8(
            files
                .iter()
                .find(|f| f.name == "summary.md")
                .unwrap()
                .bytes
                .clone(),
        )
        .unwrap();
        assert!(md.starts_with("| sweep | metric | seeds |"), "{md}");
        let hist = String::from_utf8(files[0].bytes.clone()).unwrap();
        assert!(
            hist.contains("mean 0.9")
                && hist.contains(">test_accuracy</text>")
                && hist.contains(">seeds</text>")
        );
    }
}
