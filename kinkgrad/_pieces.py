"""The pieces behind `kinkgrad.certify`: one state object per catalog call that met a
kink, per op family. Each decides, from forward-mode tangents, which one-sided piece
x + t d enters, corrects the op's output tangent to that piece, registers the backward
hook that uses it, and predicts when a step along d changes piece (linearization).

Elementwise kink ops and maximum/minimum use `Kink.direction`, `minus` and `plus` from
the catalog; tie ops order tied inputs lexicographically by (value, tangent along d,
along further directions, index; in `_tie_pieces`); jump ops only report that an input sits
on a jump. Shared interface and helpers: `_piece_base`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._piece_base import (
    _INF,
    _At,
    _device_flag,
    _dot,
    _Mismatch,
    _Piece,
    _plain,
    _primal,
    _run_dual,
)
from ._tie_pieces import _Ties, _Windows
from .catalog import OpSpec
from .families import (
    BinaryTie,
    Call,
    Elementwise,
    Jump,
    Pool,
    Selection,
    _is_float,
    _needs_grad,
    check_node_inputs,
)

__all__ = ["_INF", "_Jumps", "_Mismatch", "_piece", "_plain", "_run_dual"]


def _piece(spec: OpSpec, call: Call) -> _Piece | None:
    fam = spec.family
    if isinstance(fam, Elementwise):
        return _Kinks.make(spec, call)
    if isinstance(fam, Selection):
        return _Ties.make(spec, call)
    if isinstance(fam, Pool):
        return _Windows.make(spec, call)
    if isinstance(fam, Jump):
        return _Jumps.make(spec, call)
    return None


class _Kinks(_Piece):
    """Elementwise kink ops and maximum/minimum/fmax/fmin: one side per element on a
    kink, from the sign of `Kink.direction . tangents` (first nonzero over directions)."""

    def __init__(self, spec: OpSpec, call: Call) -> None:
        self.spec = spec
        self.kinks, self.call = spec.family.kink_list(call)
        self.seen = False
        self.n = len(self.call.inputs)
        # Masks are read before the op runs: an in-place op overwrites its input.
        self.cands = [i for i, k in enumerate(self.kinks) if k.possible()]
        self._live: list[tuple[int, _At]] | None = None
        self.side: list[Tensor | None] = []  # int8, one per element on the kink
        self.finite: list[Tensor | None] = []  # the last direction's tangent was finite
        if self.cands and self.call.inputs[0].device.type != "cpu":
            self.flag, self.hit = _device_flag([self.kinks[i].mask for i in self.cands])
        else:
            self.flag, self.hit = None, bool(self.live)

    @property
    def live(self) -> list[tuple[int, _At]]:
        if self._live is None:
            self._live = []
            for i in self.cands:
                at = _At(self.kinks[i].mask)
                if at.count:
                    self._live.append((i, at))
            self.side = [None] * len(self._live)
            self.finite = [None] * len(self._live)
        return self._live

    @staticmethod
    def make(spec: OpSpec, call: Call) -> _Kinks | None:
        x = call.inputs[0]
        if not _is_float(x) or x.numel() == 0:
            return None
        if isinstance(spec.family, BinaryTie) and not _is_float(call.inputs[1]):
            return None
        return _Kinks(spec, call)

    def run(self, hooks: bool) -> Any:
        out = self.call.run()
        if hooks and self.hit and _needs_grad(out):
            self._hook(out.grad_fn)
        return out

    def _hook(self, node: Any) -> None:
        n = self.n

        def hook(grad_inputs: tuple, grad_outputs: tuple) -> tuple:
            check_node_inputs(node, grad_inputs, n)
            g = grad_outputs[0]
            if g is None or not self.seen:
                return grad_inputs
            with torch._C.DisableTorchFunction():
                new = list(grad_inputs)
                for (i, at), side in zip(self.live, self.side, strict=True):
                    if side is None:
                        continue
                    k = self.kinks[i]
                    gv = at.get(g)
                    up, down = side > 0, side < 0
                    for j in range(n):
                        if new[j] is None:
                            continue
                        plus, minus = at.get(k.plus[j]), at.get(k.minus[j])
                        val = torch.where(
                            up, gv * plus, torch.where(down, gv * minus, at.get(new[j]))
                        )
                        new[j] = at.put(new[j], val)
                return tuple(new)

        node.register_hook(hook)

    def pairs(self, call: Call) -> list[tuple[Any, Tensor | None]]:
        out = []
        for j, t in enumerate(call.inputs):
            if not isinstance(t, Tensor):
                out.append((None, None))
                continue
            p, d = fwAD.unpack_dual(t)
            if call.inplace and j == 0:
                p = p.clone()
                d = None if d is None else d.clone()
            out.append((p, d))
        return out

    def tangent_run(self, call: Call) -> Any:
        kinks, bcall = self.spec.family.kink_list(call)
        for i, _ in self.live:  # the same elements must sit on the same kinks
            if len(kinks) != len(self.kinks) or not torch.equal(kinks[i].mask, self.kinks[i].mask):
                raise _Mismatch(f"{self.spec.name} met different kinks")
        pairs = self.pairs(bcall)
        out = bcall.run()
        return self.decide(out, pairs)

    def decide(self, out: Any, pairs: list) -> Any:
        ts = [d for _, d in pairs]
        if all(t is None for t in ts):
            return out
        self.seen = True
        primal, tangent = fwAD.unpack_dual(out)
        if self.call.inplace and tangent is not None:
            new = tangent  # corrected in place: the caller keeps the tensor it modified
        elif tangent is None or tangent._is_zerotensor():
            new = torch.zeros_like(primal, memory_format=torch.contiguous_format)
        else:
            new = tangent.clone(memory_format=torch.contiguous_format)
        for j, (i, at) in enumerate(self.live):
            k = self.kinks[i]
            tv = [at.get(t) for t in ts]
            like = torch.zeros(at.count, dtype=new.dtype, device=new.device)
            rate = _dot([at.get(c) for c in k.direction], tv, like)
            fin = torch.isfinite(rate)
            sign = torch.where(fin, torch.sign(rate), torch.zeros_like(rate)).to(torch.int8)
            self.finite[j] = fin
            prev = self.side[j]
            side = sign if prev is None else torch.where(prev != 0, prev, sign)
            self.side[j] = side
            plus = _dot([at.get(c) for c in k.plus], tv, like)
            minus = _dot([at.get(c) for c in k.minus], tv, like)
            at.set_(new, torch.where(side > 0, plus, minus))
        if new is tangent:
            return out
        return fwAD.make_dual(primal, new)

    def crossing_times(self, pairs: list) -> Tensor | None:
        ts = [d for _, d in pairs]
        times = []
        for k in self.kinks:
            # x as it was before the op ran (an in-place op overwrites it)
            x = pairs[0][0] if self.call.inplace else _primal(k.x)
            s = _dot(k.direction, ts, x)
            point = _primal(k.point)
            t = (point - x) / s
            ok = (s != 0) & (t > 0)
            if k.valid is not None:
                ok = ok & k.valid
            times.append(torch.where(ok, t, torch.full_like(t, _INF)).flatten())
        return torch.cat(times) if times else None

    @property
    def hits(self) -> int:
        return sum(at.count for _, at in self.live) if self.seen else 0

    @property
    def undecided(self) -> int:
        if not self.seen:
            return 0
        return sum(int((s == 0).sum()) for s in self.side if s is not None)

    @property
    def nonfinite(self) -> int:
        if not self.seen:
            return 0
        return sum(
            int(((s == 0) & ~f).sum())
            for s, f in zip(self.side, self.finite, strict=True)
            if s is not None and f is not None
        )


class _Jumps(_Piece):
    """sign, round, hardshrink, ...: no generalized gradient exists on the jump; an input
    on it (and depending on the variables) makes the result uncertified."""

    def __init__(self, spec: OpSpec, call: Call) -> None:
        self.spec, self.fam, self.call = spec, spec.family, call
        self.mask = spec.family.jumps(call)  # before an in-place op overwrites x
        self.flag, self.hit = _device_flag([self.mask])
        self.seen = False

    @staticmethod
    def make(spec: OpSpec, call: Call) -> _Jumps | None:
        x = call.inputs[0]
        if not _is_float(x) or x.numel() == 0:
            return None
        return _Jumps(spec, call)

    def run(self, hooks: bool) -> Any:
        return _plain(self.spec, self.call) if hooks else self.call.run()

    def verify(self, call: Call, out: Any) -> bool:
        return True  # checked before running, in tangent_run

    def tangent_run(self, call: Call) -> Any:
        if not torch.equal(self.fam.jumps(call), self.mask):
            raise _Mismatch(f"{self.spec.name} met different jumps")
        return super().tangent_run(call)

    def decide(self, out: Any, pairs: list) -> Any:
        if pairs[0][1] is not None:
            self.seen = True
        return out

    def crossing_times(self, pairs: list) -> Tensor | None:
        x, dx = pairs[0]
        return _jump_crossings(self.spec.name, self.call.params, x, dx).flatten()

    @property
    def hits(self) -> int:
        return int(self.mask.sum()) if self.seen else 0


def _jump_crossings(name: str, params: dict, x: Tensor, dx: Tensor) -> Tensor:
    """First t > 0 with x + t dx on a jump point of the op (inf if none)."""
    inf = torch.full_like(x, _INF)

    def fixed(points: list[float]) -> Tensor:
        best = inf
        for p in points:
            t = (p - x) / dx
            best = torch.minimum(best, torch.where((dx != 0) & (t > 0), t, inf))
        return best

    def lattice(y: Tensor, dy: Tensor, offset: float, skip_zero: bool) -> Tensor:
        # points k + offset; next one strictly beyond y in the direction of dy
        up = torch.floor(y - offset) + 1 + offset
        down = torch.ceil(y - offset) - 1 + offset
        if skip_zero:
            up = torch.where(up == 0, up + 1, up)
            down = torch.where(down == 0, down - 1, down)
        t = torch.where(dy > 0, (up - y) / dy, (down - y) / dy)
        return torch.where(dy != 0, t, inf)

    if name in ("sign", "heaviside"):
        return fixed([0.0])
    if name == "hardshrink":
        lam = float(params.get("lambd", 0.5))
        return fixed([-lam, lam] if lam > 0 else [])
    if name == "threshold":
        return fixed([float(params["threshold"])])
    if name in ("floor", "ceil"):
        return lattice(x, dx, 0.0, False)
    if name == "trunc":
        return lattice(x, dx, 0.0, True)
    if name == "round":
        scale = 10.0 ** int(params.get("decimals") or 0)
        return lattice(x * scale, dx * scale, 0.5, False)
    return inf  # pragma: no cover - a new jump op needs its points here
