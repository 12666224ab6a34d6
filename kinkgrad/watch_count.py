"""Counting one call of a catalog op for `kinkgrad.watch`: exact, near, subnormal,
non-finite and sample counts from the catalog's kinks, ties and jumps (what is counted
is defined in `kinkgrad.watch`'s docstring)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .families import Elementwise, Jump, Pool, Selection

#: Default near-hit tolerance in machine epsilons of the dtype, times the magnitude of
#: the operand (see `kinkgrad.watch`).
NEAR_EPS_MULTIPLE = 4


def unwrap_transforms(t: Tensor) -> Tensor | None:
    """The plain tensor under `torch.func` wrappers (vmap's batched tensors, grad's
    tracking tensors), all levels; the outermost vmap's batch dimension moved to dim 0,
    so that `samples` counts vmapped instances. None: `t` is not wrapped."""
    functorch = torch._C._functorch
    if not functorch.is_functorch_wrapped_tensor(t):
        return None
    bdim = -1
    while functorch.is_functorch_wrapped_tensor(t):
        bdim = functorch.maybe_get_bdim(t) if functorch.is_batchedtensor(t) else -1
        t = functorch.get_unwrapped(t)
    return t.movedim(bdim, 0) if bdim > 0 else t


# Filled at import, not on first use: dynamo guards on the dict's contents when it
# traces `dtype_name`, and a dict filled while tracing would recompile once.
_DTYPE_NAMES: dict[torch.dtype, str] = {
    d: str(d).removeprefix("torch.") for d in vars(torch).values() if isinstance(d, torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def floats(call: Any) -> list[Tensor]:
    return [t for t in call.inputs if isinstance(t, Tensor) and t.is_floating_point()]


#: On CPU, reading a scalar back costs no synchronisation, so one `aminmax` per operand
#: first decides which counts can be non-zero (as `Kink.possible` does for policies);
#: the common case, no element on or near a kink, then builds no mask at all. On
#: accelerators nothing is ever read back. Tests run both paths on CPU.
CPU_PRECHECK = True


class Measure:
    """Operand statistics of one call (subnormal, nonfinite, magnitude) and the near
    tolerance. `quick`: the CPU pre-check is on; `span[id(t)]` is (min |t|, max |t|)."""

    __slots__ = ("near", "quick", "abs", "span", "subnormal", "nonfinite", "scale", "eps")

    def __init__(
        self, near: float | None, floats: list[Tensor], quick: bool, seed: dict | None = None
    ) -> None:
        self.near = near
        self.quick = quick
        self.abs: dict[int, Tensor] = {}
        self.span: dict[int, tuple[float, float]] = {}
        self.subnormal: Tensor | None = None
        self.nonfinite: Tensor | None = None
        self.scale: float | Tensor | None = None  # largest finite |input|
        self.eps = 0.0
        for t in floats:
            if not t.numel():
                continue
            known = seed.get(id(t)) if seed else None  # (|t|, min |t|, max |t|)
            a = t.abs() if known is None else known[0]
            self.abs[id(t)] = a
            info = torch.finfo(t.dtype)
            self.eps = max(self.eps, info.eps)
            finite, tiny_free = False, False
            if quick:
                if known is None:
                    lo, hi = torch.aminmax(a)
                    lo, hi = lo.item(), hi.item()
                else:
                    lo, hi = known[1], known[2]
                self.span[id(t)] = (lo, hi)
                finite = hi < math.inf  # False for inf and NaN
                tiny_free = lo >= info.tiny  # False for NaN
            if not finite:
                # (isfinite rather than a - a != 0: inductor's CPU code for that is
                # several times slower)
                self.nonfinite = _plus(self.nonfinite, a.numel() - n_true(torch.isfinite(a)))
            if not tiny_free:
                sub = n_true((a < info.tiny) & (a != 0))
                self.subnormal = _plus(self.subnormal, sub)
            if near is None:
                if finite:
                    s: float | Tensor = hi
                else:
                    s = torch.where(torch.isfinite(a), a, 0.0).amax()  # (as nan_to_num)
                    s = float(s) if quick else s
                self.scale = _largest(self.scale, s)

    def zero_tolerance(self) -> bool:
        return self.near == 0 or (self.near is None and (self.scale is None or not self.eps))

    def tol(self, point: float | Tensor = 0.0) -> float | Tensor:
        """Near tolerance at `point` (see the module docstring)."""
        if self.near is not None:
            return self.near
        c = NEAR_EPS_MULTIPLE * self.eps
        if isinstance(point, Tensor):
            return torch.clamp_min(point.abs().nan_to_num(0.0, 0.0, 0.0), self.scale) * c
        if isinstance(self.scale, Tensor):
            return self.scale.clamp_min(abs(point)) * c
        return max(self.scale, abs(point)) * c

    def absval(self, t: Tensor) -> Tensor:
        a = self.abs.get(id(t))
        return t.abs() if a is None else a

    def possible(self, k: Any) -> tuple[bool, bool]:
        """(exact, near): False only where no element can be on (near) kink `k`; the
        CPU pre-check, from the operand's span (min |x|, max |x|)."""
        point, kx = getattr(k, "point", None), getattr(k, "x", None)
        if not self.quick or kx is None or isinstance(point, Tensor) or point is None:
            return True, True
        span = self.span.get(id(kx))
        p = float(point)
        if span is None or not math.isfinite(p):
            return True, True
        lo, hi = span
        if p == 0:
            dmin = lo
        elif abs(p) > hi:
            dmin = abs(p) - hi  # every |x| <= hi, so |x - p| >= |p| - hi
        else:
            dmin = float((kx - p).abs().amin())
        if math.isnan(dmin):
            return True, True  # a NaN input: cannot tell, so count
        tol = 0.0 if self.zero_tolerance() else float(self.tol(p))
        return dmin == 0, dmin <= tol


