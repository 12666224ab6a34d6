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
synchronisation, one `aminmax` per operand first rules out what cannot count, so a
call with nothing on a kink builds no mask and registers no backward hook
(`watch_count.CPU_PRECHECK`). An optimizer's `step()` and `zero_grad()` inside the
block run without interception (`watch_optimizer`). The watcher never changes forward values or
gradients: it only reads inputs, and its backward hooks return nothing.

**Transforms**: inside `torch.func.vmap` / `grad`, one-input elementwise and jump ops
are counted on the tensor below the batching (every vmapped instance; `samples` counts
instances of the outermost vmap), without effective hits; other ops are not counted
there (`Watcher.uncounted`, and a warning). Under `torch.compile` the counts are
tensor ops in the graph, recorded when it runs (`watch_compiled`): no graph break, no
read-back, counts equal eager's (`torch.relu_`, which dynamo traces without the
interception mode, is not seen there).

Multi-process: with `torch.distributed` initialised, `records(all_ranks=True)` and
`summary(all_ranks=True)` sum the counts of all ranks (a collective: every rank calls
it). `save`, `plot` and `to_tensorboard` with `all_ranks=True` write on rank 0 only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import (
    dynamo_graphs,
    ops,
    watch_compiled,
    watch_count,
    watch_dist,
    watch_optimizer,
    watch_plot,
    watch_report,
    watch_transforms,
)
from .families import Elementwise, Jump, Pool, Selection
from .intercept import acquire, release
from .policy import STATE
from .watch_count import NEAR_EPS_MULTIPLE
from .watch_report import COUNTS, Summary, cli, summarize
from .watch_store import Store

ROOT = "(root)"
OUTSIDE = "(outside)"
_TIE = object()  # marks a tie op: counted from its output, in after()

