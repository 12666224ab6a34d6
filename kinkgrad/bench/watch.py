"""Training step (forward, backward, SGD) under `kg.watch(model)` vs plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kinkgrad as kg

from .timing import MODELS, interleaved, mlp, report

GOALS = {"large": 1.10, "small": 1.50}


def _step(sizes: tuple[int, ...], batch: int, use_watch: bool):
    model = mlp(sizes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)
    w = kg.watch(model)

    def step() -> None:
        if use_watch:
            with w:
                loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(steps: int = 40, extra: list[str] | None = None) -> dict[str, float]:
    out = {}
    for title, (sizes, batch) in MODELS.items():
        medians = interleaved(
            {
                "plain PyTorch": _step(sizes, batch, False),
                "kg.watch(model)": _step(sizes, batch, True),
            },
            steps=steps,
        )
        goal = GOALS["large" if sizes[1] >= 1024 else "small"]
        ratios = report(f"watch overhead, training step, {title}", medians, "plain PyTorch", goal)
        out[title] = ratios["kg.watch(model)"]
    return out
