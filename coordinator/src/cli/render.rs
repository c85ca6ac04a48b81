//! The text `sweep stats` and `sweep compare` print, from the same typed documents the server
//! serialises (`seedsweep_core::stats::document`).

use seedsweep_core::report::f;
use seedsweep_core::stats::SweepStats;
use seedsweep_core::stats::describe::{BlackSwan, Interval, flags};
use seedsweep_core::stats::document::{ComparisonDocument, StatsBody, StatsDocument};
use seedsweep_core::stats::outcomes::Outcomes;
use std::fmt::Write;

/// A statistic as printed: `-` where it is undefined.
fn num(x: f64) -> String {
    if x.is_finite() { f(x) } else { "-".into() }
}

fn maybe(x: Option<f64>) -> String {
    x.map_or("-".into(), num)
}

fn interval(i: Option<&Interval>) -> String {
    i.map_or("-".into(), |i| format!("[{}, {}]", num(i.low), num(i.high)))
}

/// The table `sweep stats` prints.
pub fn stats_table(doc: &StatsDocument) -> String {
    let s = match &doc.body {
        StatsBody::Stats(s) => s,
        StatsBody::NoResultYet { metric, .. } => {
            let mut out = format!("sweep {}  metric {metric}\n", doc.sweep_id);
            outcomes(&mut out, &doc.outcomes);
            out.push_str("no seed has converged with this metric yet\n");
            diverged(&mut out, &doc.outcomes);
            return out;
        }
    };
    let mut out = format!(
        "sweep {}  metric {}{}\n",
        doc.sweep_id,
        s.metric,
        s.summary.direction.note()
    );
    outcomes(&mut out, &doc.outcomes);
    out.push_str("over the converged seeds:\n");
    summary(&mut out, s);
    intervals(&mut out, s);
    diverged(&mut out, &doc.outcomes);
    black_swans(&mut out, &s.black_swans);
    best_of_k(&mut out, s);
    epochs(&mut out, s);
    components(&mut out, s);
    out
}

fn summary(out: &mut String, s: &SweepStats) {
    let m = &s.summary;
    let (min_seed, max_seed) = m.min_max_seeds();
    let _ = writeln!(
        out,
        "n {}  mean {}  std {}  median {}  q1 {}  q3 {}  MAD {}\nmin {} (seed {})  max {} (seed {})  gap {}",
        m.n,
        num(m.mean),
        num(m.std),
        num(m.median),
        num(m.q1),
        num(m.q3),
        num(s.mad),
        num(m.min),
        min_seed,
        num(m.max),
        max_seed,
        num(m.gap),
    );
    if let Some(b) = s.binomial_std.filter(|b| b.is_finite()) {
        let _ = writeln!(
            out,
            "test-set noise: binomial std {} against the observed std {}",
            num(b),
            num(m.std)
        );
    }
    if let Some(t) = &s.test_set {
        let _ = writeln!(
            out,
            "test set ({} examples, {} runs with per-example results): binomial std {}, independent-errors std {}, distribution-wise std {} (variance {}); split-half correlation {}",
            t.test_examples,
            t.runs,
            num(t.binomial_std),
            num(t.independent_errors_std),
            num(t.distribution_std),
            num(t.distribution_var),
            maybe(t.split_half_correlation),
        );
    }
}

fn intervals(out: &mut String, s: &SweepStats) {
    if let Some(ci) = &s.intervals {
        let _ = writeln!(
            out,
            "95% intervals: mean {} ({})  std {} ({})",
            interval(Some(&ci.mean)),
            ci.mean.method.as_str(),
            interval(Some(&ci.std)),
            ci.std.method.as_str(),
        );
    }
    for p in &s.seeds_for_ci_width {
        let _ = writeln!(
            out,
            "a 95% interval of the mean {} wide needs about {} seeds",
            num(p.ci_width),
            p.seeds
        );
    }
}

/// The counts of every outcome, and the causes of the failures.
fn outcomes(out: &mut String, o: &Outcomes) {
    let _ = writeln!(out, "{}", o.line());
    for c in &o.failure_causes {
        let plural = if c.seeds == 1 { "" } else { "s" };
        let cause = c.cause.replace('\n', " / ");
        let _ = writeln!(out, "  failed ({} seed{plural}): {cause}", c.seeds);
    }
}

