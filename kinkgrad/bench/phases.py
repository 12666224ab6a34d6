"""Where the time goes: medians of each phase of one training step (entering the block,
forward, loss, leaving the block, zero_grad + backward, SGD step), in µs, for plain
PyTorch, the interception mode alone (`kg.policy(relu="torch")`: nothing changes in the
graph), `kg.policy(relu=1.0)` and `kg.watch(model)`, eager and `torch.compile`d.

Variants run interleaved, in rotating order, in one process. Absolute times depend on
the machine; the differences between rows are the breakdown `kinkgrad bench compiled`
and `kinkgrad bench watch` summarise as one ratio.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

import kinkgrad as kg

from .timing import MODELS, mlp

PHASES = ("enter", "forward", "loss", "exit", "backward", "optimizer")
VARIANTS = ("plain", "mode only", "policy", "watch")


def _step(sizes: tuple[int, ...], batch: int, variant: str, compiled: bool) -> Callable:
    model = mlp(sizes)
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)
    watcher = kg.watch(model) if variant == "watch" else None
    blocks: dict[str, Callable] = {
        "mode only": lambda: kg.policy(relu="torch"),
        "policy": lambda: kg.policy(relu=1.0),
        "watch": lambda: watcher,
    }

    def step() -> tuple[float, ...]:
        t0 = time.perf_counter()
        block = blocks[variant]() if variant in blocks else None
        if block is not None:
            block.__enter__()
        t1 = time.perf_counter()
        out = forward(x)
        t2 = time.perf_counter()
        loss = F.cross_entropy(out, y)
        t3 = time.perf_counter()
        if block is not None:
            block.__exit__(None, None, None)
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t5 = time.perf_counter()
        opt.step()
        t6 = time.perf_counter()
        return (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)

    return step


def main(steps: int = 40, extra: list[str] | None = None) -> dict[str, dict[str, float]]:
    warnings.filterwarnings("ignore", message="Using `torch.compile")  # (watch's global hooks)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    rounds = max(steps, 30) * (5 if steps >= 30 else 1)
    out = {}
    for title, (sizes, batch) in MODELS.items():
        for compiled in (False, True):
            steps_by = {v: _step(sizes, batch, v, compiled) for v in VARIANTS}
            for fn in steps_by.values():
                for _ in range(3):
                    fn()
            times: dict[str, list[tuple[float, ...]]] = {v: [] for v in VARIANTS}
            for r in range(rounds):
                order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
                for v in order:
                    times[v].append(steps_by[v]())
            kind = "torch.compile (inductor)" if compiled else "eager"
            print(f"phases of a training step, µs (medians), {kind}, {title}")
            print(f"  {'':<10}" + "".join(f"{p:>10}" for p in PHASES) + f"{'total':>10}  ratio")
            base = statistics.median(sum(t) for t in times["plain"])
            for v in VARIANTS:
                cols = [statistics.median(c) * 1e6 for c in zip(*times[v], strict=True)]
                total = statistics.median(sum(t) for t in times[v])
                print(
                    f"  {v:<10}"
                    + "".join(f"{c:10.1f}" for c in cols)
                    + f"{total * 1e6:10.1f}  {total / base:.3f}x"
                )
                out[f"{kind}, {title}, {v}"] = dict(zip(PHASES, cols, strict=True))
    return out
