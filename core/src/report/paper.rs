//! The paper's table (`coordinator sweep paper`): per sweep n, the mean with its 95% interval,
//! std, min and max with their seeds, median, and the counts of converged, diverged and failed
//! seeds; per pair of sweeps the difference of means with its interval and P(A > B); and a
//! paragraph that says how every number was made. As Markdown and as LaTeX (booktabs).

use super::f;
use crate::domain::Metric;
use crate::metric::Direction;
use crate::stats::SweepStats;
use crate::stats::compare::Comparison;
use crate::stats::outcomes::Outcomes;
use std::fmt::Write;

/// One sweep as the table and the paragraph describe it.
pub struct PaperSweep {
    pub id: String,
    pub name: String,
    pub task: String,
    pub dataset: String,
    /// What its seeds vary ([`crate::design::Design::describe`]).
    pub design: String,
    /// The score's statistics over the converged seeds (None: no seed converged).
    pub stats: Option<SweepStats>,
    pub outcomes: Outcomes,
    /// The converged runs by device, by precision, and how many were deterministic.
    pub devices: Vec<(String, u64)>,
    pub precisions: Vec<(String, u64)>,
    pub deterministic: u64,
    /// Their training time, summed.
    pub seconds: f64,
}

/// Two sweeps compared: `a` and `b` index [`Paper::sweeps`].
pub struct PaperPair {
    pub a: usize,
    pub b: usize,
    pub comparison: Comparison,
}

pub struct Paper {
    pub metric: Metric,
    pub direction: Direction,
    pub sweeps: Vec<PaperSweep>,
    pub pairs: Vec<PaperPair>,
    /// The seedsweep version that wrote it.
    pub version: String,
}

/// One row's cells, as text ("-" where undefined).
struct Row {
    name: String,
    n: String,
    mean: String,
    std: String,
    min: String,
    max: String,
    median: String,
    outcomes: [u64; 3],
}

fn row(s: &PaperSweep) -> Row {
    let o = &s.outcomes;
    let outcomes = [o.converged, o.diverged, o.failed];
    let Some(st) = &s.stats else {
        let dash = || "-".to_string();
        return Row {
            name: s.name.clone(),
            n: "0".into(),
            mean: dash(),
            std: dash(),
            min: dash(),
            max: dash(),
            median: dash(),
            outcomes,
        };
    };
    let m = &st.summary;
    let (min_seed, max_seed) = m.min_max_seeds();
    let mean = match &st.intervals {
        Some(i) => format!("{} [{}, {}]", f(m.mean), f(i.mean.low), f(i.mean.high)),
        None => format!("{} [-]", f(m.mean)),
    };
    Row {
        name: s.name.clone(),
        n: m.n.to_string(),
        mean,
        std: f(m.std),
        min: format!("{} ({min_seed})", f(m.min)),
        max: format!("{} ({max_seed})", f(m.max)),
        median: f(m.median),
        outcomes,
    }
}

const HEAD: [&str; 9] = [
    "sweep",
    "n",
    "mean [95% CI]",
    "std",
    "min (seed)",
    "max (seed)",
    "median",
    "converged / diverged / failed",
    "",
];

/// The Markdown tables and the paragraph.
pub fn markdown(p: &Paper) -> String {
    let mut out = format!("| {} |\n", HEAD[..8].join(" | "));
    out += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for s in &p.sweeps {
        let r = row(s);
        let [c, d, fl] = r.outcomes;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {c} / {d} / {fl} |",
            r.name.replace('|', "\\|"),
            r.n,
            r.mean,
            r.std,
            r.min,
            r.max,
            r.median
        );
    }
    if !p.pairs.is_empty() {
        out += "\n| A | B | mean(A) - mean(B) [95% CI] | P(A > B) | Welch p |\n|---|---|---:|---:|---:|\n";
        for pair in &p.pairs {
            let (a, b, c) = pair_cells(p, pair);
            let _ = writeln!(out, "| {a} | {b} | {c} |");
        }
    }
    out + "\n" + &paragraph(p) + "\n"
}

