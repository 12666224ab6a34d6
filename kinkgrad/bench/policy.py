"""Training step (forward, backward, SGD) under `policy(relu=1.0)` vs plain PyTorch."""

from __future__ import annotations

import kinkgrad as kg

from .timing import MODELS, interleaved, report, training_step

GOALS = {"large": 1.05, "small": 1.30}
LABEL = "kg.policy(relu=1.0)"


def main(steps: int = 40, extra: list[str] | None = None) -> dict[str, float]:
    out = {}
    for title, (sizes, batch) in MODELS.items():
        medians = interleaved(
            {
                "plain PyTorch": training_step(sizes, batch),
                LABEL: training_step(sizes, batch, lambda model: kg.policy(relu=1.0)),
            },
            steps=steps,
        )
        goal = GOALS["large" if sizes[1] >= 1024 else "small"]
        ratios = report(f"policy overhead, training step, {title}", medians, "plain PyTorch", goal)
        out[title] = ratios[LABEL]
    return out