/// The diverged seeds: the blackest swans, ahead of the converged ones.
fn diverged(out: &mut String, o: &Outcomes) {
    if o.diverged_seeds.is_empty() {
        return;
    }
    out.push_str("diverged seeds (counted in no statistic above):\n  seed         in epoch  last finite value\n");
    for d in &o.diverged_seeds {
        let last = match d.last_value {
            Some(v) => format!("{} (epoch {})", num(v), d.epochs),
            None => "-".into(),
        };
        let _ = writeln!(out, "  {:<12} {:>8}  {last}", d.seed.to_string(), d.epoch);
    }
    if o.diverged > o.diverged_seeds.len() as u64 {
        let _ = writeln!(
            out,
            "  ... and {} more",
            o.diverged - o.diverged_seeds.len() as u64
        );
    }
}

fn black_swans(out: &mut String, swans: &[BlackSwan]) {
    if swans.is_empty() {
        out.push_str("black swans: none (|robust z| > 3.5 or |z| > 3)\n");
        return;
    }
    out.push_str("black swans (|robust z| > 3.5 or |z| > 3):\n  seed           score  side  luck           z   robust z  flagged by\n");
    for b in swans {
        let _ = writeln!(
            out,
            "  {:<12} {:>7}  {:<4}  {:<7} {:>8.2} {:>10}  {}",
            b.seed.to_string(),
            num(b.score),
            b.side.as_str(),
            if b.lucky { "lucky" } else { "unlucky" },
            if b.z.is_finite() { b.z } else { 0.0 },
            b.robust_z
                .filter(|r| r.is_finite())
                .map_or("-".into(), |r| format!("{r:.2}")),
            flags(&b.flagged_by).join(", "),
        );
    }
}

fn best_of_k(out: &mut String, s: &SweepStats) {
    out.push_str("best of k seeds (expected, exact over the observed seeds):\n  k        E[best]  E[worst]  |E[best]-mean|\n");
    for b in &s.best_of_k {
        let (best, worst) = b.best_worst(s.summary.direction);
        let _ = writeln!(
            out,
            "  {:<7} {:>8} {:>9} {:>15}",
            b.k.to_string(),
            num(best),
            num(worst),
            num(b.inflation)
        );
    }
}

fn epochs(out: &mut String, s: &SweepStats) {
    if s.epochs.is_empty() {
        return;
    }
    out.push_str("per epoch, across seeds:\n  epoch     n     mean      std      min       q1   median       q3      max\n");
    for e in &s.epochs {
        let _ = writeln!(
            out,
            "  {:<5} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            e.epoch.to_string(),
            e.n.to_string(),
            num(e.mean),
            num(e.std),
            num(e.min),
            num(e.q1),
            num(e.median),
            num(e.q3),
            num(e.max)
        );
    }
}

fn components(out: &mut String, s: &SweepStats) {
    let Some(v) = &s.variance_components else {
        let note = s.variance_components_note.as_deref().unwrap_or("-");
        let _ = writeln!(out, "variance by source: {note}");
        return;
    };
    out.push_str("variance by source (random-effects ANOVA):\n  source                      levels    variance  share  95% interval\n");
    for c in &v.components {
        let share = if c.share.is_finite() { c.share } else { 0.0 };
        let _ = writeln!(
            out,
            "  {:<27} {:>6} {:>11} {:>5.1}%  {}",
            c.source,
            c.levels.to_string(),
            num(c.variance),
            100.0 * share,
            interval(c.interval.as_ref())
        );
    }
}

