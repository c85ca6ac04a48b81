#!/usr/bin/env python3
"""Compares two distributions of per-epoch test accuracy over seeds (bench/fidelity.sh): the
worker's and the PyTorch reference's. Standard library only.

Each input is a file of lines `seed epoch test_accuracy`. Prints, for the final epoch: n, mean,
std, min, max of each; the difference of means in units of the combined standard error
sqrt(s1^2/n1 + s2^2/n2); Welch's t-test and the Mann-Whitney U test (normal approximation with
the tie correction), both two-sided; then the per-epoch mean curves side by side. Exits 1 when
the means are more than 3 combined standard errors apart or either test gives p < 0.01.

    python3 bench/compare_dists.py WORKER_FILE REFERENCE_FILE [--label NAME]
"""
import argparse
import math
import statistics
import sys
from collections import defaultdict


def read(path):
    curves = defaultdict(dict)
    for line in open(path):
        if line.strip():
            seed, epoch, acc = line.split()
            curves[int(seed)][int(epoch)] = float(acc)
    return curves


def betacf(a, b, x):
    """Continued fraction of the regularised incomplete beta function (Numerical Recipes)."""
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + aa / c
            c = c if abs(c) > 1e-300 else 1e-300
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a, b, x):
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log(1 - x))
    if x < (a + 1) / (a + b + 2):
        return front * betacf(a, b, x) / a
    return 1.0 - front * betacf(b, a, 1 - x) / b


def welch(x, y):
    """Welch's t statistic, its degrees of freedom and the two-sided p-value."""
    vx, vy = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
    if vx + vy == 0:
        return 0.0, float("inf"), 1.0
    t = (statistics.fmean(x) - statistics.fmean(y)) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    return t, df, betainc(df / 2, 0.5, df / (df + t * t))


def mann_whitney(x, y):
    """U of x and the two-sided p-value (normal approximation, tie-corrected)."""
    pooled = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks, ties, i = [0.0] * len(pooled), 0.0, 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    n1, n2 = len(x), len(y)
    r1 = sum(r for r, (_, g) in zip(ranks, pooled) if g == 0)
    u = r1 - n1 * (n1 + 1) / 2
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:
        return u, 1.0
    z = (abs(u - n1 * n2 / 2) - 0.5) / math.sqrt(var)
    return u, math.erfc(max(z, 0) / math.sqrt(2))


def describe(v):
    return (f"n={len(v):3d} mean={statistics.fmean(v):.4f} std={statistics.stdev(v):.4f} "
            f"min={min(v):.4f} max={max(v):.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("worker")
    p.add_argument("reference")
    p.add_argument("--label", default="")
    a = p.parse_args()
    w, r = read(a.worker), read(a.reference)
    last = max(max(c) for c in w.values())
    if any(max(c) != last for c in list(w.values()) + list(r.values())):
        sys.exit("error: the runs do not all end at the same epoch")
    x = [c[last] for c in w.values()]
    y = [c[last] for c in r.values()]
    if len(x) < 2 or len(y) < 2:
        sys.exit("error: need at least two seeds on each side")
    se = math.sqrt(statistics.variance(x) / len(x) + statistics.variance(y) / len(y))
    diff = statistics.fmean(x) - statistics.fmean(y)
    t, df, p_t = welch(x, y)
    u, p_u = mann_whitney(x, y)
    within = se == 0 and diff == 0 or se > 0 and abs(diff) <= 3 * se
    print(f"== {a.label} final test accuracy (epoch {last})")
    print(f"worker    {describe(x)}")
    print(f"reference {describe(y)}")
    print(f"difference {diff:+.4f} = {diff / se if se else 0:+.2f} combined standard errors "
          f"({se:.4f}); Welch t={t:+.2f} df={df:.1f} p={p_t:.3f}; Mann-Whitney U={u:.1f} p={p_u:.3f}")
    print("epoch  worker_mean  reference_mean  difference")
    for e in sorted(next(iter(w.values()))):
        we = [c[e] for c in w.values() if e in c]
        re_ = [c[e] for c in r.values() if e in c]
        if we and re_:
            mw, mr = statistics.fmean(we), statistics.fmean(re_)
            print(f"{e:5d}  {mw:11.4f}  {mr:14.4f}  {mw - mr:+10.4f}")
    ok = within and p_t >= 0.01 and p_u >= 0.01
    print("verdict:", "same distribution (within 3 SE, no significant difference)" if ok
          else "DIFFERENT")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
