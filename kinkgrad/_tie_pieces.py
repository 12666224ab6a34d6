"""Tie pieces of `kinkgrad.certify`: max/min/sort/topk/... (`_Ties`) and max pooling
(`_Windows`). Tied inputs are ordered lexicographically by (value, tangent along d,
along further directions, index); tied inputs whose tangents agree along every
direction used are undecided, and immaterial once a random direction was used."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from ._piece_base import (
    _INF,
    _device_flag,
    _Piece,
    _primal,
    _replace_values,
    _set_tangent,
    _values,
)
from .catalog import OpSpec
from .families import (
    Call,
    _is_float,
    _run_with_input_fix,
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

    def verify(self, call: Call, out: Any) -> bool:
        return _same_values(_primal(_values(out)), self.values)

    def decide(self, out: Any, pairs: list) -> Any:
        """Order the ties by the input tangent `xt` (and earlier directions' keys) and
        give the output the tangent of the pieces chosen (`_tangent`)."""
        xt = pairs[0][1]
        if xt is None:
            return out
        self.seen = True
        values = _values(out)
        vp, vt = fwAD.unpack_dual(values)
        return _replace_values(out, _set_tangent(values, self._tangent(xt, vp, vt), False))

    def _tangent(self, xt: Tensor, vp: Tensor, vt: Tensor | None) -> Tensor:  # pragma: no cover
        """The output values' tangent (primal `vp`, native tangent `vt`) given `xt`."""
        raise NotImplementedError

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

    def _tangent(self, xt: Tensor, vp: Tensor, vt: Tensor | None) -> Tensor:
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
        return new

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

    def _tangent(self, xt: Tensor, vp: Tensor, vt: Tensor | None) -> Tensor:
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
        return torch.where(self.tie, ours, native)

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
