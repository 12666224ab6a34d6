"""The pieces behind `kinkgrad.certify`: one state object per catalog call that met a
kink, per op family. Each decides, from forward-mode tangents, which one-sided piece
x + t d enters, corrects the op's output tangent to that piece, registers the backward
hook that uses it, and predicts when a step along d changes piece (linearization).

Elementwise kink ops and maximum/minimum use `Kink.direction`, `minus` and `plus` from
the catalog; tie ops order tied inputs lexicographically by (value, tangent along d,
along further directions, index); jump ops only report that an input sits on a jump.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

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
    _run_with_input_fix,
    check_node_inputs,
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


def _lex_order(X: Tensor, keys: Sequence[Tensor]) -> Tensor:
    """Per row, the permutation sorting by (X, keys[0], keys[1], ...) lexicographically,
    ties left in index order (stable sorts, least significant key first)."""
    perm: Tensor | None = None
    for key in reversed([X, *keys]):
        k = key if perm is None else key.gather(1, perm)
        idx = k.sort(dim=1, stable=True).indices
        perm = idx if perm is None else perm.gather(1, idx)
    assert perm is not None
    return perm


class _Ordered(_Piece):
    """Tie ops: tied inputs are ordered by tangent along the directions (`keys`); the
    op runs with its input gradient patched (`_fix`) and analyses its values."""

    def __init__(self, spec: OpSpec, call: Call) -> None:
        self.spec, self.fam, self.call = spec, spec.family, call
        self.hit = self.seen = False
        self.keys: list[Tensor] = []
        self._unres = 0
        self._nonfinite = 0

    def run(self, hooks: bool) -> Any:
        out = _run_with_input_fix(self.call, self._fix) if hooks else self.call.run()
        self._analyze(_primal(_values(out)).detach())
        return out

    def _analyze(self, values: Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def _fix(self, native: Tensor, g: Tensor, values: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def undecided(self) -> int:
        return self._unres if self.seen else 0

    @property
    def nonfinite(self) -> int:
        return self._nonfinite if self.seen else 0


class _Ties(_Ordered):
    """max/min/amax/amin/sort/topk/kthvalue/median: at x + t d (small t > 0) the
    elements are ordered by (value, tangent along d, further directions...); the
    selected slots take their elements in that order."""

    target: Tensor | None = None

    @staticmethod
    def make(spec: OpSpec, call: Call) -> _Ties | None:
        x = call.inputs[0]
        if not _is_float(x) or x.numel() <= 1 or x.dim() == 0:
            return None
        return _Ties(spec, call)

    def _plain_call(self) -> Call:
        x = self.call.inputs[0]
        return self.call.replace({x: _primal(x).detach()})

    def _analyze(self, values: Tensor) -> None:
        X, V, back = self.fam.rows(self._plain_call(), values)
        if V.shape[1] == 1:
            tied = (X == V).sum(1, keepdim=True) > 1
        else:
            Xs = X.sort(dim=1).values.contiguous()
            V_ = V.contiguous()
            tied = (torch.searchsorted(Xs, V_, right=True) - torch.searchsorted(Xs, V_)) > 1
        self.X, self.V, self.back, self.tied, self.values = X, V, back, tied, values
        self.flag, self.hit = _device_flag([tied])
        nd = self.call.inputs[0].dim()
        slots = self.call.extra["mode"] == "slots"
        self.slot_dim = int(self.call.params.get("dim", -1)) % nd if slots else None

    def _rows(self, t: Tensor) -> Tensor:
        """Output-shaped tensor -> [R, m] slot rows (the layout of `self.V`)."""
        if self.slot_dim is not None:
            return t.movedim(self.slot_dim, -1).reshape(self.V.shape)
        return t.reshape(self.V.shape)

    def _unrows(self, rows: Tensor, like: Tensor) -> Tensor:
        if self.slot_dim is not None:
            shape = like.movedim(self.slot_dim, -1).shape
            return rows.reshape(shape).movedim(-1, self.slot_dim)
        return rows.reshape(like.shape)

    def _positions(self) -> Tensor:
        """Positions, in the lexicographic order, of the elements the slots take."""
        name, p = self.spec.name, self.call.params
        n, m = self.X.shape[1], self.V.shape[1]
        if name in ("max", "amax"):
            pos = [n - 1]
        elif name in ("min", "amin"):
            pos = [0]
        elif name == "median":
            pos = [(n - 1) // 2]  # PyTorch's median is the lower one
        elif name == "kthvalue":
            pos = [int(p["k"]) - 1]
        elif name == "sort":
            pos = list(range(n - 1, -1, -1)) if p.get("descending") else list(range(n))
        elif name == "topk":
            k = int(p["k"])
            pos = list(range(n - 1, n - 1 - k, -1)) if p.get("largest", True) else list(range(k))
        else:  # pragma: no cover - a new Selection op needs its rule here
            raise NotImplementedError(f"kinkgrad.certify: no slot rule for {name}")
        assert len(pos) == m
        return torch.tensor(pos, device=self.X.device).expand(self.X.shape[0], m)

    def _targets(self, perm: Tensor) -> Tensor:
        pos = self._positions()
        target = perm.gather(1, pos)
        p = self.call.params
        if self.spec.name == "topk" and not p.get("sorted", True):
            # Unsorted topk: the kernel's slot order is unspecified; pair the slots, in
            # value order, with the selected elements in lexicographic order.
            chosen = perm.gather(1, pos.sort(dim=1).values)
            order = self.V.sort(dim=1, stable=True).indices
            target = torch.empty_like(chosen).scatter_(1, order, chosen)
        return target

    def verify(self, call: Call, out: Any) -> bool:
        return _same_values(_primal(_values(out)), self.values)

    def decide(self, out: Any, pairs: list) -> Any:
        xt = pairs[0][1]
        if xt is None:
            return out
        self.seen = True
        values = _values(out)
        vp, vt = fwAD.unpack_dual(values)
        T = self.fam.rows(self.call.replace({self.call.inputs[0]: xt}), vp)[0]
        self.keys.append(T)
        perm = _lex_order(self.X, self.keys)
        target = self._targets(perm)
        valid = self.X.gather(1, target) == self.V
        self.perm, self.target, self.valid = perm, target, valid
        ours = T.gather(1, target)
        native = self._rows(vt) if vt is not None else torch.zeros_like(ours)
        new = self._unrows(torch.where(self.tied & valid, ours, native), vp)
        self._unres = self._count_unresolved()
        return _replace_values(out, _set_tangent(values, new, False))

    def _count_unresolved(self) -> int:
        if not self.hit:
            return 0
        perm = self.perm
        same = None
        for key in (self.X, *self.keys):
            ks = key.gather(1, perm)
            eq = ks[:, 1:] == ks[:, :-1]
            same = eq if same is None else same & eq
        assert same is not None
        amb = torch.zeros_like(perm, dtype=torch.bool)
        amb[:, :-1] |= same
        amb[:, 1:] |= same
        amb_elem = torch.zeros_like(amb).scatter_(1, perm, amb)
        undecided = amb_elem.gather(1, self.target) & self.tied & self.valid
        finite = torch.isfinite(self.keys[-1]).gather(1, self.target)
        self._nonfinite = int((undecided & ~finite).sum())
        return int(undecided.sum())

    def _fix(self, native: Tensor, g: Tensor, values: Tensor) -> Tensor:
        if self.target is None or not self.hit:
            return native
        with torch._C.DisableTorchFunction():
            R, n = self.X.shape
            G = self._rows(g)
            Gv = torch.where(self.valid, G, torch.zeros_like(G))
            ours = torch.zeros(R, n, dtype=G.dtype, device=G.device)
            ours.scatter_add_(1, self.target, Gv)
            return torch.where(self.back(self._affected()), self.back(ours), native)

    def _affected(self) -> Tensor:
        """Elements in a tied group that some slot selects (where PyTorch's choice and
        ours may differ)."""
        R, n = self.X.shape
        perm = self.perm
        Xs = self.X.gather(1, perm)
        new = torch.ones_like(Xs, dtype=torch.bool)
        new[:, 1:] = Xs[:, 1:] != Xs[:, :-1]
        gid = new.long().cumsum(1) - 1
        inv = torch.empty_like(perm).scatter_(
            1, perm, torch.arange(n, device=perm.device).expand(R, n)
        )
        slot_gid = gid.gather(1, inv.gather(1, self.target))
        marked = torch.zeros_like(gid).scatter_add_(1, slot_gid, (self.tied & self.valid).long())
        return torch.zeros_like(new).scatter_(1, perm, (marked > 0).gather(1, gid))

    def crossing_times(self, pairs: list) -> Tensor | None:
        if self.target is None:
            return None
        X, T = self.X, self.keys[-1]
        if self.spec.name == "sort":
            # The first swap of a sorted row is between neighbours (in x + t d order).
            Xs, Ts = X.gather(1, self.perm), T.gather(1, self.perm)
            rate = Ts[:, :-1] - Ts[:, 1:]
            t = (Xs[:, 1:] - Xs[:, :-1]) / rate
            ok = (rate > 0) & (t > 0)
        else:
            xe = X.gather(1, self.target).unsqueeze(-1)  # [R, m, 1]
            te = T.gather(1, self.target).unsqueeze(-1)
            rate = T.unsqueeze(1) - te  # [R, m, n]
            t = (xe - X.unsqueeze(1)) / rate
            ok = (rate != 0) & (t > 0) & self.valid.unsqueeze(-1)
        return torch.where(ok, t, torch.full_like(t, _INF)).flatten()

    @property
    def hits(self) -> int:
        return int(self.tied.sum()) if self.seen else 0


def _same_values(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


class _Windows(_Ordered):
    """max_pool / adaptive_max_pool: in each window whose maximum is tied, the tied
    element with the largest tangent (then further directions, then scan order)."""

    sel: Tensor | None = None

    @staticmethod
    def make(spec: OpSpec, call: Call) -> _Windows | None:
        x = call.inputs[0]
        if not _is_float(x) or x.numel() == 0 or x.dim() <= spec.family.nd:
            return None
        return _Windows(spec, call)

    def _analyze(self, values: Tensor) -> None:
        nd = self.fam.nd
        x = self.call.inputs[0]
        xp = _primal(x).detach()
        idx = self.fam.windows(self.call.replace({x: xp}), values.shape)  # [O1, K1, ...]
        outs = [idx.shape[2 * d] for d in range(nd)]
        order = [2 * d for d in range(nd)] + [2 * d + 1 for d in range(nd)]
        self.idx = idx.permute(order).reshape(*outs, -1)  # [O..., K]
        self.lead = tuple(xp.shape[:-nd])
        self.spatial = tuple(xp.shape[-nd:])
        W = self._windows(xp, float("nan"))
        self.W = W
        self.eq = W == values.unsqueeze(-1)
        self.count = self.eq.sum(-1)
        self.tie = self.count > 1
        self.values = values
        self.flag, self.hit = _device_flag([self.tie])

    def _windows(self, t: Tensor, pad: float) -> Tensor:
        nd = self.fam.nd
        flat = F.pad(t, (0, 1) * nd, value=pad).reshape(*self.lead, -1)
        return flat[..., self.idx]  # [*lead, O..., K]

    def verify(self, call: Call, out: Any) -> bool:
        return _same_values(_primal(_values(out)), self.values)

    def decide(self, out: Any, pairs: list) -> Any:
        xt = pairs[0][1]
        if xt is None:
            return out
        self.seen = True
        values = _values(out)
        vp, vt = fwAD.unpack_dual(values)
        Tw = self._windows(xt, 0.0)
        self.keys.append(Tw)
        cand = self.eq
        for key in self.keys:
            kw = torch.where(cand, key, torch.full_like(key, -_INF))
            cand = cand & (kw == kw.amax(-1, keepdim=True))
        self.sel = cand.to(torch.int8).argmax(-1)  # first candidate in scan order
        # A NaN tangent compares unequal to everything: such a window is not decided.
        bad = (self.eq & ~torch.isfinite(Tw)).any(-1) & self.tie
        self._unres = int((self.tie & ((cand.sum(-1) > 1) | bad)).sum())
        self._nonfinite = int(bad.sum())
        ours = Tw.gather(-1, self.sel.unsqueeze(-1)).squeeze(-1)
        native = vt if vt is not None else torch.zeros_like(ours)
        new = torch.where(self.tie, ours, native)
        return _replace_values(out, _set_tangent(values, new, False))

    def _fix(self, native: Tensor, g: Tensor, values: Tensor) -> Tensor:
        if self.sel is None or not self.hit:
            return native
        with torch._C.DisableTorchFunction():
            lead, nd = self.lead, self.fam.nd
            idx = self.idx.expand(*lead, *self.idx.shape)
            target = idx.gather(-1, self.sel.unsqueeze(-1)).squeeze(-1)
            G = torch.where(self.count > 0, g, torch.zeros_like(g))
            nflat = math.prod(s + 1 for s in self.spatial)
            ours = torch.zeros(*lead, nflat, dtype=g.dtype, device=g.device)
            ours.scatter_add_(-1, target.reshape(*lead, -1), G.reshape(*lead, -1))
            touched = (self.eq & self.tie.unsqueeze(-1)).to(g.dtype)
            aff = torch.zeros(*lead, nflat, dtype=g.dtype, device=g.device)
            aff.scatter_add_(-1, idx.reshape(*lead, -1), touched.reshape(*lead, -1))
            crop = (Ellipsis, *(slice(0, s) for s in self.spatial))
            shape = (*lead, *(s + 1 for s in self.spatial))
            ours = ours.reshape(shape)[crop]
            aff = aff.reshape(shape)[crop] > 0
            del nd
            return torch.where(aff, ours, native)

    def crossing_times(self, pairs: list) -> Tensor | None:
        if self.sel is None:
            return None
        Tw = self.keys[-1]
        sel = self.sel.unsqueeze(-1)
        we, te = self.W.gather(-1, sel), Tw.gather(-1, sel)
        rate = Tw - te
        t = (we - self.W) / rate
        ok = (rate != 0) & (t > 0) & ~torch.isnan(self.W) & (self.count > 0).unsqueeze(-1)
        return torch.where(ok, t, torch.full_like(t, _INF)).flatten()

    @property
    def hits(self) -> int:
        return int(self.tie.sum()) if self.seen else 0


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
