//! Variance by source: for a sweep whose seed factors (init, order, augment, split) are crossed,
//! how much of the score variance each factor carries, by a random-effects analysis of variance
//! of the balanced design (method of moments, with Satterthwaite's chi-square intervals).
//!
//! Factors that always move together (the default, where one seed sets them all) are one
//! source, named by joining their names with `+`. With two crossed sources and one run per
//! cell, the residual is their interaction (confounded with any other noise).

use super::describe::Interval;
use serde::{Deserialize, Serialize};
use statrs::distribution::{ChiSquared, ContinuousCDF};

pub const FACTORS: [&str; 4] = ["init", "order", "augment", "split"];

/// One run: its four factor seeds and its score.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub factors: [i64; 4],
    pub score: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Component {
    /// A factor, factors joined by `+`, or "residual".
    pub source: String,
    pub levels: usize,
    /// The estimate; negative estimates (a source weaker than the noise) are reported as 0.
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub variance: f64,
    /// Its share of the summed components.
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub share: f64,
    pub interval: Option<Interval>,
    #[serde(deserialize_with = "crate::stats::nan_if_null")]
    pub df: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Components {
    pub runs: usize,
    pub components: Vec<Component>,
}

/// Why components could not be computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotCrossed {
    pub reason: String,
}

/// The chi-square interval of a variance `estimate` on `df` degrees of freedom; none where it
/// says nothing: with a fraction of a degree of freedom (Satterthwaite's, for a source no
/// stronger than the noise) the quantiles underflow, and an "interval" that misses its own
/// estimate would be printed.
fn chi_interval(df: f64, estimate: f64) -> Option<Interval> {
    if !(df > 0.0 && estimate > 0.0) {
        return None;
    }
    let chi = ChiSquared::new(df).ok()?;
    let i = Interval {
        low: df * estimate / chi.inverse_cdf(0.975),
        high: df * estimate / chi.inverse_cdf(0.025),
        method: super::describe::Method::ChiSquare,
    };
    (i.low.is_finite() && i.high.is_finite() && i.low <= estimate && estimate <= i.high)
        .then_some(i)
}

/// Each run's level of factor `f`, numbered in order of first appearance (so two factors that
/// group the runs alike get equal vectors), and the number of levels. Sorting rather than
/// hashing: a million runs take a few tens of milliseconds.
fn levels_of(cells: &[Cell], f: usize) -> (Vec<usize>, usize) {
    let mut by_value: Vec<(i64, u32)> = cells
        .iter()
        .enumerate()
        .map(|(i, c)| (c.factors[f], i as u32))
        .collect();
    by_value.sort_unstable();
    let mut sorted_level = vec![0usize; cells.len()];
    let mut count = 0;
    for (j, &(v, i)) in by_value.iter().enumerate() {
        if j > 0 && v != by_value[j - 1].0 {
            count += 1;
        }
        sorted_level[i as usize] = count;
    }
    let count = if cells.is_empty() { 0 } else { count + 1 };
    let mut first = vec![usize::MAX; count];
    let mut next = 0;
    let levels = sorted_level
        .into_iter()
        .map(|l| {
            if first[l] == usize::MAX {
                first[l] = next;
                next += 1;
            }
            first[l]
        })
        .collect();
    (levels, count)
}

