//! The design of a sweep: how its runs map to the seeds of each source of randomness (factor).
//! Decided once at submission and stored with the sweep; the store rebuilds any run's factor
//! seeds from it.

use serde::{Deserialize, Serialize};

/// A source of randomness that a sweep can vary on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Factor {
    /// The initial weights.
    Init,
    /// The order of the training data.
    Order,
    /// The augmentation draws (crops, flips, cutout).
    Augment,
    /// Which training images a run holds out as its validation set (`train.holdout`).
    Split,
}

impl Factor {
    pub const ALL: [Factor; 4] = [Factor::Init, Factor::Order, Factor::Augment, Factor::Split];

    pub fn as_str(self) -> &'static str {
        match self {
            Factor::Init => "init",
            Factor::Order => "order",
            Factor::Augment => "augment",
            Factor::Split => "split",
        }
    }
}

/// The seed of each factor for one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactorSeeds {
    pub init: i64,
    pub order: i64,
    pub augment: i64,
    #[serde(default)]
    pub split: i64,
}

/// How a sweep's runs map to factor seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Design {
    /// A run's seed is the seed of each factor in `vary`; the others stay at `base_seed`.
    Vary { vary: Vec<Factor>, base_seed: i64 },
    /// Every combination of the listed factors' seeds (the others at `base_seed`); run `i`
    /// (0-based) is combination `i` with the last factor changing fastest.
    Crossed {
        levels: Vec<(Factor, Vec<i64>)>,
        base_seed: i64,
    },
}

impl Design {
    /// What the design varies, in a sentence's words: "the init, order and augment seeds varied
    /// together (one seed per run; split fixed at seed 0)", or "init (3 seeds) crossed with order
    /// (4 seeds); augment and split fixed at seed 0".
    pub fn describe(&self) -> String {
        let fixed = |varied: &[Factor], base: i64| {
            let rest: Vec<&str> = Factor::ALL
                .iter()
                .filter(|f| !varied.contains(f))
                .map(|f| f.as_str())
                .collect();
            match rest.as_slice() {
                [] => String::new(),
                [one] => format!("; {one} fixed at seed {base}"),
                many => format!("; {} fixed at seed {base}", many.join(", ")),
            }
        };
        let names = |fs: &[Factor]| {
            let n: Vec<&str> = fs.iter().map(|f| f.as_str()).collect();
            match n.split_last() {
                Some((last, [])) => last.to_string(),
                Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
                None => "no".into(),
            }
        };
        match self {
            Design::Vary { vary, base_seed } => format!(
                "the {} seed{} varied together (one seed per run{})",
                names(vary),
                if vary.len() == 1 { "" } else { "s" },
                fixed(vary, *base_seed)
            ),
            Design::Crossed { levels, base_seed } => {
                let varied: Vec<Factor> = levels.iter().map(|(f, _)| *f).collect();
                let crossed: Vec<String> = levels
                    .iter()
                    .map(|(f, seeds)| format!("{} ({} seeds)", f.as_str(), seeds.len()))
                    .collect();
                format!(
                    "{} crossed{}",
                    crossed.join(" x "),
                    fixed(&varied, *base_seed)
                )
            }
        }
    }

    /// The factor seeds of run `seed` (no allocation: rebuilt for every result of a large
    /// sweep when its statistics are read).
    pub fn factors(&self, seed: i64) -> FactorSeeds {
        let base = match self {
            Design::Vary { base_seed, .. } | Design::Crossed { base_seed, .. } => *base_seed,
        };
        let mut out = FactorSeeds {
            init: base,
            order: base,
            augment: base,
            split: base,
        };
        let mut set = |f: Factor, v: i64| match f {
            Factor::Init => out.init = v,
            Factor::Order => out.order = v,
            Factor::Augment => out.augment = v,
            Factor::Split => out.split = v,
        };
        match self {
            Design::Vary { vary, .. } => vary.iter().for_each(|f| set(*f, seed)),
            Design::Crossed { levels, .. } => {
                let mut rest = seed;
                for (f, values) in levels.iter().rev() {
                    let n = values.len() as i64;
                    set(*f, values[(rest % n) as usize]);
                    rest /= n;
                }
            }
        }
        out
    }

    pub fn is_crossed(&self) -> bool {
        matches!(self, Design::Crossed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a paper's methods paragraph says was varied.
    #[test]
    fn a_design_says_what_it_varies() {
        let vary = Design::Vary {
            vary: vec![Factor::Init, Factor::Order, Factor::Augment],
            base_seed: 0,
        };
        assert_eq!(
            vary.describe(),
            "the init, order and augment seeds varied together (one seed per run; split fixed at seed 0)"
        );
        let crossed = Design::Crossed {
            levels: vec![(Factor::Init, vec![0, 1, 2]), (Factor::Order, vec![5, 6])],
            base_seed: 7,
        };
        assert_eq!(
            crossed.describe(),
            "init (3 seeds) x order (2 seeds) crossed; augment, split fixed at seed 7"
        );
    }
}