#: Kink points of one-input elementwise calls, prepared once per (family, non-tensor
#: parameters): they do not depend on the tensor's values. None: not plain float points
#: (tensor bounds, a validity mask, a kink on another input), so the general path runs.
_POINTS: dict[tuple, tuple[float, ...] | None] = {}


def _points(fam: Elementwise, call: Any, x: Tensor) -> tuple[float, ...] | None:
    try:
        key = (fam, *(v for k, v in call.params.items() if k != "input"))
        points = _POINTS.get(key, False)
    except TypeError:  # an unhashable parameter: prepare nothing
        key, points = None, False
    if points is not False:
        return points
    points = []
    for k in fam.kinks(call):
        point = getattr(k, "point", None)
        if (
            getattr(k, "x", None) is not x
            or getattr(k, "valid", None) is not None
            or point is None
            or isinstance(point, Tensor)
        ):
            points = None
            break
        points.append(float(point))
    points = None if points is None else tuple(points)
    if key is not None and len(_POINTS) < 4096:  # bounded: parameters could be generated
        _POINTS[key] = points
    return points


#: (smallest normal, near tolerance per unit magnitude) per dtype; None: not a float.
_LIMITS: dict[torch.dtype, tuple[float, float] | None] = {}


def _float_limits(dtype: torch.dtype) -> tuple[float, float] | None:
    if dtype in _LIMITS:
        return _LIMITS[dtype]
    limits = None
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        limits = (info.tiny, NEAR_EPS_MULTIPLE * info.eps)
    _LIMITS[dtype] = limits
    return limits


