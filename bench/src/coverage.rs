//! How often each 95% interval seedsweep reports covers the truth, by simulation: 10^4 sweeps
//! of n seeds drawn from known distributions (a normal, a skewed beta, and a normal whose
//! seeds diverge with probability 1%), each sweep's intervals computed as the coordinator
//! computes them (`seedsweep_core::stats`), and the share that contain the distribution's true
//! mean, std and divergence rate. An interval is valid when it covers 93-97% of the time.
//!
//!   cargo run --release -p seedsweep-bench --bin coverage -- [--sweeps 10000] [--n 10,30,100,1000]

use anyhow::Context;
use clap::Parser;
use rand::{Rng, SeedableRng};
use seedsweep_core::metric::Direction;
use seedsweep_core::stats::describe::{Interval, Method, intervals};
use seedsweep_core::stats::outcomes::clopper_pearson;
use seedsweep_core::stats::summarize;
use statrs::distribution::{Beta, ContinuousCDF, Normal};
use statrs::statistics::Distribution;

#[derive(Parser)]
#[command(about = "Coverage of seedsweep's 95% intervals over simulated sweeps")]
struct Args {
    /// Simulated sweeps per distribution and size.
    #[arg(long, default_value_t = 10_000)]
    sweeps: usize,
    /// Seeds per sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,30,100,1000")]
    n: Vec<usize>,
}

/// A distribution of one seed's score, with its true mean and std.
struct Truth {
    name: &'static str,
    /// The score at a uniform draw (the inverse CDF).
    quantile: Box<dyn Fn(f64) -> f64>,
    mean: f64,
    std: f64,
    /// The probability that a seed diverges (its score then counts in no statistic).
    diverge: f64,
}

fn truths() -> anyhow::Result<Vec<Truth>> {
    let normal = Normal::new(0.94, 0.005).context("normal")?;
    let beta = Beta::new(2.0, 8.0).context("beta")?;
    let (nm, ns) = (
        normal.mean().unwrap_or(0.94),
        normal.std_dev().unwrap_or(0.005),
    );
    let normal2 = normal;
    Ok(vec![
        Truth {
            name: "normal(0.94, 0.005)",
            quantile: Box::new(move |u| normal.inverse_cdf(u)),
            mean: nm,
            std: ns,
            diverge: 0.0,
        },
        Truth {
            name: "beta(2, 8) (skewness 0.83)",
            quantile: Box::new(move |u| beta.inverse_cdf(u)),
            mean: beta.mean().unwrap_or(0.2),
            std: beta.std_dev().unwrap_or(0.12),
            diverge: 0.0,
        },
        Truth {
            name: "normal, 1% of seeds diverge",
            quantile: Box::new(move |u| normal2.inverse_cdf(u)),
            mean: nm,
            std: ns,
            diverge: 0.01,
        },
    ])
}

#[derive(Default)]
struct Tally {
    /// Per interval: its name, its method, how often it covered, of how many sweeps.
    covered: Vec<(&'static str, Option<Method>, usize, usize)>,
}

impl Tally {
    fn count(&mut self, name: &'static str, interval: Option<&Interval>, truth: f64) {
        let at = match self.covered.iter().position(|c| c.0 == name) {
            Some(i) => i,
            None => {
                self.covered.push((name, None, 0, 0));
                self.covered.len() - 1
            }
        };
        if let Some(i) = interval {
            let c = &mut self.covered[at];
            c.1 = Some(i.method);
            c.3 += 1;
            if i.low <= truth && truth <= i.high {
                c.2 += 1;
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
    println!("| distribution | n | interval | covered | of sweeps | valid (93-97%) |");
    println!("|---|---:|---|---:|---:|---|");
    for truth in truths()? {
        for &n in &args.n {
            let mut tally = Tally::default();
            for _ in 0..args.sweeps {
                let mut scores = Vec::with_capacity(n);
                let mut diverged = 0u64;
                for seed in 0..n as i64 {
                    if rng.random::<f64>() < truth.diverge {
                        diverged += 1;
                    } else {
                        scores.push((seed, (truth.quantile)(rng.random::<f64>())));
                    }
                }
                let rate = clopper_pearson(diverged, n as u64);
                let rate = Interval {
                    low: rate.low,
                    high: rate.high,
                    method: rate.method,
                };
                if truth.diverge > 0.0 {
                    tally.count("divergence rate", Some(&rate), truth.diverge);
                }
                let Some(summary) = summarize(&scores, Direction::Max) else {
                    continue;
                };
                let values: Vec<f64> = scores.iter().map(|s| s.1).collect();
                let ci = intervals(&values, &summary);
                tally.count("mean", ci.as_ref().map(|c| &c.mean), truth.mean);
                tally.count("std", ci.as_ref().map(|c| &c.std), truth.std);
            }
            for (name, method, covered, of) in &tally.covered {
                let share = *covered as f64 / (*of).max(1) as f64;
                let valid = if (0.93..=0.97).contains(&share) {
                    "yes"
                } else {
                    "NO"
                };
                println!(
                    "| {} | {n} | {name} ({}) | {:.1}% | {of} | {valid} |",
                    truth.name,
                    method.map_or("-", Method::as_str),
                    100.0 * share
                );
            }
        }
    }
    Ok(())
}
