"""Linearization radius and kink crossings along a direction, from one forward-mode
pass: `kinkgrad.linearization` (a function) and `kinkgrad.kink_crossings` (a training
step of a module)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._inputs import (
    _as_direction,
    _check_inputs,
    _cuda_devices,
    _module_runner,
    _rng_preserved,
    _rng_state,
    _trainable,
)
from ._pieces import _INF
from ._session import _running, _Session

# --------------------------------------------------------------------------------------
# Linearization radius and kink crossings along a direction
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linearization:
    """How far the linear model of f holds along a direction.

    **Fields**: `radius`: the smallest step t > 0 at which some kink-op input reaches a
    kink (a tie, a jump) along the direction, inf if none; up to it every kink op stays
    on one piece, so a piecewise-linear f is exactly linear on [0, radius] (for other f
    the times are first-order predictions from the tangents). `crossings`: how many
    such events happen within `step` (elements x kink points; for ties, pairs of the
    selected element with another, neighbours for sort). `kinks_hit`: elements on a kink
    at the point itself. `by_op`: op -> radius, crossings, hits.
    """

    radius: float
    crossings: int
    step: float
    kinks_hit: int
    by_op: dict[str, dict[str, float]]


def _linearization(session: _Session, step: float) -> Linearization:
    by_op: dict[str, dict[str, float]] = {}
    for name, radius, crossings, hits in session.probes:
        row = by_op.setdefault(name, {"radius": _INF, "crossings": 0, "hits": 0})
        row["radius"] = min(row["radius"], radius)
        row["crossings"] += crossings
        row["hits"] += hits
    radius = min((r["radius"] for r in by_op.values()), default=_INF)
    crossings = int(sum(r["crossings"] for r in by_op.values()))
    hits = int(sum(r["hits"] for r in by_op.values()))
    return Linearization(radius, crossings, step, hits, by_op)


def linearization(
    f: Callable[..., Any], *inputs: Tensor, direction: Any, step: float = 1.0
) -> Linearization:
    """Linearization radius of f at `inputs` along `direction`, from one forward-mode
    pass (the kink-op inputs and their tangents).

    >>> import torch, kinkgrad as kg
    >>> lin = kg.linearization(lambda x: torch.relu(x - 1.0).sum(), torch.zeros(2),
    ...                        direction=torch.tensor([1.0, 0.5]))
    >>> lin.radius, lin.crossings                  # x reaches 1 at t = 1 (first element)
    (1.0, 1)
    """
    who = "kinkgrad.linearization"
    xs = [x.detach() for x in _check_inputs(inputs, who, need_grad=False)]
    ds = _as_direction(direction, xs, None, who)
    session = _Session("probe", step=step)
    with torch.no_grad(), fwAD.dual_level(), _running(session, watchers=False):
        f(*[fwAD.make_dual(x, d) for x, d in zip(xs, ds, strict=True)])
    return _linearization(session, step)


def kink_crossings(
    loss_fn: Callable[..., Tensor],
    model: torch.nn.Module,
    *batch: Any,
    direction: Mapping[str, Tensor] | Sequence[Tensor],
    step: float = 1.0,
) -> Linearization:
    """How many kinks the step params -> params + step * direction crosses, predicted
    from the tangents of one forward-mode pass of `loss_fn(model, *batch)`; and the
    linearization radius along the direction. For a training step, pass the update
    (new minus old parameters) and step=1. RNG state and buffers are left as they were.

    **Arguments**: `direction`: dict parameter name -> tensor (all trainable
    parameters) or a sequence in `model.named_parameters()` order.
    """
    who = "kinkgrad.kink_crossings"
    named = _trainable(model, who)
    ds = _as_direction(direction, [p for _, p in named], [n for n, _ in named], who)
    devices = _cuda_devices(named)
    session = _Session("probe", step=step)
    with _rng_preserved(devices):
        run_dual = _module_runner(loss_fn, model, named, batch, _rng_state(devices), devices)
        with torch.no_grad(), fwAD.dual_level(), _running(session, watchers=False):
            run_dual(ds)
    return _linearization(session, step)