def quick_near(fam: Any, call: Any, x: Tensor, near: float | None, seed: dict) -> int | None:
    """The CPU pre-check's common case, kept lean: a one-input elementwise op whose
    input has no NaN, inf, zero or subnormal element and no element on a kink point.
    Then every count but `near` is 0, no mask is kept and no backward hook is needed:
    returns the number of near elements (0 unless some element is within the tolerance
    of a kink point). None: the general path must run; `seed` then keeps |x| and its
    span for `Measure`. Reads only `x.detach()`, so it records no autograd graph."""
    if not (CPU_PRECHECK and type(fam) is Elementwise and len(call.inputs) == 1 and x.is_cpu):
        return None
    limits = _LIMITS.get(x.dtype, False)
    if limits is False:
        limits = _float_limits(x.dtype)
    if limits is None or not x.numel():
        return None
    points = _points(fam, call, x)
    if points is None:
        return None
    xd = x.detach()
    a = xd.abs()
    lo, hi = torch.aminmax(a)
    lo, hi = lo.item(), hi.item()
    seed[id(x)] = (a, lo, hi)
    tiny, c = limits
    if not (hi < math.inf and lo >= tiny):
        return None
    if points == (0.0,):  # relu and its kin: the distance to the kink is |x|, known
        tol = near if near is not None else c * hi
        if lo > tol:
            return 0
        return int(torch.count_nonzero(a <= tol))
    close: list[tuple[float, float]] = []
    for p in points:
        if not math.isfinite(p):
            continue  # x is finite: never on an infinite kink point
        if p == 0:
            dmin = lo
        elif abs(p) > hi:
            dmin = abs(p) - hi
        else:
            dmin = (xd - p).abs().amin().item()
        if dmin == 0:
            return None  # an exact hit: masks, samples and the backward hook
        tol = near if near is not None else c * max(hi, abs(p))
        if dmin <= tol:
            close.append((p, tol))
    mask = None
    for p, tol in close:  # the same test as _near_kink's, without a Measure
        m = (a if p == 0 else (xd - p).abs()) <= tol
        mask = m if mask is None else mask | m
    return 0 if mask is None else int(torch.count_nonzero(mask))


def tally_and_warn_once(counts: dict[str, int], name: str, message: str, stacklevel: int) -> None:
    """Count a call of op `name` that the watcher could not count; warn on the first.
    `stacklevel` as the caller would pass it to `warnings.warn`."""
    counts[name] = counts.get(name, 0) + 1
    if counts[name] == 1:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def n_true(mask: Tensor) -> Tensor:
    """Number of True elements, as an int64 tensor. Summed in int32 where that cannot
    overflow: inductor's CPU code for int64 counts converts every 16-lane mask to two
    8-lane int64 vectors, twice the work of the comparison itself."""
    if mask.numel() < 2**31:
        return mask.sum(dtype=torch.int32).to(torch.int64)
    return torch.count_nonzero(mask)


def vector(exact: Any, near: Any, m: Measure, zero: Tensor) -> Tensor:
    """One call's count vector (`watch_store.DEVICE_COLUMNS`) from its masks; `zero`: an
    int64 0-d zero on their device."""
    n_exact = zero if exact is None else n_true(exact)
    return torch.stack(
        [
            n_exact,
            zero,
            zero if near is None else n_true(near),
            zero if m.subnormal is None else m.subnormal,
            zero if exact is None else samples(exact, n_exact),
            zero if m.nonfinite is None else m.nonfinite,
        ]
    )


def n_effective(exact: Tensor, grad: Tensor) -> Tensor:
    """Effective hits: exact hits (bool `exact`) whose upstream gradient is non-zero
    (NaN counts; -0.0 does not)."""
    return n_true(torch.where(exact, grad, 0) != 0)


