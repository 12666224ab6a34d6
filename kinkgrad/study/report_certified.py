"""The report's sections on the certified run: certified gradients, and how many kinks
each SGD step crosses (does a step stay within one linear region?)."""

from __future__ import annotations

from typing import Any

from . import analysis as A
from .render import Block, count, pct, pm, sci


def _num(x: float) -> str:
    if x != x:
        return "n/a"
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _seeds_text(records: list[dict[str, Any]], name: str) -> str:
    with_run = sorted({r["key"]["seed"] for r in records if name in r.get("certified", {})})
    every = sorted({r["key"]["seed"] for r in records})
    if with_run == every:
        return "every configuration"
    return f"seed {', '.join(map(str, with_run))} of every configuration"


def certified_headline(records, models, precisions) -> list[str]:
    """The opening bullet on certified gradients and the linear region of SGD steps."""
    out = []
    for name in A.certified_names(records):
        rs = [r for r in records if name in r.get("certified", {})]
        if not any(r["certified"][name].get("measured_steps") for r in rs):
            continue
        label = rs[0]["policies"][name]
        cells = {
            (m, p): A.certified_cell(_sel(rs, m, p), name)
            for m in models
            for p in precisions
            if _sel(rs, m, p)
        }
        pooled = {m: A.certified_cell(_sel(rs, m), name) for m in models if _sel(rs, m)}
        ps = {m: [p for p in precisions if (m, p) in cells] for m in pooled}
        steps = sum(c["measured_steps"] for c in pooled.values())
        stayed = sum(c["measured_steps"] - c["crossing_steps"] for c in pooled.values())
        if stayed == 0:
            stay = f"none of the {count(steps)} measured, in any model and precision"
        else:
            stay = "; ".join(
                f"{m.upper()} "
                + ", ".join(f"{p} {pct(cells[(m, p)]['stay_share'])}" for p in ps[m])
                for m in pooled
            )
        cross = "; ".join(
            f"{m.upper()} "
            + ", ".join(f"{p} {_num(cells[(m, p)]['crossings_mean'])}" for p in ps[m])
            + f" (at most {_num(c['crossings_max'])})"
            for m, c in pooled.items()
        )
        radius, flips = [], []
        for m, c in pooled.items():
            radius.append(f"{m.upper()} {pct(c['radius_median'])}")
            if c["relu_crossing_rate"] == c["relu_crossing_rate"]:
                flips.append(
                    f"{m.upper()} {_num(c['relu_crossings_mean'])} of "
                    f"{count(round(c['relu_sites_per_step']))} ({pct(c['relu_crossing_rate'])})"
                )
        every = sorted({r["certified"][name].get("crossings_every") for r in rs})
        when = "every step" if every == [1] else f"every {'/'.join(map(str, every))}th step"
        text = (
            "**Does an SGD step stay within the linear region?** A run trained with certified "
            f"gradients (`{label}`: `kinkgrad.certified_backward` instead of `loss.backward()`, "
            f"in lockstep with the others, {_seeds_text(records, name)}) counted at {when} "
            "the kinks its update crosses (`kinkgrad.kink_crossings` along new minus old "
            "weights: ReLU inputs reaching 0, max-pool maxima changing hands). Steps that "
            f"cross no kink: {stay}. Kinks crossed per step, mean: {cross}. The first kink "
            "is reached after (median) " + ", ".join(radius) + " of the step"
        )
        if stayed < steps:
            text += (
                ": only that far does the network stay on one piece, where the loss is "
                "smooth and the gradient's first-order model applies"
            )
            if flips:
                text += (
                    "; yet over the whole step few inputs change piece: the ReLU inputs that "
                    "cross 0 are, per minibatch, " + ", ".join(flips)
                )
        text += ". Certification: " + "; ".join(
            f"{m.upper()} {_cert_text(c)}" for m, c in pooled.items()
        )
        out.append(text + ".")
    return out


def _sel(records, model: str, precision: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r["key"]["model"] == model and (precision is None or r["key"]["precision"] == precision)
    ]


def _cert_text(c: dict[str, Any]) -> str:
    n, ok = c["steps"], c["certified_steps"]
    hits = c["kinks_hit"]
    if ok == n:
        text = f"all {count(n)} steps certified"
        decided = f" ({count(hits)} exact kink hits, all decided or immaterial)"
        return text + (decided if hits else "")
    text = f"{count(ok)} of {count(n)} steps certified"
    bad = []
    if c["uncertified_unresolved"]:
        ops = ", ".join(f"{op} {count(k)}" for op, k in sorted(c["undecided_by_op"].items()))
        bad.append(
            f"{count(c['uncertified_unresolved'])} had undecided kinks ({count(c['unresolved'])} "
            f"of {count(hits)} exact hits{': ' + ops if ops else ''}; their inputs do not move "
            f"along any of the {c['max_directions']} directions tried, so no direction "
            "decides them)"
        )
    if c["uncertified_jumps"]:
        bad.append(f"{count(c['uncertified_jumps'])} had a jump op on its jump")
    return text + ("; " + ", ".join(bad) if bad else "")