pub fn components(cells: &[Cell]) -> Result<Components, NotCrossed> {
    let n = cells.len();
    let fail = |reason: String| Err(NotCrossed { reason });
    if n < 3 {
        return fail(format!("{n} runs: need at least 3"));
    }
    // Each factor's level index per run; factors that induce the same grouping are one source.
    let mut sources: Vec<(String, Vec<usize>, usize)> = Vec::new();
    // Which source the previous factor's grouping went to (None: it has one level).
    let mut previous: Option<usize> = None;
    for (f, name) in FACTORS.iter().enumerate() {
        // The same column as the previous factor (sweeps that vary nothing: all four are the
        // seed) groups the runs the same way: merge without building its levels again.
        if f > 0 && cells.iter().all(|c| c.factors[f] == c.factors[f - 1]) {
            if let Some(i) = previous {
                sources[i].0 = format!("{}+{name}", sources[i].0);
            }
            continue;
        }
        let (levels, count) = levels_of(cells, f);
        previous = None;
        if count < 2 {
            continue;
        }
        match sources.iter().position(|s| s.1 == levels) {
            Some(i) => {
                sources[i].0 = format!("{}+{name}", sources[i].0);
                previous = Some(i);
            }
            None => {
                sources.push((name.to_string(), levels, count));
                previous = Some(sources.len() - 1);
            }
        }
    }
    if sources.is_empty() {
        return fail("no seed factor varies".into());
    }
    // Balanced and completely crossed: every combination of levels exactly once. At most four
    // sources, each under 2^32 levels: a combination packs into a u128.
    let combinations: usize = sources.iter().map(|s| s.2).product();
    // One source: its levels are the combinations, distinct when there are n of them.
    let distinct = sources.len() == 1 && combinations == n || {
        let mut keys: Vec<u128> = (0..n)
            .map(|i| {
                sources
                    .iter()
                    .fold(0u128, |k, s| (k << 32) | s.1[i] as u128)
            })
            .collect();
        keys.sort_unstable();
        keys.windows(2).all(|w| w[0] != w[1])
    };
    if combinations != n || !distinct {
        return fail(format!(
            "the factors ({}) are not completely crossed with one run per combination: {n} runs for {combinations} combinations",
            sources
                .iter()
                .map(|s| s.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let y: Vec<f64> = cells.iter().map(|c| c.score).collect();
    let grand = y.iter().sum::<f64>() / n as f64;
    let ss_total: f64 = y.iter().map(|v| (v - grand).powi(2)).sum();
    // Main effects: SS_f = (n / L) * sum over levels of (level mean - grand mean)^2.
    let mut mains = Vec::new();
    for (name, levels, l) in &sources {
        let mut sums = vec![0.0; *l];
        for (i, &lv) in levels.iter().enumerate() {
            sums[lv] += y[i];
        }
        let per = (n / l) as f64;
        let ss: f64 = sums.iter().map(|s| per * (s / per - grand).powi(2)).sum();
        mains.push((name.clone(), *l, ss, (*l - 1) as f64, per));
    }
    let df_res = (n - 1) as f64 - mains.iter().map(|m| m.3).sum::<f64>();
    let ss_res = (ss_total - mains.iter().map(|m| m.2).sum::<f64>()).max(0.0);
    let ms_res = if df_res > 0.0 { ss_res / df_res } else { 0.0 };
    let mut out = Vec::new();
    for (name, levels, ss, df, per) in mains {
        let ms = ss / df;
        let raw = (ms - ms_res) / per;
        // Satterthwaite's degrees of freedom for a difference of mean squares.
        let nu = if df_res > 0.0 {
            (ms - ms_res).powi(2) / (ms * ms / df + ms_res * ms_res / df_res)
        } else {
            df
        };
        out.push(Component {
            source: name,
            levels,
            variance: raw.max(0.0),
            share: 0.0,
            interval: chi_interval(nu, raw),
            df: nu,
        });
    }
    if df_res > 0.0 {
        out.push(Component {
            source: "residual".into(),
            levels: 0,
            variance: ms_res,
            share: 0.0,
            interval: chi_interval(df_res, ms_res),
            df: df_res,
        });
    }
    let total: f64 = out.iter().map(|c| c.variance).sum();
    for c in &mut out {
        c.share = if total > 0.0 { c.variance / total } else { 0.0 };
    }
    Ok(Components {
        runs: n,
        components: out,
    })
}

#[cfg(test)]
mod tests {
    use super::super::reference::{REFERENCE, close, f};
    use super::*;

    /// A source far weaker than the noise gets a fraction of a degree of freedom: no interval,
    /// rather than one that misses its own estimate.
    #[test]
    fn no_interval_from_a_fraction_of_a_degree_of_freedom() {
        assert_eq!(chi_interval(1e-3, 1.8e-4), None);
        let i = chi_interval(8.0, 2.0).unwrap();
        assert!(i.low < 2.0 && 2.0 < i.high, "{i:?}");
    }

    #[test]
    fn a_crossed_design_matches_numpy_and_scipy() {
        let r = &REFERENCE["crossed"];
        let cells: Vec<Cell> = r["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let (i, o) = (c["init"].as_i64().unwrap(), c["order"].as_i64().unwrap());
                // augment and split held fixed, as in `vary = ["init", "order"]` crossed.
                Cell {
                    factors: [i, 100 + o, 7, 7],
                    score: f(&c["score"]),
                }
            })
            .collect();
        let got = components(&cells).unwrap();
        assert_eq!(got.components.len(), 3);
        for c in &got.components {
            let want = &r["components"][&c.source];
            close(c.variance, f(&want["variance"]), 1e-9, &c.source);
            let iv = c.interval.unwrap();
            close(iv.low, f(&want["low"]), 1e-6, &c.source);
            close(iv.high, f(&want["high"]), 1e-6, &c.source);
        }
        assert!((got.components.iter().map(|c| c.share).sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn confounded_factors_are_one_source_and_incomplete_designs_are_refused() {
        // The default sweep: one seed sets every factor.
        let cells: Vec<Cell> = (0..5)
            .map(|s| Cell {
                factors: [s; 4],
                score: 0.9 + 0.01 * s as f64,
            })
            .collect();
        let got = components(&cells).unwrap();
        assert_eq!(got.components.len(), 1);
        assert_eq!(got.components[0].source, "init+order+augment+split");
        close(got.components[0].variance, 0.00025, 1e-9, "sample variance");
        let mut partial = cells.clone();
        partial[1].factors[1] = 0;
        assert!(components(&partial).is_err());
    }
}
