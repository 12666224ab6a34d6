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

A policy that certifies (`policies.Certified`, `--extra-policies certified`) trains with
`kinkgrad.certified_backward`, its directions seeded from the configuration's seed and
the step. For it the study also records, per step, whether the gradient was certified
(and if not, why: a jump op on its jump, or kinks no direction decided), the kinks hit,
and how many kinks its SGD step crosses: `kinkgrad.kink_crossings` along the update the
optimizer applies (new minus old parameters, step 1), from one forward-mode pass at the
old parameters, with the linearization radius (the fraction of the step after which the
first kink-op input reaches a kink). With `crossings_every` = k > 1 the crossings are
measured every k-th step only (steps 0, k, 2k, ...).

Precision on CPU: parameters, optimizer state and data are cast to the precision and
every op runs in it (no autocast, no master weights, no loss scaling; Adam's eps is
raised to 1e-4 in float16, where 1e-8 is not representable). That is the simplest
faithful setting for "how often does low-precision training sit on a kink".
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..certify import default_directions
from . import models
from .config import RunKey, StudyConfig
from .counts import StepCounter
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
#: At most this many measured steps of a certified run's per-step series are kept.
SERIES_POINTS = 1000


def policies(cfg: StudyConfig, key: RunKey | None = None) -> list[Policy]:
    """The policies of configuration `key` (default: of any) in run order; the first is
    the reference."""
    out = [kink_policy(k, t) for k, t in zip(cfg.kinks, cfg.ties, strict=True)]
    extra = cfg.extra_policies if key is None else cfg.extra_for(key)
    out += [REGISTRY[name]() for name in extra]
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
    cert: _CertStats | None = None  # policies that certify only


class _CertStats:
    """A certified run's per-step numbers: certification (every step) and kink crossings
    of its SGD step (every `every`-th step)."""

    COUNTS = ("kinks_hit", "unresolved", "jumps_hit", "tangent_passes", "immaterial")

    def __init__(self, every: int) -> None:
        self.every = every
        self.series: dict[str, list] = {
            k: [] for k in ("step", "crossings", "radius", "kinks_hit", "certified")
        }
        self.total = self._blank()
        self._totals_lists: dict[str, list] = {"crossings": [], "radius": []}
        self._new_epoch()

    @staticmethod
    def _blank() -> dict[str, Any]:
        return {
            "steps": 0,
            "certified_steps": 0,
            "uncertified_steps": 0,
            "uncertified_jumps": 0,
            "uncertified_unresolved": 0,
            **dict.fromkeys(_CertStats.COUNTS, 0),
            "by_op": {},  # op -> kink hits, undecided
            "crossings_by_op": {},
        }

    def _new_epoch(self) -> None:
        self.epoch = self._blank()
        self._lists: dict[str, list] = {"crossings": [], "radius": []}

    def measures(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def add_step(self, res: Any) -> tuple[bool, int]:
        """Fold in one step's `CertifiedStep` (summed over ranks by the caller)."""
        certified = res["jumps_hit"] == 0 and res["unresolved"] == 0
        for d in (self.epoch, self.total):
            d["steps"] += 1
            d["certified_steps"] += certified
            d["uncertified_steps"] += not certified
            d["uncertified_jumps"] += res["jumps_hit"] > 0
            d["uncertified_unresolved"] += res["unresolved"] > 0
            for k in self.COUNTS:
                d[k] += res[k]
            for op, (hits, unresolved) in res["by_op"].items():
                row = d["by_op"].setdefault(op, {"hits": 0, "unresolved": 0})
                row["hits"] += hits
                row["unresolved"] += unresolved
        return certified, res["kinks_hit"]

    def add_crossings(
        self, step: int, crossings: int, radius: float, by_op: dict, hit: int, cert: bool
    ) -> None:
        for lists in (self._lists, self._totals_lists):
            lists["crossings"].append(crossings)
            lists["radius"].append(radius)
        for d in (self.epoch, self.total):
            for op, n in by_op.items():
                d["crossings_by_op"][op] = d["crossings_by_op"].get(op, 0) + n
        s = self.series
        s["step"].append(step)
        s["crossings"].append(crossings)
        s["radius"].append(_finite(radius))
        s["kinks_hit"].append(hit)
        s["certified"].append(cert)

    @staticmethod
    def _summary(d: dict[str, Any], lists: dict[str, list]) -> dict[str, Any]:
        cs, rs = lists["crossings"], lists["radius"]
        out = dict(d)
        out["crossings_by_op"] = dict(sorted(d["crossings_by_op"].items()))
        out["by_op"] = {k: dict(v) for k, v in sorted(d["by_op"].items())}
        out["measured_steps"] = len(cs)
        out["crossings"] = sum(cs)
        out["crossings_mean"] = sum(cs) / len(cs) if cs else None
        out["crossings_max"] = max(cs) if cs else None
        out["crossing_steps"] = sum(c > 0 for c in cs)
        out["crossing_share"] = sum(c > 0 for c in cs) / len(cs) if cs else None
        # relative to the step (the step is 1 in units of the update); None: no kink is
        # reachable along the update (infinite radius) or nothing was measured
        out["radius_median"] = _finite(statistics.median(rs)) if rs else None
        out["radius_min"] = _finite(min(rs)) if rs else None
        return out

    def end_epoch(self) -> dict[str, Any]:
        out = self._summary(self.epoch, self._lists)
        self._new_epoch()
        return out

    def result(self) -> dict[str, Any]:
        s = self.series
        keep = list(range(len(s["step"])))
        if len(keep) > SERIES_POINTS:
            stride = math.ceil(len(keep) / SERIES_POINTS)
            keep = keep[::stride]
        return {
            "crossings_every": self.every,
            **self._summary(self.total, self._totals_lists),
            "series": {k: [v[i] for i in keep] for k, v in s.items()},
        }


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

    pols = policies(cfg, key)
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
                cert=_CertStats(cfg.crossings_every) if pol.certifies else None,
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
                    alt.policy.grad(shadow_model, F.cross_entropy, x, y, step=step, seed=key.seed)
                    same_grads[alt.name] = _grads(shadow)

            # 2. every run's own step
            grads = {}
            step_cert: dict[str, tuple[bool, int]] = {}
            for r in runs:
                r.opt.zero_grad(set_to_none=True)
                with r.counter.step():
                    out = r.policy.grad(r.model, F.cross_entropy, x, y, step=step, seed=key.seed)
                loss = out
                if r.cert is not None:
                    loss = out.loss
                    step_cert[r.name] = r.cert.add_step(_cert_counts(out, world, device))
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

            # 4. step (measuring the kinks a certified run's step crosses), then how far
            # apart the runs are
            for r in runs:
                if r.cert is not None and r.cert.measures(step):
                    crossings, radius, by_op = _step_crossings(r, shadow, x, y, world)
                    certified, hit = step_cert[r.name]
                    r.cert.add_crossings(step, crossings, radius, by_op, hit, certified)
                else:
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
                **(
                    {"certified": {r.name: r.cert.end_epoch() for r in runs if r.cert}}
                    if any(r.cert for r in runs)
                    else {}
                ),
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
        "watch": True,  # kink-hit counts present (kept for the records and reports that read it)
        "final": {
            "test_acc": last["test_acc"],
            "train_loss": last["train_loss"],
        },
        "pairs": pairs,
        "epochs": epochs,
        "curve": {"step": curve_steps, "rel_l2": curves},
        **(
            {
                "certified": {
                    r.name: {
                        "max_directions": getattr(r.policy, "max_directions", None)
                        or default_directions(DTYPES[key.precision]),
                        **r.cert.result(),
                    }
                    for r in runs
                    if r.cert
                }
            }
            if any(r.cert for r in runs)
            else {}
        ),
    }


