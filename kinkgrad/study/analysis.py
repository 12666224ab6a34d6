"""Numbers the report, the plots and the terminal table share, from result records."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from .config import BIAS_MODES, MODELS, PRECISIONS

Record = dict[str, Any]


def op_kind(op: str) -> str:
    """'relu' for ReLU-like kinks, 'pool' for max-pool ties, else the op name."""
    if "pool" in op:
        return "pool"
    return "relu" if "relu" in op else op


def counts_by_op(rec: Record, run: str = "ref") -> dict[str, dict[str, int]]:
    """The run's kink counts summed over epochs and layers, per op kind."""
    out: dict[str, dict[str, int]] = {}
    for ep in rec["epochs"]:
        for layer, d in ep["counts"].get(run, {}).items():
            kind = op_kind(layer.rsplit(":", 1)[-1])
            t = out.setdefault(kind, defaultdict(int))
            for k, v in d.items():
                t[k] += v
    return {k: dict(v) for k, v in out.items()}


def counts_by_layer(rec: Record, run: str = "ref") -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for ep in rec["epochs"]:
        for layer, d in ep["counts"].get(run, {}).items():
            t = out.setdefault(layer, defaultdict(int))
            for k, v in d.items():
                t[k] += v
    return {k: dict(v) for k, v in out.items()}


