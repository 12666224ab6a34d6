"""Interleaved timing: every variant runs once per round, in rotating order, so drifts
of a shared, noisy machine hit all variants alike; ratios of medians are reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn

#: The two models every capability is benchmarked on (see the issues).
MODELS = {
    "large MLP 784-1024-1024-10, batch 256": ((784, 1024, 1024, 10), 256),
    "small MLP 64-128-128-10, batch 64": ((64, 128, 128, 10), 64),
}


def mlp(sizes: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def training_step(
    sizes: tuple[int, ...],
    batch: int,
    around_forward: Callable[[nn.Module], AbstractContextManager] | None = None,
    compile_backend: str | None = None,
) -> Callable[[], None]:
    """One SGD training step on a fresh `mlp(sizes)` and a fixed random batch; the
    forward (and loss) runs inside `around_forward(model)`, called anew every step; with
    `compile_backend`, the model's forward is `torch.compile`d with that backend."""
    import torch.nn.functional as F

    model = mlp(sizes)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)

    def step() -> None:
        with around_forward(model) if around_forward else nullcontext():
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def interleaved(
    variants: dict[str, Callable[[], object]], steps: int = 40, warmup: int = 5
) -> dict[str, float]:
    """Median seconds per call of each variant, timed round-robin."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(steps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def report(title: str, medians: dict[str, float], baseline: str, goal: float | None = None) -> dict:
    """Print ratios against `baseline` and return them."""
    base = medians[baseline]
    ratios = {n: m / base for n, m in medians.items()}
    print(f"{title}")
    for n, r in ratios.items():
        mark = ""
        if goal is not None and n != baseline:
            verdict = "met" if r <= goal else "NOT met"
            mark = f"  (goal <= {goal:.2f}: {verdict})"
        print(f"  {n:<40} {r:6.3f}x{mark}")
    return ratios