/// A pair's names and the rest of its cells, joined by " | ".
fn pair_cells(p: &Paper, pair: &PaperPair) -> (String, String, String) {
    let c = &pair.comparison;
    (
        p.sweeps[pair.a].name.clone(),
        p.sweeps[pair.b].name.clone(),
        format!(
            "{} [{}, {}] | {:.3} | {}",
            f(c.difference),
            f(c.difference_ci.low),
            f(c.difference_ci.high),
            c.prob_a_beats_b,
            pvalue(c.welch_p)
        ),
    )
}

fn pvalue(p: f64) -> String {
    if !p.is_finite() {
        "-".into()
    } else if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}

/// LaTeX's special characters escaped.
fn tex(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out += "\\textbackslash{}",
            '&' | '%' | '$' | '#' | '_' | '{' | '}' => {
                out.push('\\');
                out.push(c);
            }
            '~' => out += "\\textasciitilde{}",
            '^' => out += "\\textasciicircum{}",
            _ => out.push(c),
        }
    }
    out
}

/// The LaTeX tables (booktabs) and the paragraph.
pub fn latex(p: &Paper) -> String {
    let mut out = String::from(
        "% Made by seedsweep (`coordinator sweep paper`); needs \\usepackage{booktabs}.\n\\begin{table}[t]\n\\centering\n\\small\n\\begin{tabular}{lrrrrrrr}\n\\toprule\n",
    );
    let _ = writeln!(
        out,
        "Sweep & $n$ & Mean [95\\% CI] & Std & Min (seed) & Max (seed) & Median & Conv./div./failed \\\\\n\\midrule"
    );
    for s in &p.sweeps {
        let r = row(s);
        let [c, d, fl] = r.outcomes;
        let _ = writeln!(
            out,
            "{} & {} & {} & {} & {} & {} & {} & {c}/{d}/{fl} \\\\",
            tex(&r.name),
            r.n,
            r.mean,
            r.std,
            r.min,
            r.max,
            r.median
        );
    }
    out += "\\bottomrule\n\\end{tabular}\n";
    let _ = writeln!(
        out,
        "\\caption{{{} over seeds{}.}}\n\\end{{table}}",
        tex(p.metric.name()),
        tex(p.direction.note())
    );
    if !p.pairs.is_empty() {
        out += "\n\\begin{table}[t]\n\\centering\n\\small\n\\begin{tabular}{llrrr}\n\\toprule\nA & B & Mean(A) $-$ mean(B) [95\\% CI] & $P(A > B)$ & Welch $p$ \\\\\n\\midrule\n";
        for pair in &p.pairs {
            let (a, b, c) = pair_cells(p, pair);
            let _ = writeln!(
                out,
                "{} & {} & {} \\\\",
                tex(&a),
                tex(&b),
                c.replace(" | ", " & ")
            );
        }
        out +=
            "\\bottomrule\n\\end{tabular}\n\\caption{Differences between sweeps.}\n\\end{table}\n";
    }
    out + "\n" + &tex(&paragraph(p)) + "\n"
}

