"""The study's PNG plots (matplotlib, Agg backend: no display needed).

Bar charts put the precision on the x axis and one bar per model and bias mode;
line charts colour by precision. Every plot pools what it does not show (seeds,
batch norm, ...) and says so in its caption.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import analysis as A
from .config import PRECISIONS

PRECISION_COLORS = {
    "float64": "#1b6ca8",
    "float32": "#2a9d55",
    "bfloat16": "#e07b00",
    "float16": "#c0392b",
}
GROUP_COLORS = {
    ("mlp", "fused"): "#9ecae1",
    ("mlp", "separate"): "#3182bd",
    ("cnn", "fused"): "#fdae6b",
    ("cnn", "separate"): "#d95f0e",
}
BIAS_NAMES = {"fused": "bias fused", "separate": "matmul + bias"}
MODEL_NAMES = {"mlp": "MLP", "cnn": "CNN"}
DPI = 110
Figure = tuple[str, str, str]  # file name, title, caption


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "axes.axisbelow": True,
            "grid.alpha": 0.3,
            "legend.fontsize": 9,
            "legend.frameon": False,
        }
    )
    return plt


def _present(records: list[dict[str, Any]], field: str, order: tuple) -> list:
    seen = {r["key"][field] for r in records}
    return [v for v in order if v in seen]


def _select(records, **key) -> list[dict[str, Any]]:
    return [r for r in records if all(r["key"][k] == v for k, v in key.items())]


def make_all(records: list[dict[str, Any]], directory: Path) -> list[Figure]:
    """Write every plot into `directory`; return (file name, title, caption) per plot."""
    directory.mkdir(parents=True, exist_ok=True)
    alts = A.alt_names(records)
    alt = alts[0] if alts else None
    out = []
    if alt is not None:
        out.append(bifurcation(records, alt, directory / "bifurcation.png"))
    if any(r["watch"] for r in records):
        out.append(kink_hits(records, directory / "kink_hits.png"))
    out.append(divergence(records, alt, directory / "divergence.png"))
    out.append(accuracy(records, alt, directory / "accuracy.png"))
    for name in A.certified_names(records):
        fig = crossings(records, name, directory / "crossings.png")
        if fig is not None:
            out.append(fig)
        break  # one certified policy per study is plotted
    return out


def _grouped_bars(ax, records, groups, precisions, value, *, log=False, marker=None):
    """Bars of value(records of group and precision) at x = precision; `marker`, if
    given, draws a second value as a black bar-wide tick (e.g. effective hits)."""
    width = 0.8 / max(1, len(groups))
    tops = []
    for gi, (model, bias) in enumerate(groups):
        for pi, p in enumerate(precisions):
            rs = _select(records, model=model, bias=bias, precision=p)
            if not rs:
                continue
            x = pi + (gi - (len(groups) - 1) / 2) * width
            v = value(rs)
            label = f"{MODEL_NAMES[model]}, {BIAS_NAMES[bias]}" if pi == 0 else None
            color = GROUP_COLORS.get((model, bias), "grey")
            if v != v:
                continue
            if v > 0 or not log:
                ax.bar(x, v, width * 0.9, color=color, edgecolor="#333", lw=0.5, label=label)
                tops.append(v)
            else:
                ax.bar(x, 0, width * 0.9, color=color, label=label)
            if v == 0:
                ax.annotate(
                    "0",
                    (x, 0),
                    xycoords=("data", "axes fraction"),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    fontsize=8,
                    color="#444",
                )
            if marker is not None:
                m = marker(rs)
                if m == m and (m > 0 or not log):
                    ax.plot(x, m, ls="", marker="D", ms=6, color="black", mec="white", mew=1)
    ax.set_xticks(range(len(precisions)), precisions)
    ax.set_xlim(-0.5, len(precisions) - 0.5)
    if log and tops:  # all zero (a tiny grid): a log axis has nothing to show
        ax.set_yscale("log")
        lo = 10 ** math.floor(math.log10(min(tops))) / 3
        hi = 10 ** math.ceil(math.log10(max(tops)) + 0.3)
        ax.set_ylim(lo, hi)
    return tops


def bifurcation(records, alt, path: Path) -> Figure:
    plt = _plt()
    precisions = _present(records, "precision", PRECISIONS)
    groups = [g for g in GROUP_COLORS if _select(records, model=g[0], bias=g[1])]
    bns = _present(records, "batchnorm", (False, True))
    fig, axes = plt.subplots(
        1, len(bns), figsize=(max(8.5, 5.2 * len(bns)), 4.4), squeeze=False, sharey=True
    )
    for ax, bn in zip(axes[0], bns, strict=True):
        rs = _select(records, batchnorm=bn)
        _grouped_bars(ax, rs, groups, precisions, lambda g: 100 * A.cell(g, alt)["differ_fraction"])
        ax.set_ylim(0, 108)
        ax.set_title(f"{'with' if bn else 'without'} batch norm")
    axes[0][0].set_ylabel("minibatches where the gradient changed (%)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    label = records[0]["policies"][alt]
    fig.suptitle(
        f"How often does the choice at the kink change the gradient?\n"
        f"{records[0]['policies']['ref']} vs {label} at the same weights, same minibatch "
        "(bitwise, any parameter)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return (
        path.name,
        "Share of minibatches where the kink choice changed the gradient",
        "Both policies' gradients are computed at the same weights on the same minibatch "
        "and compared bit for bit (Bertoin et al.'s bifurcation test, applied to every "
        "minibatch); pooled over seeds and epochs.",
    )


def kink_hits(records, path: Path) -> Figure:
    plt = _plt()
    precisions = _present(records, "precision", PRECISIONS)
    kinds = [("relu", "ReLU inputs exactly 0"), ("pool", "max-pool windows with a tied maximum")]
    kinds = [(k, t) for k, t in kinds if any(k in A.counts_by_op(r) for r in records)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.6 * len(kinds) + 1.6, 4.4), squeeze=False)
    for ax, (kind, title) in zip(axes[0], kinds, strict=True):
        rs = [r for r in records if kind in A.counts_by_op(r)]
        groups = [g for g in GROUP_COLORS if _select(rs, model=g[0], bias=g[1])]

        def hits(g, key, kind=kind):
            c = A.cell(g, "alt1")["hits"]
            return 1e6 * A.rate(c, kind, key)

        _grouped_bars(
            ax,
            rs,
            groups,
            precisions,
            lambda g: hits(g, "exact"),
            log=True,
            marker=lambda g: hits(g, "effective"),
        )
        ax.set_title(title)
        ax.set_ylabel("hits per million sites (log)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], ls="", marker="D", ms=5, color="black", mec="white"))
    labels.append("effective hits (upstream\ngradient non-zero)")
    axes[0][-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(
        "How often training sits exactly on a kink (reference run; bars: exact hits, "
        "diamonds: effective hits)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return (
        path.name,
        "Exact kink hits by precision",
        "Bars: exact hits per million sites (ReLU elements, or max-pool windows), reference "
        "run, summed over layers, epochs, seeds and batch-norm settings; '0' marks none. "
        "Black diamonds: effective hits, those whose upstream gradient was non-zero, i.e. where "
        "the choice can change the gradient (for a tied max-pool window: the window's output "
        "gradient was non-zero; whether the change survives the ReLU below is another "
        "matter). Log scale.",
    )


def _median_curve(records, model, precision, name):
    rs = [r for r in _select(records, model=model, precision=precision)]
    rs = [r for r in rs if name in r["curve"]["rel_l2"]]
    if not rs:
        return None, None
    steps = rs[0]["curve"]["step"]
    rows = [r["curve"]["rel_l2"][name] for r in rs if r["curve"]["step"] == steps]
    return steps, [A.median(col) for col in zip(*rows, strict=True)]


def divergence(records, alt, path: Path) -> Figure:
    plt = _plt()
    from matplotlib.lines import Line2D

    models = _present(records, "model", ("mlp", "cnn"))
    precisions = _present(records, "precision", PRECISIONS)
    fig, axes = plt.subplots(
        1, len(models), figsize=(5.2 * len(models) + 2.0, 4.4), squeeze=False, sharey=True
    )
    for ax, model in zip(axes[0], models, strict=True):
        flat = []
        for p in precisions:
            for name, style in ((alt, "-"), ("ulp", "--")):
                if name is None:
                    continue
                steps, ys = _median_curve(records, model, p, name)
                if steps is None:
                    continue
                if not any(y and y > 0 for y in ys):
                    flat.append((name == alt, p))
                    continue
                shown = [y if y and y > 0 else math.nan for y in ys]
                ax.plot(steps, shown, style, color=PRECISION_COLORS.get(p, "grey"), lw=1.7)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        title = MODEL_NAMES.get(model, model)
        for is_kink, what in ((True, "kink pair"), (False, "1-ulp pair")):
            ps = [p for k, p in flat if k == is_kink]
            if ps:
                title += f"\n{what} bit-identical throughout in {', '.join(ps)}"
        ax.set_title(title, fontsize=10)
    axes[0][0].set_ylabel("relative L2 distance of the weights\n(median over configurations)")
    handles = [Line2D([], [], color=PRECISION_COLORS.get(p, "grey"), lw=3) for p in precisions]
    labels = list(precisions)
    handles += [Line2D([], [], color="black", ls="-"), Line2D([], [], color="black", ls="--")]
    labels += ["kink choice", "1-ulp nudge\n(noise floor)"]
    axes[0][-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(
        "How far paired runs drift apart: kink choice (solid) vs one-ulp nudge of one "
        "initial weight (dashed)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return (
        path.name,
        "Divergence of paired runs over training",
        "Relative L2 distance ||w_ref - w_other|| / ||w_ref|| after each step, median over "
        "seeds, bias modes and batch-norm settings. Pairs that stayed bit-identical have "
        "no line (log scale) and are listed in the panel.",
    )


def accuracy(records, alt, path: Path) -> Figure:
    plt = _plt()
    models = _present(records, "model", ("mlp", "cnn"))
    precisions = _present(records, "precision", PRECISIONS)
    names = records[0]["policies"]
    runs = [("ref", names["ref"], "o", "#333333")]
    if alt is not None:
        runs.append((alt, names[alt], "s", "#c0392b"))
    if "ulp" in names:
        runs.append(("ulp", "1-ulp nudge (noise floor)", "^", "#7f8c8d"))
    fig, axes = plt.subplots(2, len(models), figsize=(5.2 * len(models) + 2.2, 7.4), squeeze=False)
    for col, model in enumerate(models):
        ax, dax = axes[0][col], axes[1][col]
        for ri, (name, label, marker, color) in enumerate(runs):
            off = (ri - (len(runs) - 1) / 2) * 0.2
            for pi, p in enumerate(precisions):
                rs = _select(records, model=model, precision=p)
                accs = [100 * r["final"]["test_acc"][name] for r in rs]
                m, sd, _ = A.mean_sd(accs)
                kw = dict(fmt=marker, color=color, capsize=3, ms=6)
                ax.errorbar(pi + off, m, yerr=sd, label=label if pi == 0 else None, **kw)
                if name == "ref":
                    continue
                deltas = [100 * r["pairs"][name]["acc_delta"] for r in rs]
                xs = [pi + off + 0.04 * ((i % 5) - 2) for i in range(len(deltas))]
                dax.scatter(xs, deltas, s=9, color=color, alpha=0.4, lw=0)
                dm, dsd, _ = A.mean_sd(deltas)
                dax.errorbar(pi + off, dm, yerr=dsd, label=label if pi == 0 else None, **kw)
        for a in (ax, dax):
            a.set_xticks(range(len(precisions)), precisions)
            a.set_xlim(-0.5, len(precisions) - 0.5)
        dax.axhline(0, color="black", lw=0.8)
        ax.set_title(f"{MODEL_NAMES.get(model, model)}: final test accuracy")
        dax.set_title(f"{MODEL_NAMES.get(model, model)}: difference to the reference run")
        if col == 0:
            ax.set_ylabel("test accuracy (%), mean ± sd")
            dax.set_ylabel("accuracy difference (points)\npoints: configurations")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[1][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return (
        path.name,
        "Final accuracy by policy and precision",
        "Top: final test accuracy of the reference run, the other policy and the noise-floor "
        "run (mean ± sd over seeds, bias modes and batch-norm settings). Bottom: each "
        "configuration's difference to the reference run of the same seed (small points) and "
        "their mean ± sd.",
    )


def _smooth(ys: list[float], window: int) -> list[float]:
    """Centered moving average (shorter at the ends)."""
    out = []
    h = window // 2
    for i in range(len(ys)):
        part = [v for v in ys[max(0, i - h) : i + h + 1] if math.isfinite(v)]
        out.append(sum(part) / len(part) if part else math.nan)
    return out


def crossings(records, name: str, path: Path) -> Figure | None:
    """Kinks crossed per SGD step (top) and the linearization radius relative to the step
    (bottom) against the step, one line per precision, one column per model."""
    rs = [r for r in records if name in r.get("certified", {})]
    if not any(r["certified"][name]["series"]["step"] for r in rs):
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    models = _present(rs, "model", ("mlp", "cnn"))
    precisions = _present(rs, "precision", PRECISIONS)
    fig, axes = plt.subplots(
        2, len(models), figsize=(5.2 * len(models) + 2.0, 7.0), squeeze=False, sharex="col"
    )
    window = 1
    for col, model in enumerate(models):
        ax, rax = axes[0][col], axes[1][col]
        for p in precisions:
            steps, cols = A.certified_series(_select(rs, model=model, precision=p), name)
            if not steps:
                continue
            window = max(1, len(steps) // 15) | 1
            color = PRECISION_COLORS.get(p, "grey")
            # float64 dashed and on top: it often coincides with float32
            bold = dict(color=color, lw=1.8, ls=(0, (4, 2)) if p == "float64" else "-")
            bold["zorder"] = 3 if p == "float64" else 2
            ys = [float(v) for v in cols["crossings"]]
            ax.plot(steps, ys, color=color, lw=0.6, alpha=0.25)
            ax.plot(steps, _smooth(ys, window), **bold)
            radius = [v if v > 0 else math.nan for v in cols["radius"]]
            rax.plot(steps, radius, color=color, lw=0.6, alpha=0.25)
            logs = [math.log10(v) if math.isfinite(v) else math.nan for v in radius]
            rax.plot(steps, [10**v for v in _smooth(logs, window)], **bold)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{MODEL_NAMES.get(model, model)}: kinks crossed per SGD step")
        rax.set_yscale("log")
        rax.axhline(1, color="black", lw=0.8, ls="--")
        rax.set_title(f"{MODEL_NAMES.get(model, model)}: first kink reached after ... of the step")
        rax.set_xlabel("training step")
        if col == 0:
            ax.set_ylabel("kinks crossed (median over configurations)")
            rax.set_ylabel("linearization radius / step\n(median; 1 = whole step linear)")
    handles = [
        Line2D(
            [],
            [],
            color=PRECISION_COLORS.get(p, "grey"),
            lw=2.5,
            ls="--" if p == "float64" else "-",
        )
        for p in precisions
    ]
    labels = list(precisions)
    handles.append(Line2D([], [], color="grey", lw=0.6, alpha=0.5))
    labels.append("per step")
    axes[0][-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    label = rs[0]["policies"][name]
    fig.suptitle(
        f"Does an SGD step stay on one linear piece? Kinks crossed by the update of the "
        f"`{label}` run",
        fontsize=11,
    )
    fig.tight_layout()
    _save_paletted(fig, path)
    plt.close(fig)
    return (
        path.name,
        "Kinks crossed per SGD step",
        "The certified run's optimizer update (new minus old weights) at each measured step: "
        "top, how many kink-op inputs reach a kink along it (ReLU inputs crossing 0, "
        "max-pool windows whose maximum changes hands), first-order prediction from one "
        "forward-mode pass; bottom, the fraction of the step after which the first one is "
        "reached (log scale; the dashed black line is the whole step). Faint: median over "
        f"configurations per step; bold: moving average over {window} steps. float64 is "
        "dashed and drawn over float32: where no green shows, the two coincide.",
    )


def _save_paletted(fig, path: Path, colors: int = 64) -> None:
    """Save as a PNG with a `colors`-colour palette: a third of the size for plots of
    many thin, translucent lines, with no visible difference."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(
            path, optimize=True
        )
