"""Arguments of the certified computations: input and output checks, random
directions, and replaying a module's forward (RNG state, buffer copies)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

# --------------------------------------------------------------------------------------
# Directions
# --------------------------------------------------------------------------------------


def _new_seed(seed: int | None) -> int:
    # A fresh seed from the OS, so certification never draws from (or perturbs) torch's
    # global RNG; it is reported, so any result can be reproduced.
    return random.SystemRandom().randrange(2**63) if seed is None else int(seed)


class _Directions:
    """The k-th direction (one tensor per variable), drawn from `seed` in order; the
    first may be given. Standard normal, drawn in float32 on the CPU (five times faster
    than float64, and the same direction for every dtype), then cast."""

    def __init__(self, seed: int, like: Sequence[tuple], first: Sequence[Tensor] | None) -> None:
        self.seed, self.like, self.first = seed, list(like), first
        self.gen: torch.Generator | None = None
        self.drawn: list[tuple[Tensor, ...]] = []

    def __getitem__(self, k: int) -> tuple[Tensor, ...]:
        while len(self.drawn) <= k:
            if not self.drawn and self.first is not None:
                self.drawn.append(tuple(self.first))
                continue
            if self.gen is None:
                self.gen = torch.Generator().manual_seed(self.seed)
            self.drawn.append(
                tuple(
                    torch.randn(shape, generator=self.gen).to(device=device, dtype=dtype)
                    for shape, dtype, device in self.like
                )
            )
        return self.drawn[k]

    def is_random(self, k: int) -> bool:
        """Was the k-th direction drawn at random (not given by the caller)?"""
        return k > 0 or self.first is None


def _like(ts: Sequence[Tensor]) -> list[tuple]:
    return [(tuple(t.shape), t.dtype, t.device) for t in ts]


def _as_direction(direction: Any, like: Sequence[Tensor], names: Sequence[str] | None, who: str):
    """A direction given as a tensor, a sequence of tensors or (parameters) a dict."""
    if isinstance(direction, Tensor):
        direction = [direction]
    if isinstance(direction, Mapping):
        if names is None:
            raise TypeError(f"{who}: direction must be a tensor or a sequence of tensors")
        missing = [n for n in names if n not in direction]
        if missing:
            raise ValueError(f"{who}: direction lacks parameters {missing[:5]}")
        direction = [direction[n] for n in names]
    direction = list(direction)
    if len(direction) != len(like):
        raise ValueError(f"{who}: direction has {len(direction)} tensors, expected {len(like)}")
    out = []
    for i, (d, x) in enumerate(zip(direction, like, strict=True)):
        if not isinstance(d, Tensor) or d.shape != x.shape:
            got = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(f"{who}: direction {i} must have shape {tuple(x.shape)}, got {got}")
        out.append(d.detach().to(device=x.device, dtype=x.dtype))
    return out


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def _check_inputs(inputs: Sequence[Any], who: str, need_grad: bool = True) -> list[Tensor]:
    if not inputs:
        raise TypeError(f"{who}: give at least one input tensor after f")
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{who}: input {i} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{who}: input {i} has dtype {x.dtype}; gradients need a floating-point "
                "tensor (e.g. x.double())"
            )
        if need_grad and not x.requires_grad:
            raise ValueError(
                f"{who}: input {i} (shape {tuple(x.shape)}) does not require grad; "
                "create it with requires_grad=True or call x.requires_grad_()"
            )
        bad = ~torch.isfinite(x.detach())
        if bool(bad.any()):
            where = tuple(int(v) for v in bad.nonzero()[0])
            kinds = "NaN" if bool(torch.isnan(x.detach()).any()) else "inf"
            raise ValueError(
                f"{who}: input {i} holds {int(bad.sum())} non-finite value(s) ({kinds}, "
                f"first at index {where}); no derivative exists there"
            )
    return list(inputs)


def _check_output(out: Any, who: str, what: str = "f") -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{who}: {what} must return a tensor, got {type(out).__name__}")
    if out.numel() != 1:
        raise ValueError(
            f"{who}: {what} must return a scalar (one element), got shape "
            f"{tuple(out.shape)}; reduce it first, e.g. .sum() or .mean()"
        )
    if not out.is_floating_point():
        raise TypeError(f"{who}: {what} returned dtype {out.dtype}; expected a floating point")
    return out


class _LossModule(torch.nn.Module):
    """`loss_fn(model, *batch)` as a module, so `torch.func.functional_call` can swap the
    model's parameters for dual tensors (also where loss_fn reads model.parameters())."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch: Any) -> Any:
        return self.loss_fn(self.model, *batch)


def _trainable(model: torch.nn.Module, who: str) -> list[tuple[str, torch.nn.Parameter]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{who}: the model has no parameter with requires_grad=True")
    for n, p in named:
        if not p.is_floating_point():
            raise TypeError(f"{who}: parameter {n} has dtype {p.dtype}; expected floating")
    return named


def _rng_state(devices: Sequence[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple, devices: Sequence[int]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1], strict=True):
        torch.cuda.set_rng_state(s, d)


def _module_runner(
    loss_fn: Callable[..., Tensor],
    model: torch.nn.Module,
    named: Sequence[tuple[str, Tensor]],
    batch: tuple,
    rng: tuple,
    devices: Sequence[int],
) -> Callable[[Sequence[Tensor]], Any]:
    """Runs loss_fn(model, *batch) with the parameters made dual, each time from the RNG
    state `rng` (so dropout draws the same masks as the first pass) and on copies of the
    buffers (batch-norm statistics are not updated twice; the originals are saved for
    the first pass's backward and must not change)."""
    wrapper = _LossModule(model, loss_fn)
    plain = [(f"model.{n}", p.detach()) for n, p in named]

    def run_dual(ds: Sequence[Tensor]) -> Any:
        _set_rng_state(rng, devices)
        params = {n: fwAD.make_dual(p, d) for (n, p), d in zip(plain, ds, strict=True)}
        for n, b in model.named_buffers():
            params[f"model.{n}"] = b.detach().clone()
        return torch.func.functional_call(wrapper, params, batch)

    return run_dual


@contextmanager
def _rng_preserved(devices: Sequence[int]) -> Iterator[None]:
    """Leaves the RNG state as it is now."""
    rng = _rng_state(devices)
    try:
        yield
    finally:
        _set_rng_state(rng, devices)


def _cuda_devices(named: Sequence[tuple[str, Tensor]]) -> list[int]:
    return sorted({p.device.index or 0 for _, p in named if p.device.type == "cuda"})