__all__ = ["NEAR_EPS_MULTIPLE", "Summary", "Watcher", "cli", "watch"]


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
        self._store = Store()
        self._stack: list[str] = []
        self._step = 0
        self._forwards = 0
        self._root_depth = 0
        self._hook_ids: tuple[int, int] | None = None
        self._names: dict[torch.nn.Module, str] = {}  # (also keeps the modules, so ids stay theirs)
        # Looked up by id: dynamo guards a dict keyed by modules key by key, at every call.
        self._by_id: dict[int, str] = {}
        self._active = False
        self._order: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        #: Calls inside torch.func transforms the watcher could not count, per op.
        self.uncounted: dict[str, int] = {}
        self._said_effective = False
        self._wid = watch_compiled.register(self)

    # ---- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Watcher:
        if self._active:
            raise RuntimeError("kinkgrad.watch: this watcher is already active")
        if not self._names:  # module paths, taken when the watcher is first entered
            self._names = {m: (name or ROOT) for name, m in self.model.named_modules()}
            self._order = {name: i for i, name in enumerate(self._names.values())}
            self._by_id = {id(m): name for m, name in self._names.items()}
        watch_compiled.install_hooks(self)
        STATE.watchers.append(self)
        try:
            acquire()
        except BaseException:
            self._unwatch()
            raise
        watch_optimizer.acquire()
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
            watch_optimizer.release()
            watch_optimizer.resume()
            release()
        finally:
            self._unwatch()

    def _unwatch(self) -> None:
        for i in range(len(STATE.watchers) - 1, -1, -1):
            if STATE.watchers[i] is self:
                del STATE.watchers[i]
                break
        watch_compiled.remove_hooks(self)
        self._stack.clear()
        self._root_depth = 0

    def _pre(self, module: Any, args: Any) -> None:
        if watch_optimizer.OPEN.stack:  # an optimizer step raised: intercept again
            watch_optimizer.resume()
        name = self._by_id.get(id(module))
        if name is None:
            return
        if module is self.model:
            if torch.compiler.is_compiling():  # steps advance when the graph runs
                if ROOT not in self._stack:
                    watch_compiled.new_forward(self)
            else:
                if self._root_depth == 0:
                    self._new_forward()
                self._root_depth += 1
        self._stack.append(name)

    def _new_forward(self) -> None:
        # A forward replayed by certification (its tangent pass) is not a new step.
        if not self._manual and not ops.REPLAY.active:
            if self._forwards:
                self._step += 1
            self._forwards += 1

    def _post(self, module: Any, args: Any, output: Any) -> None:  # None: output unchanged
        if id(module) in self._by_id and self._stack:
            self._stack.pop()
            if module is self.model and not torch.compiler.is_compiling():
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
    def active(self) -> bool:
        """True while the watcher counts (inside its `with` block)."""
        return self._active

    @property
    def current_step(self) -> int:
        return self._step

    # ---- called by ops.dispatch ------------------------------------------------------

    def before(self, spec: Any, call: Any) -> None:
        x = call.inputs[0] if call.inputs else None
        if not isinstance(x, Tensor):
            return
        if torch.compiler.is_compiling():  # (it traces torch.func transforms itself)
            module = self._stack[-1] if self._stack else OUTSIDE
            call.extra[self] = watch_compiled.before(self, spec, call, x, module)
            return
        if not dynamo_graphs.EVERY_GRAPH_WRAPPED and watch_compiled.in_compiled_graph(3):
            return
        transformed = torch._C._functorch.is_functorch_wrapped_tensor(x)
        if transformed:  # inside torch.func.vmap / grad: count the plain tensor below
            call = watch_transforms.unwrapped(self, spec, call)
            if call is None:
                return
            x = call.inputs[0]
        try:
            key = (
                self._step,
                self._stack[-1] if self._stack else OUTSIDE,
                spec.name,
                watch_count.dtype_name(x.dtype),
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
                seed: dict = {}
                with torch._C.DisableTorchFunction():  # (the pre-check reads x.detach())
                    n = watch_count.quick_near(fam, call, x, self.near, seed)
                if n is not None:
                    host[2] += x.numel()
                    host[3] += n
                    return
                # torch.no_grad() costs more than this whole check: set the flag.
                grad = torch.is_grad_enabled()
                torch._C._set_grad_enabled(False)
                try:
                    with torch._C.DisableTorchFunction():
                        m = self._measure(call, x, seed)
                        if isinstance(fam, Jump):
                            exact, near = watch_count.jump(spec, fam, call, m)
                            sites = exact.numel()
                        else:
                            exact, near, sites = watch_count.elementwise(fam, call, m)
                        exact = self._record(row, host, sites, exact, near, m)
                finally:
                    torch._C._set_grad_enabled(grad)
                if not transformed:  # (effective hits: see watch_transforms)
                    call.extra[self] = (row, exact)
            else:
                call.extra[self] = (row, _TIE)
        except Exception as e:  # never stop a training run over a count
            self._failed(spec, e)

    def after(self, spec: Any, call: Any, out: Any) -> Any:
        """Count tie ops from `out`; None, or (under torch.compile) the output to use
        instead of `out`, the same values through an identity autograd node."""
        entry = call.extra.pop(self, None)
        if entry is None:
            return None
        if torch.compiler.is_compiling():
            return watch_compiled.after(self, spec, call, out, entry)
        row, exact = entry
        if exact is None:
            return None  # elementwise call without exact hits: nothing for the backward
        values = out[0] if isinstance(out, tuple) else out
        if not isinstance(values, Tensor):
            return None
        backward = values.requires_grad and torch.is_grad_enabled()
        try:
            with torch._C.DisableTorchFunction(), torch.no_grad():
                if exact is _TIE:  # tie ops: windows/reductions, from the output
                    exact = self._ties(spec, call, out, values.detach(), row)
                if backward and exact is not None:
                    self._watch_backward(values, exact, row)
        except Exception as e:
            self._failed(spec, e)
        return None

    def _measure(self, call: Any, x: Tensor, seed: dict | None = None) -> watch_count.Measure:
        quick = watch_count.CPU_PRECHECK and x.is_cpu
        return watch_count.Measure(self.near, watch_count.floats(call), quick, seed)

    def _ties(self, spec: Any, call: Any, out: Any, values: Tensor, row: int) -> Tensor | None:
        host = self._store.host[row]
        x = call.inputs[0]
        m = self._measure(call, x)
        fam = spec.family
        if not x.numel() or not values.numel():
            exact = near = None
        elif isinstance(fam, Selection):
            exact, near = watch_count.selection(fam, call, values, m)
        elif isinstance(fam, Pool):
            exact, near = watch_count.pool(spec, fam, call, out, values, m)
        else:  # a family this module does not know: the catalog's hits, near = exact
            exact = near = spec.hits(call, out)
        return self._record(row, host, values.numel(), exact, near, m)

    def _record(
        self, row: int, host: list[int], sites: int, exact: Any, near: Any, m: watch_count.Measure
    ) -> Tensor | None:
        """Append this call's counts; return the exact mask if the backward should
        count effective hits (None: no hit, or on CPU none was found)."""
        host[2] += sites
        present = [t for t in (exact, near, m.subnormal, m.nonfinite) if t is not None]
        if not present:
            return None  # the pre-check ruled everything out: nothing to add
        vec = watch_count.vector(exact, near, m, self._store.zero_on(present[0].device))
        self._store.add(row, vec)
        if exact is not None and m.quick and not int(vec[0]):
            return None  # CPU: no hit, so no backward hook
        return exact

    def _watch_backward(self, values: Tensor, exact: Tensor, row: int) -> None:
        store = self._store

        def hook(grad: Tensor) -> None:
            with torch._C.DisableTorchFunction():
                store.add_effective(row, watch_count.n_effective(exact, grad))

        values.register_hook(hook)

    def _failed(self, spec: Any, error: Exception) -> None:
        watch_count.tally_and_warn_once(
            self.errors,
            spec.name,
            f"kinkgrad.watch could not count a call of {spec.name!r} "
            f"({type(error).__name__}: {error}); the op itself ran unchanged, and "
            f"Watcher.errors counts such calls",
            stacklevel=4,
        )

    # ---- results ---------------------------------------------------------------------

    def _sort_key(self, key: tuple) -> tuple:
        step, module, op, dtype = key
        order = self._order.get(module, len(self._order) + (module == OUTSIDE))
        return (step, order, module, op, dtype)

    def _table(
        self, all_ranks: bool, step: int | None = None
    ) -> tuple[list[tuple[tuple, list[int]]], int | str]:
        rows = self._store.read(step)
        rank: int | str = 0
        dist = watch_dist.distributed()
        if dist is not None:
            rank = dist.get_rank()
            if all_ranks:
                rows, rank = watch_dist.all_reduce(dist, rows, self._sort_key), "all"
        return sorted(rows, key=lambda r: self._sort_key(r[0])), rank

    def records(self, all_ranks: bool = False, step: int | None = None) -> list[dict[str, Any]]:
        """One dict per (step, module, op, dtype): the keys `step, module, op, dtype`,
        the counts `calls, elements, sites, exact, effective, near, subnormal, samples,
        nonfinite`, and `rank` ("all" for the all-ranks sum). Synchronises once.

        **Arguments**: `all_ranks`: sum over all ranks of `torch.distributed` (a
        collective: every rank must call it); ignored when it is not initialised.
        `step`: only that step's records (None: all).
        """
        rows, rank = self._table(all_ranks, step)
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
        if all_ranks and watch_dist.rank() != 0:
            return None
        return watch_report.save(records, path)

    def plot(self, path: str | Path, all_ranks: bool = False) -> Path | None:
        """PNG of exact and effective hits per step, one line per layer (module and
        op), log scale. With `all_ranks=True` every rank must call it; rank 0 draws."""
        records = self.records(all_ranks)
        if all_ranks and watch_dist.rank() != 0:
            return None
        title = f"kinkgrad.watch: kink hits per step ({type(self.model).__name__})"
        return watch_plot.plot(records, path, title=title)

    def to_tensorboard(
        self, writer: Any, step: int | None = None, all_ranks: bool = False
    ) -> dict[int, dict[str, int]]:
        """Write per-step kink counts as TensorBoard scalars: exact, effective and near
        hits per op (`kinkgrad/exact/op/relu`), per top-level module
        (`kinkgrad/exact/module/features`) and in total (`kinkgrad/exact/total`), at
        global step = the watcher's step. The Lightning callback logs the same names.

        **Arguments**: `writer`: a `torch.utils.tensorboard.SummaryWriter`, or a folder
        to open one in (needs `pip install 'kinkgrad[tensorboard]'`); `step`: the step
        to write (None: every step recorded); `all_ranks`: as in `records`, and only
        rank 0 writes.

        **Returns**: {step: {tag: value}}, what was written.

        >>> import torch, kinkgrad as kg
        >>> class Writer:  # any object with add_scalar, e.g. a SummaryWriter
        ...     def add_scalar(self, tag, value, global_step): print(tag, value, global_step)
        >>> m = torch.nn.ReLU()
        >>> with kg.watch(m) as w:
        ...     _ = m(torch.zeros(3))
        >>> _ = w.to_tensorboard(Writer(), step=0)  # doctest: +ELLIPSIS
        kinkgrad/exact/op/relu 3 0
        ...
        """
        per_step = watch_report.step_scalars(self.records(all_ranks, step))
        if all_ranks and watch_dist.rank() != 0:
            return per_step
        own = False
        if isinstance(writer, (str, Path)):
            writer, own = watch_report.summary_writer(writer), True
        try:
            for s, scalars in per_step.items():
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, s)
            if hasattr(writer, "flush"):
                writer.flush()
        finally:
            if own:
                writer.close()
        return per_step

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
