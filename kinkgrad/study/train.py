"""One configuration of the study: paired runs trained in lockstep.

For a configuration (model, precision, bias mode, batch norm, seed) the study trains,
side by side on the same minibatches:

- `ref`: the reference policy (default ReLU'(0) = 0, max-pool ties to the first
  element, which is PyTorch's own choice);
- `alt1`, `alt2`, ...: the other policies (default ReLU'(0) = 1 with ties split);
- `ulp`: the noise floor, the reference policy from initial weights that differ from
  `ref`'s in one weight by one ulp (`torch.nextafter`).

All runs start from the same initial weights (drawn once from a seeded
`torch.Generator`), see the same minibatches in the same order (one seeded generator
for the permutations) and make no other random draw, so the policy (or the nudge) is
the only difference. At every step the study compares gradients bit for bit:

- *at the same weights*: on `ref`'s current weights it also computes the gradient under
  each other policy (on a shadow copy, so nothing else changes). Bertoin et al.'s test:
  in what share of minibatches does the choice at the kink change the gradient?
- *between the independent runs*: the first step at which their gradients differ (from
  then on the weights differ) and how far apart the weights drift (max |diff| and
  relative L2), for the policy pairs and for the noise-floor pair alike.

Precision on CPU: parameters, optimizer state and data are cast to the precision and
every op runs in it (no autocast, no master weights, no loss scaling; Adam's eps is
raised to 1e-4 in float16, where 1e-8 is not representable). That is the simplest
faithful setting for "how often does low-precision training sit on a kink".
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .config import RunKey, StudyConfig
from .counts import StepCounter, watch_available
from .data import Dataset
from .policies import REGISTRY, Policy, kink_policy

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: At most this many points of each per-step divergence curve are kept in a result.
CURVE_POINTS = 200


def policies(cfg: StudyConfig) -> list[Policy]:
    """The study's policies in run order; the first is the reference."""
    out = [kink_policy(k, t) for k, t in zip(cfg.kinks, cfg.ties, strict=True)]
    out += [REGISTRY[name]() for name in cfg.extra_policies]
    return out