def certified_tables(records, models, precisions) -> list[Block]:
    names = A.certified_names(records)
    if not names:
        return []
    blocks: list[Block] = [("h2", "Certified gradients and the kinks an SGD step crosses")]
    for name in names:
        rs = [r for r in records if name in r.get("certified", {})]
        label = rs[0]["policies"][name]
        rows = []
        for (m, p, b, bn), group in A.group(rs, "model", "precision", "bias", "batchnorm").items():
            c = A.certified_cell(group, name)
            pairs = [r["pairs"][name] for r in group if name in r["pairs"]]
            differ = sum(q.get("same_weights_differ", 0) for q in pairs)
            steps = sum(r["steps"] for r in group)
            rows.append(
                [
                    m.upper(),
                    p,
                    b,
                    "yes" if bn else "no",
                    str(c["configs"]),
                    f"{count(c['certified_steps'])} / {count(c['steps'])}",
                    f"{count(c['uncertified_unresolved'])} / {count(c['uncertified_jumps'])}",
                    count(c["kinks_hit"]),
                    f"{_num(c['crossings_mean'])} / {_num(c['crossings_max'])}",
                    pct(c["crossing_share"]),
                    sci(c["radius_median"]),
                    pct(differ / steps) if steps and pairs else "n/a",
                    _pm1(A.mean_sd(100 * q["acc_delta"] for q in pairs)),
                ]
            )
        blocks += [
            (
                "p",
                f"`{label}`: trained with `kinkgrad.certified_backward` (directions seeded from "
                "the configuration's seed and the step) in lockstep with the other runs. "
                "'certified': steps whose gradient was certified (every kink met decided by a "
                "direction or immaterial, no jump op on its jump); 'not certified': steps with "
                "undecided kinks / with a jump op on its jump. An immaterial kink is one whose "
                "inputs do not move apart along any random direction tried (an element on a "
                "kink with a zero tangent, tied inputs with equal tangents): in a "
                "piecewise-linear program equal tangents along a random direction mean equal "
                "gradients on the current piece with probability one, so PyTorch's choice "
                "there cannot change the result (counted apart as 'immaterial'; 6 directions "
                "in float16/bfloat16, where rounding can make different tangents equal, 2 "
                "otherwise)"
                + _undecided_note(A.certified_cell(rs, name))
                + ". 'kink hits': elements exactly on a kink (ReLU "
                "inputs at 0, tied "
                "max-pool windows) that the certified gradient met. 'crossed': kinks crossed "
                "by the SGD step along the update it applied (mean / max per step), and the "
                "share of steps crossing at least one. 'radius': the fraction of the step "
                "after which the first kink is reached, median over steps (>= 1 would mean "
                "the whole step stays on one linear piece). 'gradient changed': share of "
                "minibatches whose certified gradient differs bitwise from the reference "
                "policy's at the same weights. Δacc: final test accuracy minus the reference "
                "run's, points.",
            ),
            (
                "table",
                [
                    "model",
                    "precision",
                    "bias",
                    "BN",
                    "configs",
                    "certified",
                    "not certified (undecided / jump)",
                    "kink hits",
                    "crossed per step (mean / max)",
                    "steps crossing >= 1",
                    "radius / step (median)",
                    "gradient changed",
                    "Δacc (points)",
                ],
                rows,
            ),
        ]
    return blocks


def _undecided_note(c: dict[str, Any]) -> str:
    undecided = c.get("undecided_by_op") or {}
    total = sum(undecided.values())
    pool = sum(n for op, n in undecided.items() if "pool" in op)
    if not total or not pool:
        return ""
    share = "all" if pool == total else pct(pool / total, 0)
    return (
        f"; here {share} of them are max-pool windows whose tied inputs have equal tangents "
        "along every direction tried (for example windows of ReLU outputs that are all 0, "
        "which do not move at all; frequent on the digits' blank background)"
    )


def _pm1(ms: tuple[float, float, int]) -> str:
    """mean ± sd, or the value alone for one configuration."""
    return f"{ms[0]:+.2f}" if ms[2] == 1 else pm(ms)
