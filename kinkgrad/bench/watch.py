"""Training step (forward, loss, zero_grad, backward, SGD step) inside `kg.watch(model)`
vs the same step in plain PyTorch, interleaved in one process, ratio of medians.

Cases per model: the whole step inside the watched block, entered anew every step (the
optimizer's step inside it, issue 10's case); the same with one block around
`STEPS_PER_BLOCK` steps (a training loop inside one `with`, the usual form); and only
the forward and loss inside the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kinkgrad as kg

from .timing import MODELS, interleaved, mlp

GOALS = {"large": 1.05, "small": 1.35}
STEPS_PER_BLOCK = 10


def _setup(sizes: tuple[int, ...], batch: int):
    model = mlp(sizes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)
    return model, opt, x, y


def _variant(sizes: tuple[int, ...], batch: int, how: str, per_call: int):
    """A callable running `per_call` training steps; `how` says what is watched."""
    model, opt, x, y = _setup(sizes, batch)
    w = kg.watch(model)

    def step() -> None:
        if how == "forward":
            with w:
                loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run() -> None:
        if how == "block":
            with w:
                for _ in range(per_call):
                    step()
        elif how == "step":
            for _ in range(per_call):
                with w:
                    step()
        else:
            for _ in range(per_call):
                step()

    return run


def main(steps: int = 40, extra: list[str] | None = None) -> dict[str, float]:
    out = {}
    cases = {
        "whole step watched, block per step": ("step", 1),
        f"whole step watched, one block per {STEPS_PER_BLOCK} steps": ("block", STEPS_PER_BLOCK),
        "forward and loss watched": ("forward", 1),
    }
    for title, (sizes, batch) in MODELS.items():
        goal = GOALS["large" if sizes[1] >= 1024 else "small"]
        print(f"watch overhead, training step, {title} (ratio of medians to plain PyTorch)")
        for name, (how, per_call) in cases.items():
            medians = interleaved(
                {
                    "plain": _variant(sizes, batch, "plain", per_call),
                    "watched": _variant(sizes, batch, how, per_call),
                },
                steps=steps,
            )
            r = medians["watched"] / medians["plain"]
            mark = "met" if r <= goal else "NOT met"
            print(f"  {name:<48} {r:6.3f}x  (goal <= {goal:.2f}: {mark})")
            out[f"{title}: {name}"] = r
    return out