/// What `sweep compare` prints.
pub fn comparison(doc: &ComparisonDocument) -> String {
    let c = &doc.comparison;
    let side = |s: &seedsweep_core::stats::compare::Side| {
        format!("n {}  mean {}  std {}", s.n, num(s.mean), num(s.std))
    };
    format!(
        "metric {}\nA {}  {}\nB {}  {}\nmean(A) - mean(B) = {}  95% interval {}\n\
         Welch t = {:.3} (df {:.1}), p = {}\nMann-Whitney U = {}, p = {}\n\
         P(a random seed of A beats one of B) = {:.3}{}\n",
        doc.metric,
        doc.sweep_a,
        side(&c.a),
        doc.sweep_b,
        side(&c.b),
        num(c.difference),
        interval(Some(&c.difference_ci)),
        c.welch_t,
        c.welch_df,
        num(c.welch_p),
        serde_json::json!(c.mann_whitney_u),
        num(c.mann_whitney_p),
        c.prob_a_beats_b,
        c.direction.note(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use seedsweep_core::domain::{Metric, Scored};
    use seedsweep_core::metric::Direction;
    use seedsweep_core::stats::describe::EpochSpread;
    use seedsweep_core::stats::noise::TestSetTally;
    use seedsweep_core::stats::outcomes::{DivergedSeed, FailureCause};

    fn runs(values: &[f64], factors: impl Fn(i64) -> [i64; 4]) -> Vec<Scored> {
        let seeds = 0..values.len() as i64;
        seeds
            .zip(values)
            .map(|(seed, &value)| Scored {
                seed,
                factors: factors(seed),
                value,
            })
            .collect()
    }

    fn spread(epoch: u32, n: u64) -> EpochSpread {
        EpochSpread {
            epoch,
            n,
            mean: 0.8,
            std: 0.01,
            min: 0.78,
            max: 0.82,
            q1: 0.79,
            median: 0.8,
            q3: 0.81,
        }
    }

    /// Documents that reach every part of the table: black swans, best-of-k, intervals (bootstrap
    /// and normal theory), per-epoch rows, test-set noise from bitmaps, variance by source of a
    /// crossed design, a sweep without results.
    fn documents() -> Vec<StatsDocument> {
        let mut docs = Vec::new();
        let values = [0.91, 0.93, 0.92, 0.5, 0.925, 0.915, 0.93, 0.92, 0.918];
        let crossed = |s: i64| [s % 3, s / 3, 0, 0];
        let mut tally = TestSetTally::new(16);
        (0..9u8).for_each(|s| tally.add(&[0xff ^ s, 0xf0 | s]));
        let maps = vec![tally];
        let epochs = vec![spread(1, 9), spread(2, 9)];
        for (metric, runs, epochs, ci, examples, maps) in [
            (
                Metric::TestAccuracy,
                runs(&values, crossed),
                epochs.clone(),
                Some(0.01),
                None,
                maps.clone(),
            ),
            (
                Metric::TestAccuracy,
                runs(&values, |s| [s; 4]),
                vec![],
                None,
                Some(10_000),
                vec![],
            ),
            (
                Metric::TestLoss,
                runs(&[0.3], |s| [s; 4]),
                epochs,
                None,
                None,
                vec![],
            ),
            (
                Metric::TestAccuracy,
                runs(&[0.5; 40], |s| [s; 4]),
                vec![],
                Some(0.001),
                None,
                vec![],
            ),
        ] {
            let direction = Direction::natural(metric);
            let s = seedsweep_core::stats::analyse(
                metric, direction, &runs, epochs, ci, examples, &maps,
            );
            let converged = s.as_ref().map_or(0, |s| s.summary.n);
            let outcomes = Outcomes::new(converged, vec![], vec![]);
            docs.push(StatsDocument::new("sweep-1".into(), metric, s, outcomes));
        }
        // A sweep whose seeds all diverged or failed: no statistic, every count.
        let diverged = |seed, epoch, last_value| DivergedSeed {
            seed,
            epoch,
            epochs: epoch - 1,
            last_value,
        };
        let causes = vec![FailureCause {
            cause: "the program exited with status 1".into(),
            seeds: 2,
        }];
        let outcomes = Outcomes::new(
            0,
            vec![diverged(4, 3, Some(0.31)), diverged(1, 1, None)],
            causes,
        );
        docs.push(StatsDocument::new(
            "sweep-2".into(),
            Metric::ValLoss,
            None,
            outcomes,
        ));
        docs
    }

    fn comparisons() -> Vec<ComparisonDocument> {
        [
            (&[0.9, 0.91, 0.92][..], &[0.8, 0.85][..]),
            (&[0.9, 0.9], &[0.8, 0.8]),
        ]
        .into_iter()
        .map(|(a, b)| ComparisonDocument {
            metric: Metric::TestAccuracy,
            sweep_a: "a".into(),
            sweep_b: "b".into(),
            comparison: seedsweep_core::stats::compare::compare(a, b, Direction::Max).unwrap(),
        })
        .collect()
    }

    /// The text of every document above, against `snapshots/tables.txt` (written anew by
    /// `UPDATE_SNAPSHOTS=1 cargo test`, to review in the diff).
    #[test]
    fn tables_match_their_snapshot() {
        let mut texts: Vec<String> = documents().iter().map(stats_table).collect();
        texts.extend(comparisons().iter().map(comparison));
        let text = texts.join("\n");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cli/snapshots/tables.txt");
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(path, &text).unwrap();
        }
        let want = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            text == want,
            "the tables differ from {path} (UPDATE_SNAPSHOTS=1 rewrites it):\n{text}"
        );
    }
}
