"""Kink-hit accounting: how often does training sit exactly on a kink?

>>> import torch, kinkgrad as kg
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
>>> _ = [torch.nn.init.zeros_(p) for p in model.parameters()]  # every ReLU input is 0
>>> with kg.watch(model) as w:
...     model(torch.ones(4, 2)).sum().backward()
>>> r = w.records()[0]
>>> r["module"], r["op"], r["exact"], r["effective"], r["samples"]
('1', 'relu', 12, 12, 4)

**What is counted**, per step, module path, op and dtype (one record each):

- `calls`; `elements` (size of the op's first input); `sites` (where a hit can happen:
  elements for elementwise ops, windows / reductions / output slots for tie ops).
- `exact`: sites exactly on a kink, as the catalog defines it (`OpSpec.hits`): an
  input equal to a kink point (-0.0 counts as 0, NaN never), a tie a == b, a window or
  reduction whose maximum is carried by several inputs, an output slot of sort/topk
  whose value occurs more than once.
- `effective`: exact hits whose upstream gradient is non-zero (NaN counts as non-zero),
  i.e. where the policy's value at the kink changes the gradient. Counted when backward
  runs, for the step and module of the forward call, so backward may run later.
- `near`: sites within a tolerance of a kink, exact hits included. The tolerance is
  `near` when given (an absolute distance), else `NEAR_EPS_MULTIPLE` (4) machine
  epsilons of the dtype times the operand's magnitude: max(|kink point|, largest finite
  |input| of the call). Why: an input computed by a matmul or a sum carries rounding
  errors of a few ulps of the largest terms, so an element that close to the kink could
  have landed on either side, or on it. For tie ops a site is near when another
  element is within the tolerance of the selected value; for jump ops when the
  piece (value, or for hardshrink/threshold the a.e. derivative) differs between
  x - tol and x + tol.
- `subnormal`: input elements with 0 < |x| < finfo(dtype).tiny.
- `samples`: rows along dim 0 of the hit mask (the batch rows of a layer's activation)
  with at least one exact hit; for a full reduction, 1 if it tied.
- `nonfinite`: NaN or infinite input elements.

**Modules**: each call counts for the innermost submodule of `model` whose forward is
running (its `named_modules` path, e.g. `features.3`; functional calls inside a
module's forward count for that module). `model`'s own forward is "(root)"; calls
inside the block but outside any forward of `model` (a loss, say) are "(outside)".

**Steps**: a step is one forward of `model` (re-entrant calls of `model` inside its own
forward do not start one). Calls before the first forward belong to step 0 and calls
after a forward (the loss, the backward) to that forward's step. Call `w.step()` to
take over: from the first call on, steps advance only when you call it (use it when a
step has several forwards, e.g. gradient accumulation); `watch(model, step="manual")`
starts that way.

**Cost**: counts are int64 tensors on the tensor's device; an op call appends one
small vector and nothing waits for the device (checked on CUDA with
`torch.cuda.set_sync_debug_mode("error")`). Reading (`records`, `summary`, `save`,
`plot`, `print`) synchronises once. On CPU, where reading a value back is no
synchronisation, one `aminmax` per operand first rules out what cannot count (as the
core's `Kink.possible` does), so a call with nothing on or near a kink builds no mask
and registers no backward hook (`CPU_PRECHECK`). The watcher never changes forward
values or gradients: it only reads inputs, and its backward hooks return nothing.

Multi-process: with `torch.distributed` initialised, `records(all_ranks=True)` and
`summary(all_ranks=True)` sum the counts of all ranks (a collective: every rank calls
it). `save` and `plot` with `all_ranks=True` write on rank 0 only.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules import module as nn_module

from . import ops, watch_report
from .families import Elementwise, Jump, Pool, Selection, _to_device
from .intercept import acquire, release
from .policy import STATE
from .watch_report import COUNTS, Summary, summarize

#: Default near-hit tolerance in machine epsilons of the dtype, times the magnitude of
#: the operand (see the module docstring).
NEAR_EPS_MULTIPLE = 4
ROOT = "(root)"
OUTSIDE = "(outside)"
#: Device-side columns; the host keeps calls, elements, sites.
_DEVICE = ("exact", "effective", "near", "subnormal", "samples", "nonfinite")
_FLUSH = 256
_TIE = object()  # marks a tie op: counted from its output, in after()

__all__ = ["NEAR_EPS_MULTIPLE", "Summary", "Watcher", "cli", "watch"]


# --------------------------------------------------------------------------------------
# Storage: per-row host ints plus device counts folded in blocks
# --------------------------------------------------------------------------------------


class _Store:
    """Counters of one watcher. A row is one (step, module, op, dtype) key. Each call
    appends its count vector; every `_FLUSH` vectors are folded into one dense int64
    tensor per device with one `index_add_`, so no call waits for the device."""

    def __init__(self) -> None:
        self.keys: list[tuple] = []
        self.index: dict[tuple, int] = {}
        self.host: list[list[int]] = []  # calls, elements, sites
        self.lock = threading.Lock()
        # device -> (rows, vectors [6]) and (rows, effective scalars)
        self.fwd: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        self.eff: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        self.dense: dict[torch.device, Tensor] = {}
        self.zero: dict[torch.device, Tensor] = {}

    def row(self, key: tuple) -> int:
        i = self.index.get(key)
        if i is None:
            with self.lock:
                i = self.index.get(key)
                if i is None:
                    i = self.index[key] = len(self.keys)
                    self.keys.append(key)
                    self.host.append([0, 0, 0])
        return i

    def zero_on(self, device: torch.device) -> Tensor:
        z = self.zero.get(device)
        if z is None:
            z = self.zero[device] = torch.zeros((), dtype=torch.int64, device=device)
        return z

    def add(self, row: int, vec: Tensor) -> None:
        with self.lock:
            rows, vecs = self.fwd.setdefault(vec.device, ([], []))
            rows.append(row)
            vecs.append(vec)
            if len(rows) >= _FLUSH:
                self._flush(vec.device)

    def add_effective(self, row: int, n: Tensor) -> None:
        with self.lock:
            rows, vals = self.eff.setdefault(n.device, ([], []))
            rows.append(row)
            vals.append(n)
            if len(rows) >= _FLUSH:
                self._flush(n.device)

    def _dense(self, device: torch.device) -> Tensor:
        need = len(self.keys)
        d = self.dense.get(device)
        if d is None or d.shape[0] < need:
            new = torch.zeros(max(64, 2 * need), len(_DEVICE), dtype=torch.int64, device=device)
            if d is not None:
                new[: d.shape[0]] = d
            d = self.dense[device] = new
        return d

    def _flush(self, device: torch.device) -> None:
        """Fold pending vectors of `device` into its dense tensor (caller holds the lock)."""
        dense = self._dense(device)
        rows, vecs = self.fwd.pop(device, ([], []))
        if rows:
            dense.index_add_(0, _to_device(rows, device), torch.stack(vecs))
        rows, vals = self.eff.pop(device, ([], []))
        if rows:
            dense[:, 1].index_add_(0, _to_device(rows, device), torch.stack(vals))

    def read(self) -> list[tuple[tuple, list[int]]]:
        """(key, counts in COUNTS order) per row; one device-to-host copy per device."""
        with self.lock, torch._C.DisableTorchFunction():
            devices = set(self.fwd) | set(self.eff) | set(self.dense)
            totals = [[0] * len(_DEVICE) for _ in self.keys]
            for device in devices:
                self._flush(device)
                for i, vals in enumerate(self.dense[device][: len(self.keys)].tolist()):
                    totals[i] = [a + b for a, b in zip(totals[i], vals, strict=True)]
            return [(key, [*self.host[i], *totals[i]]) for i, key in enumerate(self.keys)]


# --------------------------------------------------------------------------------------
# Counting one call
# --------------------------------------------------------------------------------------


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _floats(call: Any) -> list[Tensor]:
    return [t for t in call.inputs if isinstance(t, Tensor) and t.is_floating_point()]


#: On CPU, reading a scalar back costs no synchronisation, so one `aminmax` per operand
#: first decides which counts can be non-zero (as `Kink.possible` does for policies);
#: the common case, no element on or near a kink, then builds no mask at all. On
#: accelerators nothing is ever read back. Tests run both paths on CPU.
CPU_PRECHECK = True


class _Measure:
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
                # a - a is 0 exactly where a is finite (inf - inf and NaN give NaN).
                self.nonfinite = _plus(self.nonfinite, torch.count_nonzero(a - a))
            if not tiny_free:
                sub = torch.count_nonzero((a < info.tiny) & (a != 0))
                self.subnormal = _plus(self.subnormal, sub)
            if near is None:
                if finite:
                    s: float | Tensor = hi
                else:
                    s = a.nan_to_num(0.0, 0.0, 0.0).amax()
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


def _nothing_to_count(fam: Any, call: Any, x: Tensor, near: float | None, seed: dict) -> bool:
    """The CPU pre-check's common case, kept lean: a one-input elementwise op whose
    input has no NaN, inf, zero or subnormal and no element within the tolerance of a
    kink point. Then every device count is 0 and nothing is built. Otherwise `seed`
    keeps |x| and its span for `_Measure`."""
    if not (
        CPU_PRECHECK
        and type(fam) is Elementwise
        and len(call.inputs) == 1
        and x.device.type == "cpu"
        and x.is_floating_point()
        and x.numel()
    ):
        return False
    xd = x.detach()
    a = xd.abs()
    lo, hi = torch.aminmax(a)
    lo, hi = lo.item(), hi.item()
    seed[id(x)] = (a, lo, hi)
    info = torch.finfo(x.dtype)
    if not (hi < math.inf and lo >= info.tiny):
        return False
    c = NEAR_EPS_MULTIPLE * info.eps
    for k in fam.kinks(call):
        point = getattr(k, "point", None)
        if point is None or isinstance(point, Tensor):
            return False
        p = float(point)
        if not math.isfinite(p):
            continue  # x is finite: never on an infinite kink point
        if p == 0:
            dmin = lo
        elif abs(p) > hi:
            dmin = abs(p) - hi
        else:
            dmin = (xd - p).abs().amin().item()
        if not dmin > (near if near is not None else c * max(hi, abs(p))):
            return False
    return True


def _plus(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else a + b


def _largest(a: float | Tensor | None, b: float | Tensor) -> float | Tensor:
    if a is None:
        return b
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return max(a, b)


def _samples(mask: Tensor, exact: Tensor) -> Tensor:
    if mask.dim() <= 1 or mask.shape[0] == 0:
        return exact  # a 0-d or 1-d mask: every site is its own row
    return mask.reshape(mask.shape[0], -1).any(1).sum()


def _near_kink(k: Any, hit: Tensor | None, m: _Measure) -> Tensor | None:
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


def _elementwise(fam: Elementwise, call: Any, m: _Measure) -> tuple[Any, Any, int]:
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


def _jump(spec: Any, fam: Jump, call: Any, m: _Measure) -> tuple[Tensor, Tensor]:
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


def _selection(fam: Selection, call: Any, values: Tensor, m: _Measure) -> tuple[Tensor, Tensor]:
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


def _pool(spec: Any, fam: Pool, call: Any, out: Any, values: Tensor, m: _Measure):
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


# --------------------------------------------------------------------------------------
# The watcher
# --------------------------------------------------------------------------------------


def _check_near(near: object) -> float | None:
    if near is None:
        return None
    if isinstance(near, bool) or not isinstance(near, (int, float)):
        raise TypeError(
            f"kinkgrad.watch: near must be None or a number >= 0 (an absolute distance "
            f"to the kink); got {near!r} of type {type(near).__name__}"
        )
    near = float(near)
    if not (math.isfinite(near) and near >= 0):
        raise ValueError(
            f"kinkgrad.watch: near must be a finite number >= 0 (an absolute distance to "
            f"the kink), or None for {NEAR_EPS_MULTIPLE} machine epsilons times the "
            f"operand's magnitude; got {near!r}"
        )
    return near


class Watcher:
    """Counts kink hits of every catalog op called while it is active (see the module
    docstring for what is counted). Made by `kinkgrad.watch`; use it as a context
    manager. A watcher may be entered again after it exits: counts accumulate."""

    def __init__(self, model: torch.nn.Module, near: float | None = None, step: str = "forward"):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"kinkgrad.watch expects an nn.Module (the model whose forwards define "
                f"steps and module paths); got {type(model).__name__}"
            )
        if step not in ("forward", "manual"):
            raise ValueError(
                f"kinkgrad.watch: step must be 'forward' (one step per forward of the "
                f"model) or 'manual' (only w.step() advances); got {step!r}"
            )
        self.model = model
        self.near = _check_near(near)
        self._manual = step == "manual"
        self._store = _Store()
        self._stack: list[str] = []
        self._step = 0
        self._forwards = 0
        self._root_depth = 0
        self._handles: list[Any] = []
        self._names: dict[torch.nn.Module, str] = {}
        self._active = False
        self._order: dict[str, int] = {}
        self.errors: dict[str, int] = {}

    # ---- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Watcher:
        if self._active:
            raise RuntimeError("kinkgrad.watch: this watcher is already active")
        if not self._names:  # module paths, taken when the watcher is first entered
            self._names = {m: (name or ROOT) for name, m in self.model.named_modules()}
            self._order = {name: i for i, name in enumerate(self._names.values())}
        # Two global hooks (filtered by the name map) cost less to add and remove than
        # two per submodule; modules outside `model` are not in the map and ignored.
        self._handles = [
            nn_module.register_module_forward_pre_hook(self._pre),
            nn_module.register_module_forward_hook(self._post, always_call=True),
        ]
        STATE.watchers.append(self)
        try:
            acquire()
        except BaseException:
            self._unwatch()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop counting (what `with` does on exit). Counts stay readable."""
        if not self._active:
            return
        self._active = False
        try:
            release()
        finally:
            self._unwatch()

    def _unwatch(self) -> None:
        for i in range(len(STATE.watchers) - 1, -1, -1):
            if STATE.watchers[i] is self:
                del STATE.watchers[i]
                break
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stack.clear()
        self._root_depth = 0

    def _pre(self, module: Any, args: Any) -> None:
        name = self._names.get(module)
        if name is None:
            return
        if module is self.model:
            # A forward replayed by certification (its tangent pass) is not a new step.
            if self._root_depth == 0 and not self._manual and not ops.REPLAY.active:
                if self._forwards:
                    self._step += 1
                self._forwards += 1
            self._root_depth += 1
        self._stack.append(name)

    def _post(self, module: Any, args: Any, output: Any) -> None:  # None: output unchanged
        if module in self._names and self._stack:
            self._stack.pop()
            if module is self.model:
                self._root_depth = max(0, self._root_depth - 1)

    def step(self) -> int:
        """End the current step; later calls count for the next one. From the first
        call on, only `step()` advances steps (forwards no longer do).

        **Returns**: the index of the step now starting.
        """
        self._manual = True
        self._step += 1
        return self._step

    @property
    def current_step(self) -> int:
        return self._step

    # ---- called by ops.dispatch ------------------------------------------------------

    def before(self, spec: Any, call: Any) -> None:
        x = call.inputs[0] if call.inputs else None
        if not isinstance(x, Tensor):
            return
        try:
            key = (
                self._step,
                self._stack[-1] if self._stack else OUTSIDE,
                spec.name,
                _dtype_name(x.dtype),
            )
            store = self._store
            row = store.row(key)
            host = store.host[row]
            host[0] += 1
            host[1] += x.numel()
            fam = spec.family
            if isinstance(fam, (Elementwise, Jump)):
                # Elementwise kinks are read from the inputs before the op runs: an
                # in-place op (relu_, clamp_) overwrites them.
                with torch._C.DisableTorchFunction(), torch.no_grad():
                    seed: dict = {}
                    if _nothing_to_count(fam, call, x, self.near, seed):
                        host[2] += x.numel()
                        return
                    m = self._measure(call, x, seed)
                    if isinstance(fam, Jump):
                        exact, near = _jump(spec, fam, call, m)
                        sites = exact.numel()
                    else:
                        exact, near, sites = _elementwise(fam, call, m)
                    exact = self._record(row, host, sites, exact, near, m)
                call.extra[self] = (row, exact)
            else:
                call.extra[self] = (row, _TIE)
        except Exception as e:  # never stop a training run over a count
            self._failed(spec, e)

    def after(self, spec: Any, call: Any, out: Any) -> None:
        entry = call.extra.pop(self, None)
        if entry is None:
            return
        row, exact = entry
        if exact is None:
            return  # elementwise call without exact hits: nothing for the backward
        values = out[0] if isinstance(out, tuple) else out
        if not isinstance(values, Tensor):
            return
        backward = values.requires_grad and torch.is_grad_enabled()
        try:
            with torch._C.DisableTorchFunction(), torch.no_grad():
                if exact is _TIE:  # tie ops: windows/reductions, from the output
                    exact = self._ties(spec, call, out, values.detach(), row)
                if backward and exact is not None:
                    self._watch_backward(values, exact, row)
        except Exception as e:
            self._failed(spec, e)

    def _measure(self, call: Any, x: Tensor, seed: dict | None = None) -> _Measure:
        quick = CPU_PRECHECK and x.device.type == "cpu"
        return _Measure(self.near, _floats(call), quick, seed)

    def _ties(self, spec: Any, call: Any, out: Any, values: Tensor, row: int) -> Tensor | None:
        host = self._store.host[row]
        x = call.inputs[0]
        m = self._measure(call, x)
        fam = spec.family
        if not x.numel() or not values.numel():
            exact = near = None
        elif isinstance(fam, Selection):
            exact, near = _selection(fam, call, values, m)
        elif isinstance(fam, Pool):
            exact, near = _pool(spec, fam, call, out, values, m)
        else:  # a family this module does not know: the catalog's hits, near = exact
            exact = near = spec.hits(call, out)
        return self._record(row, host, values.numel(), exact, near, m)

    def _record(
        self, row: int, host: list[int], sites: int, exact: Any, near: Any, m: _Measure
    ) -> Tensor | None:
        """Append this call's counts; return the exact mask if the backward should
        count effective hits (None: no hit, or on CPU none was found)."""
        host[2] += sites
        present = [t for t in (exact, near, m.subnormal, m.nonfinite) if t is not None]
        if not present:
            return None  # the pre-check ruled everything out: nothing to add
        device = present[0].device
        zero = self._store.zero_on(device)
        n_exact = zero if exact is None else torch.count_nonzero(exact)
        vec = torch.stack(
            [
                n_exact,
                zero,
                zero if near is None else torch.count_nonzero(near),
                zero if m.subnormal is None else m.subnormal,
                zero if exact is None else _samples(exact, n_exact),
                zero if m.nonfinite is None else m.nonfinite,
            ]
        )
        self._store.add(row, vec)
        if exact is not None and m.quick and not int(n_exact):
            return None  # CPU: no hit, so no backward hook
        return exact

    def _watch_backward(self, values: Tensor, exact: Tensor, row: int) -> None:
        store = self._store

        def hook(grad: Tensor) -> None:
            with torch._C.DisableTorchFunction():
                store.add_effective(row, torch.count_nonzero(torch.where(exact, grad, 0)))

        values.register_hook(hook)

    def _failed(self, spec: Any, error: Exception) -> None:
        first = spec.name not in self.errors
        self.errors[spec.name] = self.errors.get(spec.name, 0) + 1
        if first:
            warnings.warn(
                f"kinkgrad.watch could not count a call of {spec.name!r} "
                f"({type(error).__name__}: {error}); the op itself ran unchanged, and "
                f"Watcher.errors counts such calls",
                RuntimeWarning,
                stacklevel=4,
            )

    # ---- results ---------------------------------------------------------------------

    def _sort_key(self, key: tuple) -> tuple:
        step, module, op, dtype = key
        order = self._order.get(module, len(self._order) + (module == OUTSIDE))
        return (step, order, module, op, dtype)

    def _table(self, all_ranks: bool) -> tuple[list[tuple[tuple, list[int]]], int | str]:
        rows = self._store.read()
        rank: int | str = 0
        dist = _distributed()
        if dist is not None:
            rank = dist.get_rank()
            if all_ranks:
                rows, rank = _all_reduce(dist, rows, self._sort_key), "all"
        return sorted(rows, key=lambda r: self._sort_key(r[0])), rank

    def records(self, all_ranks: bool = False) -> list[dict[str, Any]]:
        """One dict per (step, module, op, dtype): the keys `step, module, op, dtype`,
        the counts `calls, elements, sites, exact, effective, near, subnormal, samples,
        nonfinite`, and `rank` ("all" for the all-ranks sum). Synchronises once.

        **Arguments**: `all_ranks`: sum over all ranks of `torch.distributed` (a
        collective: every rank must call it); ignored when it is not initialised.
        """
        rows, rank = self._table(all_ranks)
        out = []
        for (step, module, op, dtype), counts in rows:
            r: dict[str, Any] = {"step": step, "module": module, "op": op, "dtype": dtype}
            r.update(zip(COUNTS, counts, strict=True))
            r["rank"] = rank
            out.append(r)
        return out

    def summary(self, all_ranks: bool = False) -> Summary:
        """Counts per (module, op, dtype) summed over steps, plus totals; an empty
        `Summary` (no rows, zero totals) if nothing was recorded. See `records`."""
        rows, rank = self._table(all_ranks)
        s = summarize(
            {"step": k[0], "module": k[1], "op": k[2], "dtype": k[3], **dict(zip(COUNTS, c))}
            for k, c in rows
        )
        s.rank = rank
        return s

    def save(self, path: str | Path, all_ranks: bool = False) -> Path | None:
        """Write `records()` to `path`: JSON Lines (.jsonl) or CSV (.csv), atomically.
        With `all_ranks=True` every rank must call it and rank 0 writes.

        **Returns**: the path written, or None on ranks that did not write.
        """
        records = self.records(all_ranks)
        if all_ranks and _rank() != 0:
            return None
        return watch_report.save(records, path)

    def plot(self, path: str | Path, all_ranks: bool = False) -> Path | None:
        """PNG of exact and effective hits per step, one line per layer (module and
        op), log scale. With `all_ranks=True` every rank must call it; rank 0 draws."""
        records = self.records(all_ranks)
        if all_ranks and _rank() != 0:
            return None
        title = f"kinkgrad.watch: kink hits per step ({type(self.model).__name__})"
        return watch_report.plot(records, path, title=title)

    def __rich__(self) -> Any:
        return watch_report.table(self.summary())

    def __str__(self) -> str:
        return watch_report.render(self.summary())

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return (
            f"<kinkgrad.Watcher of {type(self.model).__name__}: {state}, step "
            f"{self._step}, near={self.near if self.near is not None else 'auto'}>"
        )


