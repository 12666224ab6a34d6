"""Records of `kinkgrad.watch`: summaries, the terminal table, files and the CLI (the
plot is in `watch_plot`).

Everything here works on plain records (lists of dicts, one per step x module x op), so
a saved file renders exactly like a live watcher (`kinkgrad watch-summary PATH`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._files import atomic_write

#: Identify a record.
KEYS = ("step", "module", "op", "dtype")
#: Counted per record. `sites` is where a hit can happen: elements for elementwise ops,
#: windows / reductions / output slots for tie ops.
COUNTS = (
    "calls",
    "elements",
    "sites",
    "exact",
    "effective",
    "near",
    "subnormal",
    "samples",
    "nonfinite",
)
FIELDS = (*KEYS, *COUNTS, "rank")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


@dataclass
class Summary:
    """Counts per (module, op, dtype), summed over steps, and their total.

    `rows` (list of dicts: module, op, dtype, steps, and every count), `total` (one
    dict: steps and every count), `steps` (distinct steps seen), `rank` (this process's
    rank, "all" for an all-ranks sum). A watcher that saw nothing gives `rows == []`,
    zero totals and `bool(summary) is False`; `print(summary)` says so in words.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    total: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    rank: int | str = 0

    @property
    def empty(self) -> bool:
        return not self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def __rich__(self) -> Any:
        return table(self)

    def __str__(self) -> str:
        return render(self)


def summarize(records: Iterable[dict[str, Any]]) -> Summary:
    """Sum records over steps, per (module, op, dtype), in first-seen order."""
    rows: dict[tuple, dict[str, Any]] = {}
    steps_of: dict[tuple, set] = {}
    all_steps: set = set()
    rank: int | str = 0
    for r in records:
        key = (r["module"], r["op"], r.get("dtype", ""))
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"module": key[0], "op": key[1], "dtype": key[2], "steps": 0}
            row.update(dict.fromkeys(COUNTS, 0))
            steps_of[key] = set()
        for c in COUNTS:
            row[c] += int(r.get(c) or 0)
        steps_of[key].add(r["step"])
        all_steps.add(r["step"])
        rank = r.get("rank", rank)
    for key, row in rows.items():
        row["steps"] = len(steps_of[key])
    total = {"steps": len(all_steps), **dict.fromkeys(COUNTS, 0)}
    for row in rows.values():
        for c in COUNTS:
            total[c] += row[c]
    return Summary(list(rows.values()), total, len(all_steps), rank)


# --------------------------------------------------------------------------------------
# Scalars per step (TensorBoard, Lightning)
# --------------------------------------------------------------------------------------

#: Counts written as scalars.
SCALARS = ("exact", "effective", "near")


def top_module(path: str) -> str:
    """The top-level module of a module path: "features" for "features.3.conv"."""
    return path.split(".", 1)[0]


def step_scalars(records: Iterable[dict[str, Any]]) -> dict[int, dict[str, int]]:
    """{step: {tag: value}}: exact, effective and near hits per op, per top-level module
    and in total, tags `kinkgrad/<count>/op/<op>`, `kinkgrad/<count>/module/<module>`,
    `kinkgrad/<count>/total`. Every tag of a step is present, zeros included."""
    out: dict[int, dict[str, int]] = {}
    for r in records:
        tags = out.setdefault(int(r["step"]), {})
        for c in SCALARS:
            v = int(r.get(c) or 0)
            for tag in (
                f"kinkgrad/{c}/op/{r['op']}",
                f"kinkgrad/{c}/module/{top_module(r['module'])}",
                f"kinkgrad/{c}/total",
            ):
                tags[tag] = tags.get(tag, 0) + v
    return out


