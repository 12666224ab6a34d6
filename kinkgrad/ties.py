"""Tie families: selections (max, sort, topk, median, ...) and max pooling windows.

The forward is PyTorch's op on an alias of its input; a pre-hook on the alias's node
replaces the gradient at tied inputs by the tie rule's ("first" or "split").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .at_kinks import Block, as_bool, compact, minus_zero, traced
from .calls import Call, Family, _bind, _is_float, _warn_once, refuse_forward_ad

# --------------------------------------------------------------------------------------
# Selections: reductions, sort, topk, kthvalue, median
# --------------------------------------------------------------------------------------


class Selection(Family):
    """Ops whose output values are elements of the input (max, sort, topk, median, ...).

    At a tie several inputs carry the selected value. "first" gives each output slot's
    gradient to the tied inputs in index order (what a stable sort would pick); "split"
    gives each tied input an equal share of its value group's gradient. Both are convex
    combinations of the per-piece gradients, hence Clarke subgradients.
    """

    def __init__(self, mode: str, names: Sequence[str], defaults: dict[str, Any]) -> None:
        # mode: "full" (one value over all elements), "dim" (one value along a dim),
        # "auto" (full without dim, else dim), "dims" (amax/amin over several dims),
        # "slots" (sort/topk: several values along a dim).
        self.mode = mode
        self.names = tuple(names)
        self.defaults = defaults

    def bind(self, func: Callable, args: tuple, kwargs: dict) -> Call:
        params = _bind(self.names, self.defaults, args, kwargs)
        if func is torch.msort or func is Tensor.msort:  # sort(x, dim=0).values
            params["dim"] = 0
        mode = self.mode
        if mode == "auto":
            mode = "full" if params.get("dim") is None else "dim"
        return Call(func, args, kwargs, params, [params["input"]], extra={"mode": mode})

    # Rows: move the selected dims of x last and flatten them.
    def rows(self, call: Call, values: Tensor) -> tuple[Tensor, Tensor, Callable]:
        x = call.inputs[0]
        nd = x.dim()
        dim = call.params.get("dim")
        mode = call.extra["mode"]
        if mode == "full" or (mode == "dims" and dim in (None, (), [])) or nd == 0:
            sel = list(range(nd))
        elif isinstance(dim, (list, tuple)):
            sel = sorted(d % nd for d in dim)
        else:
            sel = [dim % nd]
        rest = [d for d in range(nd) if d not in sel]
        perm = rest + sel
        xp = x.permute(perm) if nd else x.reshape(1)
        rest_shape = [x.shape[d] for d in rest]
        X = xp.reshape(-1, math.prod(xp.shape[len(rest) :]) if sel else 1)
        keep = mode == "slots" or bool(call.params.get("keepdim"))
        if mode == "slots" and nd:
            V = values.movedim(sel[0], -1).reshape(X.shape[0], -1)
        else:
            v = values
            if not keep and mode != "full":
                for d in sel:
                    v = v.unsqueeze(d)
            V = v.reshape(X.shape[0], 1)

        def back(G: Tensor) -> Tensor:
            full = G.reshape(rest_shape + [x.shape[d] for d in sel]) if nd else G.reshape(())
            if not nd:
                return full
            inv = [0] * nd
            for i, d in enumerate(perm):
                inv[d] = i
            return full.permute(inv)

        return X, V, back

    @staticmethod
    def _values(out: Any) -> Tensor:
        return out[0] if isinstance(out, tuple) else out

    def tie_rule(self, call: Call, values: Tensor, g: Tensor, rule: str) -> tuple[Tensor, Tensor]:
        """(gradient w.r.t. x under `rule`, mask of inputs in tied selected groups)."""
        X, V, back = self.rows(call, values)
        G = self.rows(call, g)[1]  # the upstream gradient, laid out like the values
        ours, tied = _selection_grad(X.detach(), V, G, rule)
        return back(ours), back(tied)

    def apply(self, call: Call, value: Any) -> Any:
        return _apply_tie_rule(self, call, value)

    def exact_hits(self, call: Call, out: Any) -> Tensor:
        values = self._values(out).detach()
        X, V, _ = self.rows(call, values)
        _, _, n_in, gid_out, valid = _groups(X.detach(), V)
        tied = (n_in.gather(1, gid_out.clamp(min=0)) > 1) & valid
        if call.extra["mode"] == "slots" and values.dim():  # rows hold the dim last
            d = call.params["dim"] % values.dim()
            return tied.reshape(values.movedim(d, -1).shape).movedim(-1, d)
        return tied.reshape(values.shape)


def _run_with_input_fix(call: Call, fix: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Any:
    """Run the op on an alias of its input x. The alias's autograd node receives exactly
    this op's gradient with respect to x, in x's shape, whatever nodes PyTorch uses
    inside the op; a pre-hook there calls fix(native_grad, upstream_grad, values).

    `values` are the op's output as computed: if the caller modified the output in place
    (`p += 1` after a pool), they are recomputed from x, which must be unmodified.
    """
    x = call.inputs[0]
    if not (_is_float(x) and x.numel() and torch.is_grad_enabled() and x.requires_grad):
        return call.run()
    if x.device.type == "meta":  # no values, hence no ties; gradients are meta too
        return call.run()
    if x.layout != torch.strided:
        _warn_once(
            f"kinkgrad: policies do not apply to {x.layout} tensors; this call runs as "
            "plain PyTorch (PyTorch's gradient at every tie)"
        )
        return call.run()
    if fix is None:
        return call.run()
    # aten.alias keeps x's exact strides (view_as may restride size-1 dims, and the op
    # would then pick another memory format for its output than PyTorch does).
    alias = torch.ops.aten.alias(x)
    out = call.replace({x: alias}).run()
    values = out[0] if isinstance(out, tuple) else out
    if values._is_view():
        # max_pool1d returns a squeezed view: modifying it in place would rebase the
        # graph past the node our pre-hook watches. A copy is an ordinary output.
        values = values.clone()
        out = type(out)((values, *out[1:])) if isinstance(out, tuple) else values
    version, out_version = x._version, values._version
    box: dict[str, Tensor] = {}
    # A pre-hook on the op's own node, not a tensor hook on `values`: the caller may
    # modify `values` in place, after which a tensor hook no longer sees this op's
    # output gradient.
    values.grad_fn.register_prehook(lambda grads: box.__setitem__("g", grads[0]))

    def prehook(grads: tuple) -> tuple:
        if grads[0] is None:
            return grads
        if "g" not in box:
            raise RuntimeError(
                f"kinkgrad: the gradient of {getattr(call.func, '__name__', call.func)}'s "
                "output did not pass through its node; its tie policy cannot be applied "
                "(please report this call)"
            )
        if x._version != version:
            raise RuntimeError(
                "kinkgrad: the input of a tie op was modified in place before backward"
            )
        seen = values.detach()
        if values._version != out_version:  # the output was modified in place
            with torch.no_grad(), torch._C.DisableTorchFunction():
                again = call.replace({x: x.detach()}).run()
            seen = again[0] if isinstance(again, tuple) else again
        return (fix(grads[0], box.pop("g"), seen), *grads[1:])

    alias.grad_fn.register_prehook(prehook)
    return out


def _apply_tie_rule(fam: Any, call: Call, rule: str) -> Any:
    """Eager: PyTorch's gradient patched at tied inputs by a hook (no extra forward).
    Traced, compiled or under torch.func, where hooks on nodes cannot run: the same
    gradient from two autograd nodes, as for elementwise kinks (`at_kinks.py`)."""
    refuse_forward_ad(call, rule)
    if not traced():

        def fix(native: Tensor, g: Tensor, values: Tensor) -> Tensor:
            ours, tied = fam.tie_rule(call, values, g, rule)
            return torch.where(tied, ours, native)

        return _run_with_input_fix(call, fix)
    x = call.inputs[0]
    if not (_is_float(x) and x.numel() and torch.is_grad_enabled() and x.requires_grad):
        return call.run()
    if x.device.type == "meta" or x.layout != torch.strided:
        return _run_with_input_fix(call, None)  # passes through (warns for sparse)
    with torch.no_grad():
        first = call.replace({x: x.detach()}).run()
    values0 = first[0] if isinstance(first, tuple) else first
    _, tied = fam.tie_rule(call, values0, torch.zeros_like(values0), rule)
    tied = compact(tied)
    out = call.replace({x: Block.apply(x, tied)}).run()
    values = out[0] if isinstance(out, tuple) else out

    def ours(g: Tensor, x_now: Tensor) -> Tensor:
        return fam.tie_rule(call.replace({x: x_now}), values0, g, rule)[0]

    new = TieSlopes.apply(values, ours, values0, tied, x)
    if isinstance(out, tuple):
        return type(out)((new, *out[1:]))
    return new


class TieSlopes(torch.autograd.Function):
    """Identity on the op's values; adds the tie rule's gradient at tied inputs of x
    (-0.0 elsewhere; `Block` removed PyTorch's there). x is saved, so modifying it in
    place before backward is PyTorch's own error; the values were computed separately
    (`values0`), so modifying the output in place changes nothing here."""

    generate_vmap_rule = True

    @staticmethod
    def forward(values, ours, values0, tied, x):  # type: ignore[override]  # noqa: ANN001
        return values.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        _, ctx.ours, values0, tied, x = inputs
        ctx.save_for_backward(values0, tied, x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]  # noqa: ANN001
        values0, tied, x = ctx.saved_tensors
        ours = ctx.ours(g, x.detach())
        grad = torch.where(as_bool(tied, ours), ours, minus_zero(tied, ours))
        return g, None, None, None, grad


def _to_device(data: list, device: torch.device) -> Tensor:
    """An int64 tensor of `data` on `device`. A copy from pageable host memory would make
    the host wait for the device's queue; from pinned memory it is asynchronous."""
    if device.type == "cpu":
        return torch.tensor(data, dtype=torch.long)
    return torch.tensor(data, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def _starts(xs: Tensor) -> Tensor:
    """Bool [R, n]: position s starts a new run of equal values in its (sorted) row."""
    first = torch.ones_like(xs[:, :1], dtype=torch.bool)
    return torch.cat([first, xs[:, 1:] != xs[:, :-1]], dim=1)


def _groups(X: Tensor, V: Tensor):
    """Group equal values per row. Returns (perm, gid, n_in, gid_out, valid): perm sorts
    X stably; gid[r, s] is the group of sorted position s; n_in[r, g] the group's size;
    gid_out[r, j] the group of output slot j (valid False for NaN outputs)."""
    R, n = X.shape
    xs, perm = X.sort(dim=1, stable=True)
    # Out-of-place throughout: torch.func's vmap batches these tensors.
    new = _starts(xs)  # NaN != NaN: every NaN is its own group
    gid = new.long().cumsum(1) - 1
    n_in = torch.zeros_like(gid).scatter_add(1, gid, torch.ones_like(gid))
    # NaNs sort last; binary search needs a monotone row, so search them as +inf (a real
    # +inf sorts before them and is found first; a NaN output never matches anyway).
    monotone = torch.where(xs.isnan(), torch.full_like(xs, float("inf")), xs)
    pos = torch.searchsorted(monotone.contiguous(), V.contiguous()).clamp(max=n - 1)
    valid = xs.gather(1, pos) == V
    gid_out = torch.where(valid, gid.gather(1, pos), torch.full_like(pos, -1))
    return perm, gid, n_in, gid_out, valid


def _selection_grad(X: Tensor, V: Tensor, G: Tensor, rule: str) -> tuple[Tensor, Tensor]:
    """Gradient w.r.t. X [R, n] of output slots V [R, m] with upstream G under a tie
    rule, and the mask of inputs in tied, selected groups (where it replaces PyTorch's)."""
    R, n = X.shape
    perm, gid, n_in, gid_out, valid = _groups(X, V)
    safe = gid_out.clamp(min=0)
    Gv = torch.where(valid, G, torch.zeros_like(G))
    selected = torch.zeros_like(n_in).scatter_add(1, safe, valid.long())
    tied_sorted = ((n_in > 1) & (selected > 0)).gather(1, gid)
    if rule == "split":
        total = torch.zeros(R, n, dtype=G.dtype, device=G.device).scatter_add(1, safe, Gv)
        share = total / n_in.clamp(min=1).to(G.dtype)
        grad_sorted = share.gather(1, gid)
        grad = torch.zeros_like(grad_sorted).scatter(1, perm, grad_sorted)
    elif rule == "first":
        # Output slots sharing a group take the group's inputs in index order.
        first_pos = torch.zeros_like(n_in).scatter_reduce(
            1, gid, torch.arange(n, device=X.device).expand(R, n), "amin", include_self=False
        )
        # Slots with no group (NaN outputs) must not join group 0's run: sort them last.
        key = torch.where(valid, gid_out, torch.full_like(gid_out, n))
        order = torch.sort(key, dim=1, stable=True)
        m = V.shape[1]
        ar = torch.arange(m, device=X.device).expand(R, m)
        newg = _starts(order.values)
        run_start = torch.where(newg, ar, torch.zeros_like(ar)).cummax(1).values
        rank_sorted = ar - run_start
        rank = torch.zeros_like(rank_sorted).scatter(1, order.indices, rank_sorted)
        target_sorted = (first_pos.gather(1, safe) + rank).clamp(max=n - 1)
        target = perm.gather(1, target_sorted)
        grad = torch.zeros(R, n, dtype=G.dtype, device=G.device).scatter_add(1, target, Gv)
    else:
        raise ValueError(f"unknown tie rule {rule!r}")
    tied = torch.zeros_like(tied_sorted).scatter(1, perm, tied_sorted)
    return grad, tied


# --------------------------------------------------------------------------------------
# Pooling windows
# --------------------------------------------------------------------------------------


class Pool(Family):
    """max_pool{1,2,3}d and adaptive_max_pool{1,2,3}d: a tie is a window whose maximum is
    carried by several inputs. PyTorch gives the window's gradient to the first of
    them in scan order, which is exactly "first"; "split" shares it equally."""

    def __init__(self, nd: int, adaptive: bool) -> None:
        self.nd = nd
        self.adaptive = adaptive

    def bind(self, func: Callable, args: tuple, kwargs: dict) -> Call:
        if self.adaptive:
            names: tuple[str, ...] = ("input", "output_size", "return_indices")
            defaults: dict[str, Any] = {"return_indices": False}
        else:
            names = (
                "input",
                "kernel_size",
                "stride",
                "padding",
                "dilation",
                "ceil_mode",
                "return_indices",
            )
            defaults = {
                "stride": None,
                "padding": 0,
                "dilation": 1,
                "ceil_mode": False,
                "return_indices": False,
            }
        params = _bind(names, defaults, args, kwargs)
        return Call(func, args, kwargs, params, [params["input"]])

    def _tuple(self, v: Any, default: Any = None) -> tuple[int, ...]:
        if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
            v = default
        if isinstance(v, int):
            return (v,) * self.nd
        return tuple(int(i) for i in v)

    def windows(self, call: Call, out_shape: Sequence[int]) -> Tensor:
        """Flat indices [O1, K1, O2, K2, ...] into x's spatial dims padded by one slot
        per dim (the pad slot stands for positions outside the input)."""
        x = call.inputs[0]
        spatial = x.shape[-self.nd :]
        outs = out_shape[-self.nd :]
        p = call.params
        per_dim = []
        for d in range(self.nd):
            L, O = spatial[d], outs[d]
            if self.adaptive:
                starts = [(o * L) // O for o in range(O)]
                ends = [-((-(o + 1) * L) // O) for o in range(O)]
                K = max(e - s for s, e in zip(starts, ends, strict=False)) if O else 0
                idx = [
                    [s + k if s + k < e else L for k in range(K)]
                    for s, e in zip(starts, ends, strict=False)
                ]
            else:
                k = self._tuple(p["kernel_size"])[d]
                s = self._tuple(p["stride"], p["kernel_size"])[d]
                pad = self._tuple(p["padding"])[d]
                dil = self._tuple(p["dilation"])[d]
                idx = []
                for o in range(O):
                    row = []
                    for j in range(k):
                        pos = o * s - pad + j * dil
                        row.append(pos if 0 <= pos < L else L)
                    idx.append(row)
            per_dim.append(_to_device(idx, x.device).reshape(O, -1))
        flat = torch.zeros((), dtype=torch.long, device=x.device)
        stride = 1
        for d in reversed(range(self.nd)):
            shape = [1] * (2 * self.nd)
            shape[2 * d], shape[2 * d + 1] = per_dim[d].shape
            flat = flat + per_dim[d].reshape(shape) * stride
            stride *= spatial[d] + 1
        return flat

    def _split(self, call: Call, values: Tensor, g: Tensor | None, rule: str):
        x = call.inputs[0].detach()
        unbatched = x.dim() == self.nd + 1
        if unbatched:
            x, values = x.unsqueeze(0), values.unsqueeze(0)
            g = g.unsqueeze(0) if g is not None else None
        lead = x.shape[: -self.nd]
        idx = self.windows(call, values.shape)
        xp = torch.nn.functional.pad(x, (0, 1) * self.nd, value=float("nan"))
        flat_x = xp.reshape(*lead, -1)
        W = flat_x[..., idx]  # [*lead, O1, K1, O2, K2, ...]
        vshape = list(values.shape[: len(lead)])
        for d in range(self.nd):
            vshape += [values.shape[len(lead) + d], 1]
        eq = W == values.reshape(vshape)
        kdims = tuple(len(lead) + 2 * d + 1 for d in range(self.nd))
        count = eq.sum(dim=kdims, keepdim=True)
        tie_windows = count > 1
        if g is None:
            hits = tie_windows.squeeze(kdims) if kdims else tie_windows
            return hits.squeeze(0) if unbatched else hits
        G = g.reshape(vshape)
        if rule == "split":
            contrib = torch.where(eq, G / count.to(G.dtype), torch.zeros_like(G))
        else:  # first in scan order = lowest flat position in the window
            flatw = eq.movedim(kdims, tuple(range(-self.nd, 0))).flatten(-self.nd)
            firstw = flatw & (flatw.long().cumsum(-1) == 1)
            firstw = firstw.reshape(eq.movedim(kdims, tuple(range(-self.nd, 0))).shape)
            firstw = firstw.movedim(tuple(range(-self.nd, 0)), kdims)
            contrib = torch.where(firstw, G, torch.zeros_like(G))
        nflat = flat_x.shape[-1]
        grad = torch.zeros(*lead, nflat, dtype=G.dtype, device=G.device)
        grad = grad.index_add(-1, idx.flatten(), contrib.reshape(*lead, -1))
        touched = (
            torch.zeros(*lead, nflat, dtype=G.dtype, device=G.device).index_add(
                -1, idx.flatten(), (eq & tie_windows).to(G.dtype).reshape(*lead, -1)
            )
            > 0
        )
        crop = [slice(None)] * len(lead) + [slice(0, s) for s in x.shape[-self.nd :]]
        shape_p = [*lead, *(s + 1 for s in x.shape[-self.nd :])]
        grad = grad.reshape(shape_p)[tuple(crop)]
        touched = touched.reshape(shape_p)[tuple(crop)]
        if unbatched:
            grad, touched = grad.squeeze(0), touched.squeeze(0)
        return grad, touched

    def tie_rule(self, call: Call, values: Tensor, g: Tensor, rule: str) -> tuple[Tensor, Tensor]:
        return self._split(call, values, g, rule)

    def apply(self, call: Call, value: Any) -> Any:
        return _apply_tie_rule(self, call, value)

    def exact_hits(self, call: Call, out: Any) -> Tensor:
        values = out[0] if isinstance(out, tuple) else out
        return self._split(call, values.detach(), None, "split")
