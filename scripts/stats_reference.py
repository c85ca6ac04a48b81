"""Reference values for seedsweep's statistics, computed independently with numpy and scipy.

Writes core/src/stats/reference.json: fixed data (drawn here once with a seeded numpy
generator and stored in the file) and what numpy/scipy say about it. The coordinator's unit tests
read the file and check every statistic against it. Run again only when a definition changes:

    pip install numpy scipy
    python3 scripts/stats_reference.py
"""
import itertools
import json
import math
import os

import numpy as np
from scipy import stats

rng = np.random.default_rng(20261127)
OUT = os.path.join(os.path.dirname(__file__), "..", "core", "src", "stats", "reference.json")


def summary(x, seeds):
    x = np.asarray(x)
    q1, med, q3 = np.quantile(x, [0.25, 0.5, 0.75])
    return {
        "n": len(x), "mean": x.mean(), "std": x.std(ddof=1), "min": x.min(), "max": x.max(),
        "median": med, "q1": q1, "q3": q3, "gap": x.max() - x.min(),
        "best_seed": int(seeds[np.argmax(x)]), "worst_seed": int(seeds[np.argmin(x)]),
        "mad": float(np.median(np.abs(x - med))),
    }


def best_of_k(x, ks):
    """By brute force over every subset of k seeds: no formula shared with the Rust code."""
    out = []
    for k in ks:
        subsets = list(itertools.combinations(x, k))
        out.append({"k": k, "expected_max": float(np.mean([max(s) for s in subsets])),
                    "expected_min": float(np.mean([min(s) for s in subsets]))})
    return out


# A sweep of 14 seeds with two black swans (one high, one low).
seeds = np.arange(100, 114)
scores = np.round(0.93 + 0.004 * rng.standard_normal(14), 4)
scores[3] = 0.961
scores[9] = 0.871
s = summary(scores, seeds)
z = (scores - s["mean"]) / s["std"]
robust = stats.norm.ppf(0.75) * (scores - s["median"]) / s["mad"]


def bonett(x, z=stats.norm.ppf(0.975)):
    """Bonett's (2006) 95% interval of the std, from the paper's formula: the trimmed mean by
    scipy's trim_mean, the rest in numpy."""
    n = len(x)
    m = stats.trim_mean(x, 1 / (2 * math.sqrt(n - 4)))
    kurt = n * np.sum((x - m) ** 4) / np.sum((x - np.mean(x)) ** 2) ** 2
    c = n / (n - z)
    se = c * math.sqrt((kurt - (n - 3) / n) / (n - 1))
    centre = math.log(c * np.var(x, ddof=1))
    return [math.exp((centre - z * se) / 2), math.exp((centre + z * se) / 2)]

# Two sweeps to compare.
a = np.round(0.935 + 0.005 * rng.standard_normal(12), 4)
b = np.round(0.930 + 0.006 * rng.standard_normal(15), 4)
b[0] = a[0]  # a tie across the two
welch = stats.ttest_ind(a, b, equal_var=False)
va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
mw = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic", use_continuity=True)
beats = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])

# A crossed design: 4 init seeds x 3 order seeds, one run each.
init_effect = 0.004 * rng.standard_normal(4)
order_effect = 0.002 * rng.standard_normal(3)
cells = []
for i in range(4):
    for o in range(3):
        cells.append({"init": i, "order": o,
                      "score": float(0.93 + init_effect[i] + order_effect[o] + 0.001 * rng.standard_normal())})
y = np.array([c["score"] for c in cells]).reshape(4, 3)
grand = y.mean()
ms_init = 3 * ((y.mean(axis=1) - grand) ** 2).sum() / 3
ms_order = 4 * ((y.mean(axis=0) - grand) ** 2).sum() / 2
resid = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + grand
ms_res = (resid ** 2).sum() / 6


def satterthwaite(ms_f, df_f, c):
    est = (ms_f - ms_res) / c
    nu = (ms_f - ms_res) ** 2 / (ms_f ** 2 / df_f + ms_res ** 2 / 6)
    return {"variance": est, "low": nu * est / stats.chi2.ppf(0.975, nu),
            "high": nu * est / stats.chi2.ppf(0.025, nu)}


components = {
    "init": satterthwaite(ms_init, 3, 3),
    "order": satterthwaite(ms_order, 2, 4),
    "residual": {"variance": ms_res, "low": 6 * ms_res / stats.chi2.ppf(0.975, 6),
                 "high": 6 * ms_res / stats.chi2.ppf(0.025, 6)},
}

# Per-example correctness of 6 runs on a 40-example test set.
R, N = 6, 40
hard = rng.uniform(0, 0.5, N)
correct = (rng.uniform(size=(R, N)) > hard).astype(np.uint8)
err = 1 - correct.mean(axis=1)
e_i = 1 - correct.mean(axis=0)
indep_var = (e_i * (1 - e_i)).sum() / N ** 2
dist_var = N / (N - 1) * (err.var(ddof=1) - (1 - correct).var(axis=0, ddof=1).sum() / N ** 2)
acc = correct.mean(axis=1)
even, odd = correct[:, 0::2].mean(axis=1), correct[:, 1::2].mean(axis=1)
bitmaps = [list(np.packbits(row, bitorder="little")) for row in correct]

# Per-epoch spread: 5 seeds x 3 epochs.
curves = np.round(np.array([[0.5, 0.8, 0.9]]) + 0.02 * rng.standard_normal((5, 3)), 4)
epochs = []
for e in range(3):
    col = curves[:, e]
    q1, med, q3 = np.quantile(col, [0.25, 0.5, 0.75])
    epochs.append({"epoch": e + 1, "n": 5, "mean": col.mean(), "std": col.std(ddof=1),
                   "min": col.min(), "max": col.max(), "q1": q1, "median": med, "q3": q3})

ref = {
    "sweep": {"seeds": seeds.tolist(), "scores": scores.tolist()},
    "summary": s,
    "z": z.tolist(),
    "robust_z": robust.tolist(),
    "best_of_k": best_of_k(scores, [1, 2, 3, 5, 8, 14]),
    "bonett_std": bonett(scores),
    "mean_ci_t": list(stats.t.interval(0.95, len(scores) - 1, loc=s["mean"],
                                       scale=s["std"] / math.sqrt(len(scores)))),
    "compare": {"a": a.tolist(), "b": b.tolist(), "difference": a.mean() - b.mean(),
                "ci": [a.mean() - b.mean() - half, a.mean() - b.mean() + half],
                "welch_t": welch.statistic, "welch_df": df, "welch_p": welch.pvalue,
                "mann_whitney_u": mw.statistic, "mann_whitney_p": mw.pvalue,
                "prob_a_beats_b": beats},
    "crossed": {"cells": cells, "components": components},
    "bitmaps": {"examples": N, "bitmaps": [[int(v) for v in b] for b in bitmaps],
                "accuracy": acc.tolist(),
                "binomial_std": math.sqrt(acc.mean() * (1 - acc.mean()) / N),
                "observed_std": acc.std(ddof=1),
                "independent_errors_std": math.sqrt(indep_var),
                "distribution_var": dist_var,
                "split_half_correlation": stats.pearsonr(even, odd).statistic},
    "epochs": {"curves": curves.tolist(), "spread": epochs},
}


def plain(v):
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


with open(OUT, "w") as f:
    json.dump(plain(ref), f, indent=1)
    f.write("\n")
print("wrote", os.path.normpath(OUT))