def mean_sd(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count; NaN if empty."""
    vs = [v for v in values if v is not None and math.isfinite(v)]
    if not vs:
        return math.nan, math.nan, 0
    return statistics.fmean(vs), statistics.stdev(vs) if len(vs) > 1 else 0.0, len(vs)


def median(values: Iterable[float | None]) -> float:
    vs = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vs) if vs else math.nan


def alt_names(records: list[Record]) -> list[str]:
    names: list[str] = []
    for r in records:
        names += [n for n, p in r["pairs"].items() if p["kind"] == "policy" and n not in names]
    return names


def group(records: list[Record], *fields: str) -> dict[tuple, list[Record]]:
    """Records grouped by key fields, groups in PRECISIONS order where it applies."""
    out: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        out[tuple(r["key"][f] for f in fields)].append(r)

    rank = {v: i for i, v in enumerate((*MODELS, *PRECISIONS, *BIAS_MODES))}
    order = lambda k: tuple((rank.get(v, 99), str(v)) if isinstance(v, str) else (0, v) for v in k)
    return dict(sorted(out.items(), key=lambda kv: order(kv[0])))


def cell(records: list[Record], alt: str) -> dict[str, Any]:
    """Every number the report quotes, for a set of configurations."""
    hits = defaultdict(lambda: defaultdict(int))
    for r in records:
        for kind, d in counts_by_op(r, "ref").items():
            for k, v in d.items():
                hits[kind][k] += v
    steps = sum(r["steps"] for r in records)
    pol = [r["pairs"].get(alt) for r in records if alt in r["pairs"]]
    ulp = [r["pairs"].get("ulp") for r in records if "ulp" in r["pairs"]]
    differ = sum(p["same_weights_differ"] for p in pol)
    differ_first = sum(p["same_weights_differ_first_layer"] for p in pol)
    acc = lambda run: [r["final"]["test_acc"].get(run) for r in records]
    return {
        "configs": len(records),
        "steps": steps,
        "hits": {k: dict(v) for k, v in hits.items()},
        "differ_fraction": differ / steps if steps and pol else math.nan,
        "differ_fraction_first_layer": differ_first / steps if steps and pol else math.nan,
        "first_epoch_share": (
            sum(bool(p["first_epoch_differs"]) for p in pol) / len(pol) if pol else math.nan
        ),
        "first_epoch_share_first_layer": (
            sum(bool(p["first_epoch_differs_first_layer"]) for p in pol) / len(pol)
            if pol
            else math.nan
        ),
        "acc_ref": mean_sd(acc("ref")),
        "acc_alt": mean_sd(acc(alt)),
        "acc_ulp": mean_sd(acc("ulp")),
        "delta_alt": mean_sd(100 * p["acc_delta"] for p in pol),
        "delta_ulp": mean_sd(100 * p["acc_delta"] for p in ulp),
        "absdelta_alt": mean_sd(100 * abs(p["acc_delta"]) for p in pol),
        "absdelta_ulp": mean_sd(100 * abs(p["acc_delta"]) for p in ulp),
        "rel_l2_alt": median(p["rel_l2"] for p in pol),
        "rel_l2_ulp": median(p["rel_l2"] for p in ulp),
        "diverged_alt": sum(p["first_divergence"] is not None for p in pol),
        "diverged_ulp": sum(p["first_divergence"] is not None for p in ulp),
        "first_div_alt": median(p["first_divergence"] for p in pol),
        "signs_alt": _signs(p["acc_delta"] for p in pol),
        "signs_ulp": _signs(p["acc_delta"] for p in ulp),
        "max_change": max((v[1] for v in where_changed(records, alt).values()), default=0.0),
        "n_alt": len(pol),
        "n_ulp": len(ulp),
    }


def _signs(deltas: Iterable[float | None]) -> tuple[int, int, int]:
    """(lower, higher, unchanged) counts of accuracy differences."""
    ds = [d for d in deltas if d is not None]
    return sum(d < 0 for d in ds), sum(d > 0 for d in ds), sum(d == 0 for d in ds)


def sign_test(lower: int, higher: int) -> float:
    """Two-sided exact binomial sign test: the probability of a split at least this
    lopsided between lower and higher if both were equally likely (ties excluded)."""
    n, k = lower + higher, min(lower, higher)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def holm(pvalues: list[float], family: int | None = None) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given.

    `family` is the number of tests made (precisions x models x measures), when only
    some of them are listed: the missing ones count as p = 1, which is conservative.
    A claim holds at level alpha when its adjusted p-value is below alpha; the family's
    chance of any false claim is then at most alpha.

    >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03])]
    [0.03, 0.06, 0.06]
    """
    m = max(len(pvalues), family or 0)
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out = [1.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def compare_word(a: float, b: float, resolution: float = 0.005) -> str:
    """How mean |change| `a` compares with `b` in words: "more than" only when `a` is
    over twice `b` *and* above `resolution` (what the report prints as 0.00); both at
    or below it (0 vs 0 included) is "as little as", never a ratio of zeros."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return "(not measured) compared with"
    if a <= resolution and b <= resolution:
        return "as little as"
    if a > 2 * b:
        return "more than"
    if b > 2 * a:
        return "less than"
    return "about as much as"


#: Machine epsilon per precision: a relative gradient change within a few dozen of
#: these is a rounding-level difference (the same terms summed in another order).
EPS = {"float64": 2.22e-16, "float32": 1.19e-7, "bfloat16": 7.81e-3, "float16": 9.77e-4}
ROUNDING = 64


def rate(hits: dict[str, dict[str, int]], kind: str, key: str = "exact") -> float:
    d = hits.get(kind) or {}
    n = d.get("sites") or d.get("elements")
    return d.get(key, 0) / n if n else math.nan


def where_changed(records: list[Record], alt: str) -> dict[str, tuple[int, float]]:
    """Parameter -> (minibatches where its gradient changed with the policy at the same
    weights, largest change relative to the largest entry of the whole gradient)."""
    out: dict[str, list] = {}
    for r in records:
        for ep in r["epochs"]:
            for name, (n, rel) in ep.get("same_weights_by_param", {}).get(alt, {}).items():
                c = out.setdefault(name, [0, 0.0])
                c[0] += n
                c[1] = max(c[1], rel if rel is not None else math.inf)
    return {k: (v[0], v[1]) for k, v in out.items()}


# --------------------------------------------------------------------------------------
# certified runs: certification and kink crossings of SGD steps
# --------------------------------------------------------------------------------------


def certified_names(records: list[Record]) -> list[str]:
    """Runs of certifying policies (those with a "certified" section), in first-seen order."""
    names: list[str] = []
    for r in records:
        names += [n for n in r.get("certified", {}) if n not in names]
    return names


def certified_cell(records: list[Record], name: str) -> dict[str, Any]:
    """The certified run `name`'s numbers pooled over `records` (those that have it):
    steps, certification (and why not), kinks hit, and the kink crossings of its SGD
    steps (per measured step: mean, max, share crossing >= 1, median radius relative to
    the step), with ReLU sign changes per ReLU input where the watch counted sites."""
    rs = [r for r in records if name in r.get("certified", {})]
    keys = (
        "steps",
        "certified_steps",
        "uncertified_steps",
        "uncertified_jumps",
        "uncertified_unresolved",
        "kinks_hit",
        "unresolved",
        "jumps_hit",
        "tangent_passes",
        "immaterial",
        "measured_steps",
        "crossings",
        "crossing_steps",
    )
    out: dict[str, Any] = dict.fromkeys(keys, 0)
    by_op: dict[str, int] = defaultdict(int)
    undecided: dict[str, int] = defaultdict(int)
    per_step: list[int] = []
    radii: list[float] = []
    relu_sites = relu_steps = 0
    for r in rs:
        c = r["certified"][name]
        for k in keys:
            out[k] += c.get(k) or 0
        for op, n in c.get("crossings_by_op", {}).items():
            by_op[op_kind(op)] += n
        for op, v in c.get("by_op", {}).items():
            undecided[op] += v.get("unresolved", 0)
        s = c.get("series", {})
        per_step += s.get("crossings", [])
        radii += [math.inf if v is None else v for v in s.get("radius", [])]
        relu = counts_by_op(r, name).get("relu")
        if relu and c.get("measured_steps"):
            relu_sites += relu.get("sites") or relu.get("elements", 0)
            relu_steps += r["steps"]
    m = out["measured_steps"]
    out["configs"] = len(rs)
    dirs = sorted({str(r["certified"][name].get("max_directions") or "?") for r in rs})
    out["max_directions"] = "/".join(dirs) if dirs else "n/a"
    out["crossings_by_op"] = dict(by_op)
    out["undecided_by_op"] = {k: v for k, v in undecided.items() if v}
    out["crossings_mean"] = out["crossings"] / m if m else math.nan
    out["crossings_max"] = max(per_step) if per_step else math.nan
    out["crossing_share"] = out["crossing_steps"] / m if m else math.nan
    out["stay_share"] = 1 - out["crossing_share"] if m else math.nan
    out["radius_median"] = statistics.median(radii) if radii else math.nan
    out["certified_share"] = out["certified_steps"] / out["steps"] if out["steps"] else math.nan
    # ReLU inputs per step, and the share of them that change sign during a step
    out["relu_sites_per_step"] = relu_sites / relu_steps if relu_steps else math.nan
    relu_mean = by_op.get("relu", 0) / m if m else math.nan
    out["relu_crossings_mean"] = relu_mean
    out["relu_crossing_rate"] = (
        relu_mean / out["relu_sites_per_step"] if relu_steps and relu_sites else math.nan
    )
    return out


def certified_series(records: list[Record], name: str) -> tuple[list[int], dict[str, list]]:
    """Per measured step, the median over `records` of crossings and radius (configs
    whose series have the same steps; others are left out)."""
    rs = [r for r in records if name in r.get("certified", {})]
    if not rs:
        return [], {}
    steps = rs[0]["certified"][name]["series"]["step"]
    same = [r["certified"][name]["series"] for r in rs]
    same = [s for s in same if s["step"] == steps]
    cols = {}
    for k in ("crossings", "radius"):
        rows = [[math.inf if v is None else v for v in s[k]] for s in same]
        cols[k] = [statistics.median(col) for col in zip(*rows, strict=True)]
    return steps, cols