@dataclass
class _Run:
    name: str  # "ref", "alt1", ..., "ulp"
    policy: Policy
    module: nn.Module
    model: nn.Module  # `module`, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    counter: StepCounter
    loss_sum: float = 0.0
    batches: int = 0
    nonfinite_steps: int = 0
    first_divergence: int | None = None


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _optimizer(cfg: StudyConfig, params, dtype: torch.dtype) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        eps = 1e-4 if dtype == torch.float16 else 1e-8
        return torch.optim.Adam(params, lr=cfg.learning_rate, eps=eps)
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def _differ(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[bool, bool]:
    """(any parameter's gradient differs bitwise, the first layer's weight gradient does)."""
    first = not torch.equal(a[0], b[0])
    return first or any(not torch.equal(x, y) for x, y in zip(a[1:], b[1:], strict=True)), first


def _where(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[int, float]:
    """Parameters whose gradients differ bitwise -> the largest difference relative to
    the largest entry of the whole reference gradient (the change's size; relative to
    the parameter's own gradient it would blow up for gradients that are 0 in exact
    arithmetic, such as a bias followed by batch norm)."""
    out = {}
    scale = max(float(x.abs().max()) for x in a if x.numel())
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if not torch.equal(x, y):
            diff = float((x.double() - y.double()).abs().max())
            out[i] = diff / scale if scale > 0 else math.inf
    return out


def _nudge(module: nn.Module) -> None:
    """Move one initial weight up by one ulp of its dtype: the output layer's first
    weight, which every input reaches (a first-layer weight could sit on an input
    pixel that is always 0, as digits' corners are, and then never matter)."""
    w = models.last_layer(module)
    with torch.no_grad():
        flat = w.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(math.inf, dtype=w.dtype, device=w.device))


@torch.no_grad()
def _evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = module.training
    module.eval()
    try:
        pred = module(x).argmax(1)
    finally:
        module.train(was)
    return float((pred == y).double().mean())


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def run_config(
    cfg: StudyConfig,
    key: RunKey,
    data: Dataset,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train the paired runs of one configuration; return its result record (without
    the bookkeeping fields `results.py` adds). Deterministic on CPU: the same `cfg`
    and `key` give bit-identical numbers."""
    started, cpu = time.perf_counter(), time.process_time()
    rank, world = _dist()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible whatever the machine; --jobs parallelises
    try:
        record = _train(cfg, key, data, rank, world, on_step)
    finally:
        torch.set_num_threads(threads)
    record["elapsed_s"] = round(time.perf_counter() - started, 3)
    record["cpu_s"] = round(time.process_time() - cpu, 3)  # less sensitive to a busy machine
    return record


def _train(cfg, key, data, rank, world, on_step) -> dict[str, Any]:
    dtype = DTYPES[key.precision]
    device = torch.device(cfg.device if cfg.device == "cpu" else f"cuda:{_local_device()}")
    g_init = torch.Generator().manual_seed(key.seed)
    g_data = torch.Generator().manual_seed(1_000_003 + key.seed)

    # One draw of the initial weights; every run copies it.
    base = models.build(
        key.model,
        data.shape,
        data.classes,
        width=cfg.width,
        channels=cfg.channels,
        bias=key.bias,
        batchnorm=key.batchnorm,
        generator=g_init,
    ).to(device=device, dtype=dtype)
    make = lambda: copy.deepcopy(base)

    def wrap(module: nn.Module) -> nn.Module:
        if world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=None if device.type == "cpu" else [device])

    pols = policies(cfg)
    specs = [("ref", pols[0])] + [(f"alt{i}", p) for i, p in enumerate(pols[1:], start=1)]
    if cfg.noise_floor:
        specs.append(("ulp", pols[0]))
    runs: list[_Run] = []
    for name, pol in specs:
        module = make()
        if name == "ulp":
            _nudge(module)
        module.train()
        runs.append(
            _Run(
                name,
                pol,
                module,
                wrap(module),
                _optimizer(cfg, module.parameters(), dtype),
                StepCounter(module, enabled=name != "ulp"),
            )
        )
    ref, others = runs[0], runs[1:]
    alts = [r for r in others if r.name != "ulp"]
    names = [n for n, _ in ref.module.named_parameters()]
    shadow = make()
    shadow.train()
    shadow_model = wrap(shadow)

    x_train = data.x_train.to(device=device, dtype=dtype)
    y_train = data.y_train.to(device)
    x_test = data.x_test.to(device=device, dtype=dtype)
    y_test = data.y_test.to(device)
    n = len(y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    stride = max(1, math.ceil(total_steps / CURVE_POINTS))
    curve_steps: list[int] = []
    curves: dict[str, list[float]] = {r.name: [] for r in others}
    epochs: list[dict[str, Any]] = []
    same_total = {r.name: [0, 0] for r in alts}  # steps differing: any param, first layer
    step = 0

    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n, generator=g_data).to(device)
        same = {r.name: [0, 0] for r in alts}
        by_param: dict[str, dict[str, list]] = {r.name: {} for r in alts}
        for r in runs:
            r.loss_sum, r.batches, r.nonfinite_steps = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            if world > 1:
                idx = idx[rank::world]
            x, y = x_train[idx], y_train[idx]

            # 1. the same weights under every other policy (shadow copy of ref)
            same_grads = {}
            if alts:
                with torch.no_grad():
                    for p_s, p_r in zip(shadow.parameters(), ref.module.parameters(), strict=True):
                        p_s.copy_(p_r)
                for alt in alts:
                    shadow.zero_grad(set_to_none=True)
                    alt.policy.grad(shadow_model, F.cross_entropy, x, y, step=step)
                    same_grads[alt.name] = _grads(shadow)

            # 2. every run's own step
            grads = {}
            for r in runs:
                r.opt.zero_grad(set_to_none=True)
                with r.counter.step():
                    loss = r.policy.grad(r.model, F.cross_entropy, x, y, step=step)
                value = float(loss)
                if math.isfinite(value):
                    r.loss_sum += value
                else:
                    r.nonfinite_steps += 1
                r.batches += 1
                grads[r.name] = _grads(r.module)

            # 3. compare bit for bit
            for alt in alts:
                where = _where(grads["ref"], same_grads[alt.name])
                same[alt.name][0] += bool(where)
                same[alt.name][1] += 0 in where
                for i, rel in where.items():
                    c = by_param[alt.name].setdefault(names[i], [0, 0.0])
                    c[0] += 1
                    c[1] = max(c[1], rel)
            for r in others:
                if r.first_divergence is None and _differ(grads["ref"], grads[r.name])[0]:
                    r.first_divergence = step

            # 4. step, then how far apart the runs are
            for r in runs:
                r.opt.step()
            step += 1
            if step % stride == 0 or step == total_steps:
                theta = _flat(ref.module)
                norm = float(theta.norm())
                curve_steps.append(step)
                for r in others:
                    curves[r.name].append(float((_flat(r.module) - theta).norm()) / norm)
            if on_step is not None:
                on_step(step, total_steps)

        # per-epoch record
        theta = _flat(ref.module)
        distance = {}
        for r in others:
            diff = _flat(r.module) - theta
            distance[r.name] = {
                "max_abs": _finite(float(diff.abs().max())),
                "rel_l2": _finite(float(diff.norm() / theta.norm())),
            }
        losses = torch.tensor([[r.loss_sum, r.batches - r.nonfinite_steps] for r in runs])
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(losses)
        counts = {r.name: r.counter.reset(all_ranks=world > 1) for r in runs if r.name != "ulp"}
        for name, (a, f) in same.items():
            same_total[name][0] += a
            same_total[name][1] += f
        epochs.append(
            {
                "epoch": epoch,
                "steps": steps_per_epoch,
                "train_loss": {
                    r.name: _finite(float(losses[i, 0] / losses[i, 1])) if losses[i, 1] else None
                    for i, r in enumerate(runs)
                },
                "nonfinite_loss_steps": {r.name: r.nonfinite_steps for r in runs},
                "test_acc": {r.name: _evaluate(r.module, x_test, y_test) for r in runs},
                "counts": counts,
                "same_weights_differ": {k: v[0] for k, v in same.items()},
                "same_weights_differ_first_layer": {k: v[1] for k, v in same.items()},
                # parameter -> [minibatches where its gradient differed, largest change
                # relative to the largest entry of the whole gradient]
                "same_weights_by_param": by_param,
                "distance": distance,
                "first_divergence": {r.name: r.first_divergence for r in others},
            }
        )

    last = epochs[-1]
    pairs = {}
    for r in others:
        pair = {
            "kind": "noise" if r.name == "ulp" else "policy",
            "label": "one-ulp nudge" if r.name == "ulp" else r.policy.name,
            "first_divergence": r.first_divergence,
            "acc_delta": last["test_acc"][r.name] - last["test_acc"]["ref"],
            **last["distance"][r.name],
        }
        if r.name in same_total:
            pair["same_weights_differ"] = same_total[r.name][0]
            pair["same_weights_differ_first_layer"] = same_total[r.name][1]
            pair["differ_fraction"] = same_total[r.name][0] / total_steps
            pair["first_epoch_differs"] = epochs[0]["same_weights_differ"][r.name] > 0
            pair["first_epoch_differs_first_layer"] = (
                epochs[0]["same_weights_differ_first_layer"][r.name] > 0
            )
        pairs[r.name] = pair
    return {
        "policies": {r.name: r.policy.name for r in runs},
        "steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "world_size": world,
        "watch": watch_available(),
        "final": {
            "test_acc": last["test_acc"],
            "train_loss": last["train_loss"],
        },
        "pairs": pairs,
        "epochs": epochs,
        "curve": {"step": curve_steps, "rel_l2": curves},
    }


def _local_device() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))
