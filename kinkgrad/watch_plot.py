"""The PNG of `Watcher.plot`: kink hits per step and module, readable for 1 to 200 modules."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from .watch_report import _write


def plot(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """PNG of exact, effective and near hits per step, one line per layer (module and
    op), on a symmetric log scale (linear below 1, so steps without hits sit visibly
    at 0). Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    panels = (
        ("exact", "exact hits"),
        ("effective", "effective hits\n(upstream gradient != 0)"),
        ("near", "near hits\n(within tolerance)"),
    )
    layers: dict[str, dict[int, list[int]]] = {}
    for r in records:
        name = f"{r['module']} : {r['op']}"
        if r.get("dtype"):
            name += f" ({r['dtype']})"
        acc = layers.setdefault(name, {}).setdefault(int(r["step"]), [0] * len(panels))
        for i, (key, _) in enumerate(panels):
            acc[i] += int(r.get(key) or 0)

    fig = Figure(figsize=(11, 9), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True)
    heading = title or "kinkgrad.watch: kink hits per step"
    if not layers:
        for ax in axes:
            ax.set_axis_off()
        axes[0].text(0.5, 0.5, "no catalog op calls recorded", ha="center", va="center")
    else:
        steps = sorted({s for per in layers.values() for s in per})
        ranked = sorted(layers, key=lambda n: -sum(v[0] for v in layers[n].values()))
        colors = _colors(len(ranked))
        markers = "os^Dv<>ph*"
        for col, (ax, (_, label)) in enumerate(zip(axes, panels, strict=True)):
            top = 0
            for i, name in enumerate(ranked):
                ys = [layers[name].get(s, [0] * len(panels))[col] for s in steps]
                top = max(top, *ys)
                ax.plot(
                    steps,
                    ys,
                    label=name,
                    color=colors[i],
                    marker=markers[i % len(markers)] if len(steps) <= 60 else None,
                    markersize=4,
                    linewidth=1.4,
                )
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(0, max(10, top * 1.5))  # 0, 1, 10, ... on a symlog axis
            ax.set_ylabel(f"{label}\n(log scale)")
            ax.grid(True, which="major", alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            total = sum(sum(v[col] for v in layers[n].values()) for n in ranked)
            ax.set_title(f"total {total:,}", loc="right", fontsize=9)
        axes[-1].set_xlabel("step")
        axes[0].legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            title="module : op",
            title_fontsize=8,
            frameon=False,
        )
    fig.suptitle(heading)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    _write(path, png.getvalue())
    return path


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