def summary_writer(folder: str | os.PathLike) -> Any:
    """A TensorBoard SummaryWriter on `folder`, or an ImportError naming the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "kinkgrad: writing TensorBoard event files needs the tensorboard package; "
            "install it with: pip install 'kinkgrad[tensorboard]'"
        ) from e
    return SummaryWriter(str(folder))


# --------------------------------------------------------------------------------------
# Terminal table
# --------------------------------------------------------------------------------------


def _rate(hits: int, sites: int) -> str:
    if not sites:
        return "-"
    return "0" if not hits else f"{hits / sites:.2e}"


def table(summary: Summary, title: str | None = None) -> Any:
    """A rich Table: one line per (module, op, dtype), then the total."""
    from rich.table import Table

    if title is None:
        who = "all ranks" if summary.rank == "all" else f"rank {summary.rank}"
        title = f"kinkgrad.watch: {summary.steps} step(s), {who}"
    t = Table(title=title, title_justify="left", show_footer=bool(summary.rows))
    # fold: a long module path wraps onto more lines, never cut (no ellipsis).
    t.add_column("module", footer="total", overflow="fold")
    t.add_column("op", overflow="fold")
    t.add_column("dtype")
    totals = summary.total
    for c in ("calls", "elements", "exact", "effective", "near", "subnormal", "samples"):
        t.add_column(c, justify="right", footer=f"{totals.get(c, 0):,}")
    t.add_column("nan/inf", justify="right", footer=f"{totals.get('nonfinite', 0):,}")
    t.add_column(
        "exact/site",
        justify="right",
        footer=_rate(totals.get("exact", 0), totals.get("sites", 0)),
    )
    if not summary.rows:
        t.caption = "no catalog op calls recorded"
    for r in summary.rows:
        style = "bold red" if r["exact"] else None
        t.add_row(
            r["module"],
            r["op"],
            r["dtype"],
            *(f"{r[c]:,}" for c in ("calls", "elements", "exact", "effective", "near")),
            f"{r['subnormal']:,}",
            f"{r['samples']:,}",
            f"{r['nonfinite']:,}",
            _rate(r["exact"], r["sites"]),
            style=style,
        )
    return t


def render(summary: Summary, width: int = 140) -> str:
    """The table as plain text (what `print(watcher)` shows)."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(table(summary))
    return buf.getvalue().rstrip("\n")


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _format(path: Path) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"kinkgrad.watch: cannot tell the format of {str(path)!r} from its suffix "
            f"{path.suffix!r}; use one of {', '.join(SUFFIXES)}"
        )
    return fmt


def save(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as JSON Lines or CSV (by suffix), atomically: a temporary file in
    the same folder is renamed over `path`, so readers never see half a file."""
    path = Path(path)
    fmt = _format(path)
    buf = io.StringIO(newline="")
    if fmt == "jsonl":
        for r in records:
            buf.write(json.dumps({k: r[k] for k in FIELDS if k in r}) + "\n")
    else:
        writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    _write(path, buf.getvalue())
    return path


def _write(path: Path, data: str | bytes) -> None:
    (path.parent if str(path.parent) else Path(".")).mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def _typed(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in r.items():
        if k in COUNTS or k == "step":
            out[k] = int(v)
        elif k == "rank":
            out[k] = int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v
        else:
            out[k] = v
    return out


def load(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read records written by `save` (or by `Watcher.save`)."""
    path = Path(path)
    fmt = _format(path)
    with open(path, newline="") as f:
        if fmt == "jsonl":
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = list(csv.DictReader(f))
    missing = [k for k in ("step", "module", "op") if rows and k not in rows[0]]
    if missing:
        raise ValueError(f"kinkgrad.watch: {str(path)!r} is not a watch record file (no {missing})")
    return [_typed(r) for r in rows]


def steps_table(records: list[dict[str, Any]]) -> Any:
    """A rich Table with one line per record (step, module, op, dtype)."""
    from rich.table import Table

    t = Table(title="per step", title_justify="left")
    for c in ("step", "module", "op", "dtype"):
        t.add_column(c, justify="right" if c == "step" else "left", overflow="fold")
    for c in ("calls", "exact", "effective", "near", "subnormal", "samples", "nonfinite"):
        t.add_column(c, justify="right")
    for r in records:
        t.add_row(
            str(r["step"]),
            str(r["module"]),
            str(r["op"]),
            str(r.get("dtype", "")),
            *(f"{int(r.get(c) or 0):,}" for c in ("calls", "exact", "effective", "near")),
            *(f"{int(r.get(c) or 0):,}" for c in ("subnormal", "samples", "nonfinite")),
        )
    return t


def cli(argv: list[str]) -> int:
    """`kinkgrad watch-summary PATH [--steps]`: print a saved record file as a table."""
    parser = argparse.ArgumentParser(
        prog="kinkgrad watch-summary",
        description="Print a kinkgrad.watch record file (.jsonl or .csv) as a table.",
    )
    parser.add_argument("path", help="file written by Watcher.save")
    parser.add_argument(
        "--steps", action="store_true", help="also print one line per step and layer"
    )
    args = parser.parse_args(argv)
    try:
        records = load(args.path)
    except (OSError, ValueError) as e:
        print(f"kinkgrad watch-summary: {e}", file=sys.stderr)
        return 2
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a file or a pipe: wide enough for every column
        console = Console(width=160)
    summary = summarize(records)
    if records:
        summary.rank = records[0].get("rank", 0)
    console.print(table(summary, title=f"{args.path}: {summary.steps} step(s)"))
    if args.steps:
        console.print(steps_table(records))
    return 0