def _cert_counts(res: Any, world: int, device: torch.device) -> dict[str, Any]:
    """A `CertifiedStep`'s counts (op -> (hits, undecided) in "by_op"), summed over the
    ranks under DDP (collectives on `device`: NCCL needs CUDA tensors)."""
    counts: dict[str, Any] = {
        "kinks_hit": res.kinks_hit,
        "unresolved": res.unresolved,
        "jumps_hit": res.jumps_hit,
        "tangent_passes": res.directions_used,
        "immaterial": res.immaterial,
    }
    by_op = {op: (v["hits"], v["unresolved"]) for op, v in res.by_op.items()}
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor(list(counts.values()), dtype=torch.int64, device=device)
        dist.all_reduce(t)
        counts = dict(zip(counts, (int(v) for v in t.tolist()), strict=True))
        by_op = _sum_dicts(by_op, world, lambda a, b: (a[0] + b[0], a[1] + b[1]))
    counts["by_op"] = by_op
    return counts


def _sum_dicts(d: dict[str, Any], world: int, add: Callable[[Any, Any], Any]) -> dict[str, Any]:
    """`d` combined over the ranks with `add` (ranks may hold different keys)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, d)
    out: dict[str, Any] = {}
    for part in gathered:
        for k, v in part.items():
            out[k] = add(out[k], v) if k in out else v
    return dict(sorted(out.items()))


def _step_crossings(r: _Run, probe: nn.Module, x, y, world: int):
    """Take run `r`'s optimizer step and return (kink crossings, linearization radius,
    crossings by op) of that step: `kinkgrad.kink_crossings` along the update it applied
    (new minus old parameters, step 1), evaluated at the old parameters, held by
    `probe` (the shadow copy, free at this point of the step). Under DDP the crossings
    of the ranks' shards are summed and the radius is their minimum."""
    from ..certify import kink_crossings

    with torch.no_grad():
        for p_s, p_r in zip(probe.parameters(), r.module.parameters(), strict=True):
            p_s.copy_(p_r)
    r.opt.step()
    with torch.no_grad():
        update = [
            p_r.detach() - p_s.detach()
            for p_s, p_r in zip(probe.parameters(), r.module.parameters(), strict=True)
        ]
    lin = kink_crossings(
        lambda m, x, y: F.cross_entropy(m(x), y), probe, x, y, direction=update, step=1.0
    )
    by_op = {op: int(v["crossings"]) for op, v in lin.by_op.items()}
    crossings, radius = int(lin.crossings), float(lin.radius)
    if world > 1:
        import torch.distributed as dist

        device = next(probe.parameters()).device
        rad = torch.tensor([radius], dtype=torch.float64, device=device)
        dist.all_reduce(rad, op=dist.ReduceOp.MIN)
        radius = float(rad)
        by_op = _sum_dicts(by_op, world, lambda a, b: a + b)
        crossings = sum(by_op.values())
    return crossings, radius, by_op


def _local_device() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))
