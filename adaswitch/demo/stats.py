"""Seed statistics of the demo and the ablation: paired per-seed differences (the same seed gives two
methods the same training prompts in the same order and the same initial student, so the difference per
seed removes what the seeds share) with a two-sided 95% paired t-test, and the eval set's sampling noise."""

from __future__ import annotations

import math
import statistics

# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (beyond: the normal's 1.96 is close).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b over the seeds both have: {"mean", "std" (of the per-seed differences), "n", "wins" (seeds
    where a > b), "significant" (95% paired t-test; never with fewer than 2 seeds), "diffs"}."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds if not (math.isnan(a[s]) or math.isnan(b[s]))]
    n = len(diffs)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0, "wins": 0, "significant": False, "diffs": []}
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if n > 1 else math.nan
    if n < 2:
        significant = False
    elif std == 0:
        significant = mean != 0
    else:
        significant = abs(mean) / (std / math.sqrt(n)) > T95.get(n - 1, 1.96)
    return {"mean": mean, "std": std, "n": n, "wins": sum(d > 0 for d in diffs), "significant": significant,
            "diffs": diffs}


def format_paired(p: dict, scale: float = 100.0, digits: int = 1) -> str:
    """"+1.2 ± 0.8 (3/3)*": mean and std of the per-seed differences (points), seeds won, * = significant."""
    if not p or p["n"] == 0:
        return "-"
    std = "" if math.isnan(p["std"]) else f" ± {scale * p['std']:.{digits}f}"
    star = "*" if p["significant"] else ""
    return f"{scale * p['mean']:+.{digits}f}{std} ({p['wins']}/{p['n']}){star}"


def binomial_std(p: float, n: int) -> float:
    """Sampling std of an accuracy p measured on n independent problems."""
    return math.sqrt(p * (1 - p) / n) if n > 0 and 0 <= p <= 1 else math.nan