def _plus(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else a + b


def _largest(a: float | Tensor | None, b: float | Tensor) -> float | Tensor:
    if a is None:
        return b
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return max(a, b)


def samples(mask: Tensor, exact: Tensor) -> Tensor:
    if mask.dim() <= 1 or mask.shape[0] == 0:
        return exact  # a 0-d or 1-d mask: every site is its own row
    return n_true(mask.reshape(mask.shape[0], -1).any(1))


def _near_kink(k: Any, hit: Tensor | None, m: Measure) -> Tensor | None:
    """Elements within the tolerance of one kink point (`Kink.point`, in x's terms)."""
    point, kx = getattr(k, "point", None), getattr(k, "x", None)
    if point is None or kx is None or not kx.is_floating_point() or m.zero_tolerance():
        return k.mask if hit is None else hit
    if isinstance(point, Tensor):
        close = (kx - point).abs() <= m.tol(point)
    else:
        p = float(point)
        if not math.isfinite(p):
            return k.mask if hit is None else hit
        close = (m.absval(kx) if p == 0 else (kx - p).abs()) <= m.tol(p)
    valid = getattr(k, "valid", None)
    return close if valid is None else close & valid


def elementwise(fam: Elementwise, call: Any, m: Measure) -> tuple[Any, Any, int]:
    """(exact mask, near mask, sites) of an elementwise kink op, from the catalog's
    kinks; a mask is None where the pre-check rules every element out."""
    kinks, bcall = fam.kink_list(call)
    tensors = [t for t in bcall.inputs if isinstance(t, Tensor)]
    if len(tensors) == 1:
        shape = tensors[0].shape
    else:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    exact = near = None
    for k in kinks:
        on, close = m.possible(k)
        hit = k.mask if on else None
        if hit is not None:
            exact = hit if exact is None else exact | hit
        if close:
            c = _near_kink(k, hit, m)
            near = c if near is None else near | c
    return exact, near, math.prod(shape)


def jump(spec: Any, fam: Jump, call: Any, m: Measure) -> tuple[Tensor, Tensor]:
    """Exact hits from the catalog's jump mask; near: the piece on both sides of x
    differs (the value for piecewise-constant ops, else the a.e. derivative)."""
    exact = spec.hits(call)
    x = call.inputs[0]
    if not x.is_floating_point() or m.zero_tolerance() or not x.numel():
        return exact, exact
    if fam.piecewise_constant:
        piece: Callable[[Tensor], Tensor] = lambda y: call.replace({x: y}).run()
    elif fam.native_grad is not None:
        piece = lambda y: fam.native_grad(torch.ones_like(y), call, y)
    else:
        return exact, exact
    tol = m.tol(0.0)
    near = (piece(x - tol) != piece(x + tol)) & (x == x)
    return exact, near | exact


def selection(fam: Selection, call: Any, values: Tensor, m: Measure) -> tuple[Tensor, Tensor]:
    """Tied output slots / reductions: another input equals (is near) the selected
    value. Built from the family's own row layout, returned in `values`' layout."""
    X, V, _ = fam.rows(call, values)
    V = V.contiguous()
    xs = X.sort(dim=1).values
    nans = None
    if X.is_floating_point():
        # searchsorted needs a sorted row; NaN (sorted last) becomes +inf, and is
        # subtracted again where the search reaches +inf.
        nans = torch.isnan(X).sum(1, keepdim=True)
        xs = xs.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    xs = xs.contiguous()

    def count(lo: Tensor, hi: Tensor) -> Tensor:
        n = torch.searchsorted(xs, hi, right=True) - torch.searchsorted(xs, lo)
        if nans is not None:
            n = n - torch.where(hi == math.inf, nans, 0)
        return n

    valid = V == V
    exact = (count(V, V) > 1) & valid
    if not X.is_floating_point() or m.zero_tolerance():
        near = exact
    else:
        tol = m.tol(0.0)
        near = ((count(V - tol, V + tol) > 1) & valid) | exact

    def layout(M: Tensor) -> Tensor:
        if values.dim() == 0:
            return M.reshape(())
        if call.extra.get("mode") == "slots":
            d = int(call.params.get("dim", -1)) % values.dim()
            return M.reshape(values.movedim(d, -1).shape).movedim(-1, d)
        return M.reshape(values.shape)

    return layout(exact), layout(near)


def pool(spec: Any, fam: Pool, call: Any, out: Any, values: Tensor, m: Measure):
    """Exact: the catalog's tied windows. Near: windows where another input is within
    the tolerance of the window's maximum."""
    exact = spec.hits(call, out)
    x = call.inputs[0]
    if not x.is_floating_point() or m.zero_tolerance() or not values.numel():
        return exact, exact
    nd = fam.nd
    v = values
    unbatched = x.dim() == nd + 1
    if unbatched:
        x, v = x.unsqueeze(0), v.unsqueeze(0)
    lead = x.shape[:-nd]
    idx = fam.windows(call, v.shape)
    xp = torch.nn.functional.pad(x, (0, 1) * nd, value=float("nan"))
    W = xp.reshape(*lead, -1)[..., idx]  # [*lead, O1, K1, O2, K2, ...]
    vshape = list(lead)
    for d in range(nd):
        vshape += [v.shape[len(lead) + d], 1]
    kdims = tuple(len(lead) + 2 * d + 1 for d in range(nd))
    close = ((v.reshape(vshape) - W) <= m.tol(0.0)).sum(dim=kdims)
    near = (close > 1) & (v == v)
    if unbatched:
        near = near.squeeze(0)
    return exact, near | exact