def _distributed() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    dist = _distributed()
    return dist.get_rank() if dist is not None else 0


def _all_reduce(dist: Any, rows: list, sort_key: Callable) -> list:
    """Sum rows over ranks; ranks may have seen different keys, so the union first."""
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, [k for k, _ in rows])
    union = sorted({k for ks in keys for k in ks}, key=sort_key)
    if not union:
        return []
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    where = {k: i for i, k in enumerate(union)}
    table = torch.zeros(len(union), len(COUNTS), dtype=torch.int64)
    for k, counts in rows:
        table[where[k]] = torch.tensor(counts, dtype=torch.int64)
    table = table.to(device)
    dist.all_reduce(table)
    return list(zip(union, table.cpu().tolist(), strict=True))


def watch(model: torch.nn.Module, near: float | None = None, *, step: str = "forward") -> Watcher:
    """Count exact and near kink hits of every catalog op `model` (or anything else in
    the block) calls, per step, module path and op.

    **Arguments**: `model` (any `nn.Module`, unmodified; its forwards define steps and
    module paths); `near` (absolute distance for near hits; None: 4 machine epsilons of
    the dtype times the operand's magnitude); `step` ("forward": one step per forward
    of `model`; "manual": only `w.step()` advances).

    **Returns**: a `Watcher`; read it with `records()`, `summary()`, `save()`, `plot()`,
    `print(w)`.

    >>> import torch, kinkgrad as kg
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> with kg.watch(model) as w:
    ...     for _ in range(3):
    ...         model(torch.randn(16, 4)).sum().backward()
    >>> [r["step"] for r in w.records()]
    [0, 1, 2]
    """
    return Watcher(model, near=near, step=step)


def cli(argv: list[str]) -> int:
    """`kinkgrad watch-summary PATH [--steps]`: print a saved record file as a table."""
    parser = argparse.ArgumentParser(
        prog="kinkgrad watch-summary",
        description="Print a kinkgrad.watch record file (.jsonl or .csv) as a table.",
    )
    parser.add_argument("path", help="file written by Watcher.save")
    parser.add_argument(
        "--steps", action="store_true", help="also print one line per step and layer"
    )
    args = parser.parse_args(argv)
    try:
        records = watch_report.load(args.path)
    except (OSError, ValueError) as e:
        print(f"kinkgrad watch-summary: {e}", file=sys.stderr)
        return 2
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a file or a pipe: wide enough for every column
        console = Console(width=160)
    summary = summarize(records)
    if records:
        summary.rank = records[0].get("rank", 0)
    console.print(watch_report.table(summary, title=f"{args.path}: {summary.steps} step(s)"))
    if args.steps:
        console.print(watch_report.steps_table(records))
    return 0
