"""The PNG of `Watcher.plot`: kink hits per step and layer, readable from 1 to 200 layers.

A layer is one (module path, op, dtype) of the records. Two views, because a line per
layer stops being readable after ten or so:

- three line panels (exact, effective, near hits per step) with the `TOP` layers of
  most hits, each in its own colour, and the rest summed into one grey line;
- a heat map of exact hits, one row per layer (all of them, in model order), one column
  per step; white where there is none. Its height grows with the number of rows, so
  row labels never overlap; long module paths are shortened in the middle (the full
  path is in `records()`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from .watch_report import _write

#: Layers drawn as their own line; the rest are summed into one.
TOP = 8
#: Rows of the heat map; beyond, the layers of fewest hits are summed into one row.
MAX_ROWS = 200
#: Columns of the heat map; a longer run is summed into columns of several steps.
MAX_COLUMNS = 1000
#: Longest label; a longer one keeps its start and end ("layer4.1…conv2 : relu").
LABEL_CHARS = 44
PANELS = (
    ("exact", "exact hits"),
    ("effective", "effective hits\n(upstream grad != 0)"),
    ("near", "near hits\n(within tolerance)"),
)


def shorten(text: str, limit: int = LABEL_CHARS) -> str:
    """`text` within `limit` characters: the longest names inside a dotted module path
    are cut first ("enco….stage0.block12.atte….some….conv : relu"); indices and the
    last name only if that is not enough; failing that, the middle goes."""
    if len(text) <= limit:
        return text
    path, sep, rest = text.partition(" : ")
    parts = path.split(".")
    keep = [len(p) for p in parts]  # characters kept per part, a "…" included
    fixed = len(parts) - 1 + len(sep) + len(rest)
    # Names inside the path go first; indices ("block12", "3") and the last name last.
    inner = [i for i, p in enumerate(parts[:-1]) if not any(c.isdigit() for c in p)]
    for pool in (inner, range(len(parts))):
        while pool and sum(keep) + fixed > limit:
            i = max(pool, key=keep.__getitem__)  # the longest part loses one character
            if keep[i] <= 4:
                break
            keep[i] -= 1
    if sum(keep) + fixed <= limit:
        cut = [p if k == len(p) else p[: k - 1] + "…" for p, k in zip(parts, keep, strict=True)]
        return ".".join(cut) + sep + rest
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


def _layers(records: list[dict[str, Any]]) -> dict[str, dict[int, list[int]]]:
    """layer label -> step -> [exact, effective, near], in the records' (model) order."""
    layers: dict[str, dict[int, list[int]]] = {}
    several = len({r.get("dtype") for r in records}) > 1  # else the dtype says nothing
    for r in records:
        name = f"{r['module']} : {r['op']}"
        if several and r.get("dtype"):
            name += f" ({r['dtype']})"
        acc = layers.setdefault(name, {}).setdefault(int(r["step"]), [0] * len(PANELS))
        for i, (key, _) in enumerate(PANELS):
            acc[i] += int(r.get(key) or 0)
    return layers


