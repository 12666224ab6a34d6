"""Compiled training step (torch.compile, inductor) under `kg.policy(relu=1.0)` and under
`kg.watch(model)`, each against the same compiled step of plain PyTorch.

All variants are compiled before timing and run interleaved in one process; the ratio
of medians is printed (>= 30 timed steps each). The limit is plain PyTorch: the same
inductor kernels, so the policy's ideal cost is what its extra `where`s fuse into.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

import kinkgrad as kg

from .timing import MODELS, interleaved, report, training_step

GOALS = {"policy": {"large": 1.02, "small": 1.05}, "watch": {"large": 1.05, "small": 1.15}}
POLICY = "kg.policy(relu=1.0), compiled"
WATCH = "kg.watch(model), compiled"
PLAIN = "plain PyTorch, compiled"


def compiled_step(
    sizes: tuple[int, ...],
    batch: int,
    around_forward: Callable[[torch.nn.Module], AbstractContextManager] | None = None,
    backend: str = "inductor",
) -> Callable[[], None]:
    """One SGD step on a fresh `mlp(sizes)` whose forward is `torch.compile`d; the
    forward (and loss) runs inside `around_forward(model)`."""
    return training_step(sizes, batch, around_forward, compile_backend=backend)


def main(steps: int = 40, extra: list[str] | None = None) -> dict[str, float]:
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    out = {}
    # Policy rows first: kg.watch installs global module hooks, which change how every
    # compiled module is called while they exist.
    for kind, label, around in (
        ("policy", POLICY, lambda model: kg.policy(relu=1.0)),
        ("watch", WATCH, functools.cache(kg.watch)),
    ):
        for title, (sizes, batch) in MODELS.items():
            size = "large" if sizes[1] >= 1024 else "small"
            medians = interleaved(
                {PLAIN: compiled_step(sizes, batch), label: compiled_step(sizes, batch, around)},
                steps=steps,
                warmup=3,
            )
            title = f"compiled training step (inductor), {title}"
            ratios = report(title, medians, PLAIN, GOALS[kind][size])
            out[f"{kind}, {title}"] = ratios[label]
    return out