/// How every number was made: what was varied, the intervals, the devices, precision,
/// determinism, versions and compute.
pub fn paragraph(p: &Paper) -> String {
    let mut out = String::new();
    for s in &p.sweeps {
        let on = if s.dataset.is_empty() {
            String::new()
        } else {
            format!(" on {}", s.dataset)
        };
        let _ = write!(
            out,
            "{} (sweep {}) trained task {}{on} under {} seeds: {}. ",
            s.name,
            s.id,
            s.task,
            s.outcomes.finished + s.outcomes.failed,
            s.design
        );
    }
    let _ = write!(
        out,
        "The score is {}{}. Every seed is counted: n and every statistic are over the converged \
         seeds; a diverged seed (a training loss or score that was not finite) and a failed one \
         (out of attempts) are counted in the last column and in no statistic. ",
        p.metric.name(),
        p.direction.note()
    );
    out += "The mean's interval is Student's t (95%); std is the sample standard deviation \
            (n - 1) over seeds; min and max name their seeds. ";
    if !p.pairs.is_empty() {
        out += "For pairs, the difference of means has Welch's 95% interval and p-value, and \
                P(A > B) is the probability that a random seed of A scores better than one of \
                B (Mann-Whitney, ties counting one half). ";
    }
    let tally = |pick: fn(&PaperSweep) -> &Vec<(String, u64)>| {
        let mut all: Vec<(String, u64)> = Vec::new();
        for s in &p.sweeps {
            for (k, n) in pick(s) {
                match all.iter_mut().find(|(name, _)| name == k) {
                    Some(e) => e.1 += n,
                    None => all.push((k.clone(), *n)),
                }
            }
        }
        all.iter()
            .map(|(k, n)| format!("{k} ({n} runs)"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let runs: u64 = p.sweeps.iter().map(|s| s.outcomes.converged).sum();
    let deterministic: u64 = p.sweeps.iter().map(|s| s.deterministic).sum();
    let seconds: f64 = p.sweeps.iter().map(|s| s.seconds).sum();
    let took = if seconds >= 36.0 {
        format!("{:.2} device-hours", seconds / 3600.0)
    } else {
        format!("{seconds:.1} device-seconds")
    };
    let _ = write!(
        out,
        "The {runs} converged runs trained on {}, in {}; {deterministic} of them deterministic \
         (repeatable bit for bit). They took {took} of training. Made with \
         seedsweep {}; the workers' libtorch and driver versions are not recorded by seedsweep.",
        tally(|s| &s.devices),
        tally(|s| &s.precisions),
        p.version
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Scored;
    use crate::stats::outcomes::DivergedSeed;

    fn sweep(name: &str, values: &[f64], diverged: u32) -> PaperSweep {
        let runs: Vec<Scored> = (0..values.len() as i64)
            .zip(values)
            .map(|(seed, &value)| Scored {
                seed,
                factors: [seed; 4],
                value,
            })
            .collect();
        let stats = crate::stats::analyse(
            Metric::TestAccuracy,
            Direction::Max,
            &runs,
            vec![],
            None,
            None,
            &[],
        );
        let d = (0..diverged)
            .map(|i| DivergedSeed {
                seed: 100 + i64::from(i),
                epoch: 2,
                epochs: 1,
                last_value: Some(0.1),
            })
            .collect();
        PaperSweep {
            id: format!("{name}-id"),
            name: name.into(),
            task: "resnet9".into(),
            dataset: "cifar10".into(),
            design: "the init seed varied".into(),
            stats,
            outcomes: Outcomes::new(values.len() as u64, d, vec![]),
            devices: vec![("cuda:0 (NVIDIA H100)".into(), values.len() as u64)],
            precisions: vec![("fp16".into(), values.len() as u64)],
            deterministic: 0,
            seconds: 3600.0,
        }
    }

    /// Every column of both tables, the diverged seeds counted, names escaped for LaTeX.
    #[test]
    fn tables_carry_every_column_and_count_diverged_seeds() {
        let a = sweep(
            "base_line & co",
            &[0.93, 0.94, 0.935, 0.945, 0.94, 0.938],
            2,
        );
        let b = sweep("new", &[0.92, 0.925, 0.93, 0.921, 0.928, 0.926], 0);
        let comparison = crate::stats::compare::compare(
            &[0.93, 0.94, 0.935, 0.945, 0.94, 0.938],
            &[0.92, 0.925, 0.93, 0.921, 0.928, 0.926],
            Direction::Max,
        )
        .unwrap();
        let p = Paper {
            metric: Metric::TestAccuracy,
            direction: Direction::Max,
            sweeps: vec![a, b],
            pairs: vec![PaperPair {
                a: 0,
                b: 1,
                comparison,
            }],
            version: "0.1.0".into(),
        };
        let md = markdown(&p);
        assert!(md.contains("| base_line & co | 6 | 0.9380 ["), "{md}");
        assert!(md.contains("| 6 / 2 / 0 |"), "{md}");
        assert!(md.contains("| base_line & co | new | 0.0130 ["), "{md}");
        assert!(md.contains("2.00 device-hours"), "{md}");
        let tex = latex(&p);
        assert!(
            tex.contains("\\toprule") && tex.contains("\\bottomrule"),
            "{tex}"
        );
        assert!(tex.contains("base\\_line \\& co & 6 &"), "{tex}");
        assert!(tex.contains("6/2/0 \\\\"), "{tex}");
        assert!(tex.contains("95\\% CI"), "{tex}");
    }
}
