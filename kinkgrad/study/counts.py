"""The one adapter between the study and `kinkgrad.watch`.

The study needs, per run and epoch, kink-hit counts per layer (module path and op).
`StepCounter` opens a watcher around one training step of one run and folds its
records into running totals; everything else in the study reads the totals only.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..watch import watch
from ..watch_report import COUNTS

#: Counted per (module, op), as `kinkgrad.watch` records them ("sites": where a hit can
#: happen; "samples": batch rows with an exact hit).
KEYS = COUNTS
Counts = dict[str, dict[str, int]]  # "module:op" -> key -> count


class StepCounter:
    """Counts of one run: one watcher, entered around each of the run's training steps
    (forward + backward) and read once per epoch. Entering only around the run's own
    steps keeps other runs' calls, made in between, out of its counts."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True) -> None:
        self.model = model
        self.enabled = enabled
        self.watcher: Any = None

    def step(self) -> AbstractContextManager:
        """Watch one forward + backward of `model` (the backward must run inside)."""
        if not self.enabled:
            return nullcontext()
        if self.watcher is None:
            self.watcher = watch(self.model)
        return self.watcher

    def reset(self, all_ranks: bool = False) -> Counts:
        """Counts since the last reset, per "module:op", summed over steps (and over
        ranks with `all_ranks`, a collective every rank must call); then start again."""
        if self.watcher is None:
            return {}
        records = self.watcher.records(all_ranks=all_ranks)
        self.watcher = None
        totals: Counts = {}
        for r in records:
            d = totals.setdefault(f"{r['module']}:{r['op']}", dict.fromkeys(KEYS, 0))
            for k in KEYS:
                d[k] += int(r.get(k) or 0)
        return totals


def total(counts: Counts) -> dict[str, int]:
    """Sum over layers."""
    out = dict.fromkeys(KEYS, 0)
    for d in counts.values():
        for k in KEYS:
            out[k] += d.get(k, 0)
    return out
