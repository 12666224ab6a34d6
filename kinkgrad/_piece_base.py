"""The interface and helpers shared by the pieces of `kinkgrad.certify` (`_pieces`,
`_tie_pieces`): the `_Piece` protocol, tangent plumbing, masks of kink elements."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .catalog import OpSpec
from .families import (
    Call,
    Jump,
)

_INF = math.inf


class _Mismatch(RuntimeError):
    """A replayed pass computed different values than the first one."""


def _plain(spec: OpSpec, call: Call) -> Any:
    if isinstance(spec.family, Jump):  # the a.e. derivative (heaviside has none natively)
        return _run_dual(spec, call, lambda: spec.family.apply(call, "zero"))
    return call.run()


def _run_dual(spec: OpSpec, call: Call, run: Callable[[], Any]) -> Any:
    """Run, falling back for piecewise-constant ops without a forward-AD formula
    (heaviside): their tangent is zero wherever it exists."""
    try:
        return run()
    except NotImplementedError:
        fam = spec.family
        if not (isinstance(fam, Jump) and fam.piecewise_constant):
            raise
        x = call.inputs[0]
        primal, tangent = fwAD.unpack_dual(x)
        out = call.replace({x: primal}).run()
        return out if tangent is None else fwAD.make_dual(out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------
# Pieces: one per catalog call with a kink
# --------------------------------------------------------------------------------------


def _primal(t: Any) -> Any:
    return fwAD.unpack_dual(t).primal if isinstance(t, Tensor) else t


def _set_tangent(out: Tensor, new: Tensor, inplace: bool) -> Tensor:
    primal, tangent = fwAD.unpack_dual(out)
    if inplace and tangent is not None:
        tangent.copy_(new)  # the caller keeps using the tensor it modified
        return out
    return fwAD.make_dual(primal, new)


def _replace_values(out: Any, values: Tensor) -> Any:
    if isinstance(out, tuple):  # a plain tuple or torch.return_types (values, indices)
        return type(out)((values, *out[1:]))
    return values


def _values(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Piece:
    """Interface. `run` executes the op (record pass: registers hooks reading the later
    decision); `pairs` reads (primal, tangent) of its inputs before the op runs;
    `decide` updates the decision from one direction's tangents and corrects the output
    tangent; `tangent_run` does both on a replayed call; `crossing_times` gives, per
    element, the first step t > 0 along the direction at which an input changes piece."""

    spec: OpSpec
    call: Call
    hit: bool  # some element is on a kink ("maybe" on accelerators: see `flag`)
    flag: Tensor | None  # on accelerators, the device-side answer
    seen: bool  # some input carried a tangent

    def run(self, hooks: bool) -> Any:  # pragma: no cover
        raise NotImplementedError

    def pairs(self, call: Call) -> list[tuple[Any, Tensor | None]]:
        x = call.inputs[0]
        p, t = fwAD.unpack_dual(x)
        return [(p, t)]

    def decide(self, out: Any, pairs: list) -> Any:  # pragma: no cover
        raise NotImplementedError

    def verify(self, call: Call, out: Any) -> bool:  # pragma: no cover
        raise NotImplementedError

    def tangent_run(self, call: Call) -> Any:
        pairs = self.pairs(call)
        out = _run_dual(self.spec, call, call.run)
        if not self.verify(call, out):
            raise _Mismatch(f"{self.spec.name} computed different values")
        return self.decide(out, pairs)

    def crossing_times(self, pairs: list) -> Tensor | None:  # pragma: no cover
        raise NotImplementedError

    @property
    def hits(self) -> int:  # pragma: no cover
        raise NotImplementedError

    @property
    def undecided(self) -> int:
        """Elements (tie groups) on a kink that no direction so far has decided."""
        return 0

    @property
    def nonfinite(self) -> int:
        """Of the undecided, those whose tangents were not finite (no conclusion)."""
        return 0


def _dot(coefs: Sequence[Any], ts: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """sum_i coefs[i] * ts[i], skipping absent tangents and zero coefficients."""
    acc: Tensor | None = None
    for c, t in zip(coefs, ts, strict=False):
        if t is None or (not isinstance(c, Tensor) and c == 0):
            continue
        term = t if (not isinstance(c, Tensor) and c == 1) else t * c
        acc = term if acc is None else acc + term
    if acc is None:
        return torch.zeros_like(like)
    return acc if acc.shape == like.shape else acc.expand_as(like)


def _device_flag(masks: Sequence[Tensor]) -> tuple[Tensor | None, bool]:
    """(flag, hit) for "does any mask hold anywhere". On the CPU the answer itself; on an
    accelerator asking now would synchronise the host at every op, so hit is "maybe"
    and the device flag is read once, at the end of the pass (`_Session.met_kink`)."""
    if not masks:
        return None, False
    if masks[0].device.type == "cpu":
        return None, any(bool(m.any()) for m in masks)
    flags = [m.any() for m in masks]
    return (flags[0] if len(flags) == 1 else torch.stack(flags).any()), True


class _At:
    """The elements of a mask, for tensors of the mask's shape (any strides): kink
    elements are few, so decisions and corrections touch only them."""

    def __init__(self, mask: Tensor) -> None:
        self.scalar = mask.dim() == 0
        self.where = (mask.reshape(1) if self.scalar else mask).nonzero(as_tuple=True)
        self.count = int(self.where[0].numel())

    def get(self, t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        return (t.reshape(1) if self.scalar else t)[self.where]

    def set_(self, t: Tensor, values: Tensor) -> Tensor:
        (t.reshape(1) if self.scalar else t)[self.where] = values
        return t

    def put(self, t: Tensor, values: Tensor) -> Tensor:
        """A copy of t with `values` at the elements."""
        return self.set_(t.clone(memory_format=torch.contiguous_format), values)
