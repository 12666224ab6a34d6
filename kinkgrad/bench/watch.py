"""Training step (forward, backward, SGD) under `kg.watch(model)` vs plain PyTorch."""

from __future__ import annotations

import functools

import kinkgrad as kg

from .timing import MODELS, interleaved, report, training_step

GOALS = {"large": 1.10, "small": 1.50}
LABEL = "kg.watch(model)"


def main(steps: int = 40, extra: list[str] | None = None) -> dict[str, float]:
    out = {}
    for title, (sizes, batch) in MODELS.items():
        medians = interleaved(
            {
                "plain PyTorch": training_step(sizes, batch),
                LABEL: training_step(
                    sizes, batch, functools.cache(kg.watch)
                ),  # one watcher, reused
            },
            steps=steps,
        )
        goal = GOALS["large" if sizes[1] >= 1024 else "small"]
        ratios = report(f"watch overhead, training step, {title}", medians, "plain PyTorch", goal)
        out[title] = ratios[LABEL]
    return out