def plot(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Write the PNG (atomically) and return its path. See the module docstring."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    layers = _layers(records)
    heading = title or "kinkgrad.watch: kink hits per step"
    rows = min(len(layers), MAX_ROWS)
    heat_height = 0.5 + 0.16 * max(rows, 4)  # inches: 0.16 in per row fits an 8 pt label
    lines_height = 2.1 * len(PANELS)
    fig = Figure(figsize=(12, lines_height + heat_height + 1.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if not layers:
        ax = fig.subplots()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no catalog op calls recorded", ha="center", va="center")
    else:
        axes = fig.subplots(
            len(PANELS) + 1,
            1,
            gridspec_kw={"height_ratios": [2.1] * len(PANELS) + [heat_height]},
        )
        steps = sorted({s for per in layers.values() for s in per})
        _lines(axes[: len(PANELS)], layers, steps)
        _heat_map(fig, axes[-1], layers, steps)
    fig.suptitle(heading)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    _write(path, png.getvalue())
    return path


def _ranked(layers: dict[str, dict[int, list[int]]]) -> list[str]:
    """Layers by hits (exact, then effective, then near), most first; ties keep order."""
    order = {name: i for i, name in enumerate(layers)}

    def key(name: str) -> tuple:
        totals = [sum(v[i] for v in layers[name].values()) for i in range(len(PANELS))]
        return (-totals[0], -totals[1], -totals[2], order[name])

    return sorted(layers, key=key)


def _lines(axes: Any, layers: dict[str, dict[int, list[int]]], steps: list[int]) -> None:
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    ranked = _ranked(layers)
    shown, rest = ranked[:TOP], ranked[TOP:]
    if len(rest) == 1:  # one more line is clearer than an "other (1 layer)" line
        shown, rest = ranked, []
    palette = colormaps["tab10"]
    colors = [palette(i) for i in range(10) if i != 7]  # tab10's grey is for "other"
    markers = "os^Dv<>ph*"
    series: list[tuple[str, list[list[int]], Any, str | None]] = []
    for i, name in enumerate(shown):
        ys = [layers[name].get(s, [0] * len(PANELS)) for s in steps]
        series.append((shorten(name), ys, colors[i % len(colors)], markers[i % len(markers)]))
    if rest:
        ys = [
            [sum(layers[n].get(s, [0] * len(PANELS))[c] for n in rest) for c in range(len(PANELS))]
            for s in steps
        ]
        series.append((f"other {len(rest)} layers (sum)", ys, "0.55", None))
    for col, (ax, (_, label)) in enumerate(zip(axes, PANELS, strict=True)):
        top = 0
        for name, ys, color, marker in series:
            values = [y[col] for y in ys]
            top = max(top, *values)
            ax.plot(
                steps,
                values,
                label=name,
                color=color,
                marker=marker if len(steps) <= 60 else None,
                markersize=4,
                linewidth=1.4,
                linestyle="--" if marker is None else "-",
            )
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(0, max(10, top * 1.5))  # 0, 1, 10, ... on a symlog axis
        ax.set_ylabel(f"{label}\n(log scale)", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        total = sum(sum(v[col] for v in per.values()) for per in layers.values())
        ax.set_title(f"total {total:,}", loc="right", fontsize=9)
        if col < len(PANELS) - 1:
            ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("step")
    axes[0].legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        title=f"module : op ({min(len(layers), TOP)} of {len(layers)} layers by hits)",
        title_fontsize=8,
        frameon=False,
    )


def _heat_map(fig: Any, ax: Any, layers: dict[str, dict[int, list[int]]], steps: list[int]) -> None:
    import numpy as np
    from matplotlib.colors import LogNorm

    names = list(layers)  # model order
    if len(names) > MAX_ROWS:  # keep the layers of most hits, in model order
        keep = set(_ranked(layers)[: MAX_ROWS - 1])
        rest = [n for n in names if n not in keep]
        names = [n for n in names if n in keep]
    else:
        rest = []
    # One column per step from the first to the last (steps without a record are
    # empty); a long run is summed into at most MAX_COLUMNS columns of `width` steps.
    first, span = steps[0], steps[-1] - steps[0] + 1
    width = -(-span // MAX_COLUMNS)
    grid = np.zeros((len(names) + bool(rest), -(-span // width)))
    for i, name in enumerate(names):
        for s, v in layers[name].items():
            grid[i, (s - first) // width] += v[0]
    labels = [shorten(n) for n in names]
    if rest:
        for n in rest:
            for s, v in layers[n].items():
                grid[-1, (s - first) // width] += v[0]
        labels.append(f"other {len(rest)} layers (sum)")
    masked = np.ma.masked_equal(grid, 0)
    peak = max(grid.max(), 1.0)
    image = ax.imshow(
        masked,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        norm=LogNorm(vmin=1, vmax=max(peak, 10)),
        extent=(first - 0.5, first + grid.shape[1] * width - 0.5, len(labels) - 0.5, -0.5),
    )
    ax.set_facecolor("white")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("step" if width == 1 else f"step ({width} steps per column)")
    ax.set_title(
        f"exact hits per step, every layer in model order ({len(layers)}; white: none)",
        loc="left",
        fontsize=9,
    )
    # Below the map: at its right, the colour bar would sit beyond the legend's margin.
    fig.colorbar(
        image, ax=ax, location="bottom", label="exact hits (log scale)", shrink=0.5, aspect=40
    )
