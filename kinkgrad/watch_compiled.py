"""`kinkgrad.watch` inside `torch.compile`: counts as tensor ops in the graph, recorded
by effectful custom ops at run time.

Why: while dynamo traces, the watcher's Python does not run, it is traced; reading a
value back (the CPU pre-check) or writing counts into Python lists and dicts would
break the graph, and step numbers read at trace time would be baked into it. So under
`torch.compiler.is_compiling()` the watcher builds each call's count vector with
tensor ops only (no pre-check, nothing read back), and hands it to
`kinkgrad::watch_record`, an op with an ordered side effect that the compiler keeps
and runs, opaque, with the graph: its Python looks up the step and the row when the
graph runs and appends the vector to the store (no device synchronisation). Steps
advance through `kinkgrad::watch_forward`, run where the root module's forward starts.
Effective hits pass through an identity autograd node whose backward counts the
non-zero upstream gradients at exact hits and records them with
`kinkgrad::watch_effective`, for the step of the forward call.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from typing import Any

import torch
from torch import Tensor
from torch._library.effects import EffectType
from torch.nn.modules import module as nn_module

from . import watch_count
from .at_kinks import as_bool, compact
from .families import Elementwise, Jump, Pool, Selection

#: Active watchers by id: the custom ops take an int, not the watcher.
WATCHERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


def register(watcher: Any) -> int:
    wid = next(_IDS)
    WATCHERS[wid] = watcher
    return wid


# Defined with torch.library.Library rather than custom_op: the op's Python runs
# straight from the dispatcher, without custom_op's autograd wrapper (several times
# the cost of the bookkeeping itself, at every call of the graph).
_LIB = torch.library.Library("kinkgrad", "FRAGMENT")
_LIB.define(
    "watch_record(Tensor vec, int wid, str module, str op, str dtype, SymInt elements, "
    "SymInt sites) -> Tensor"
)
_LIB.define("watch_effective(Tensor n, Tensor step, int wid, str module, str op, str dtype) -> ()")
_LIB.define("watch_forward(int wid) -> ()")


def _record_impl(
    vec: Tensor, wid: int, module: str, op: str, dtype: str, elements: int, sites: int
) -> Tensor:
    w = WATCHERS.get(wid)
    step = 0 if w is None else w.current_step
    if w is not None:
        store = w._store
        row = store.row((step, module, op, dtype))
        host = store.host[row]
        host[0] += 1
        host[1] += elements
        host[2] += sites
        store.add(row, vec.clone())  # (the graph may reuse vec's buffer)
    return torch.tensor(step, dtype=torch.int64)


def _effective_impl(n: Tensor, step: Tensor, wid: int, module: str, op: str, dtype: str) -> None:
    w = WATCHERS.get(wid)
    if w is not None:
        store = w._store
        store.add_effective(store.row((int(step), module, op, dtype)), n.clone())


def _forward_impl(wid: int) -> None:
    w = WATCHERS.get(wid)
    if w is not None:
        w._new_forward()


for _name, _impl in (
    ("watch_record", _record_impl),
    ("watch_effective", _effective_impl),
    ("watch_forward", _forward_impl),
):
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
    _LIB._register_effectful_op(f"kinkgrad::{_name}", EffectType.ORDERED)


@torch.library.register_fake("kinkgrad::watch_record", lib=_LIB)
def _(vec, wid, module, op, dtype, elements, sites):  # noqa: ANN001, ANN202
    return torch.empty((), dtype=torch.int64)


@torch.library.register_fake("kinkgrad::watch_effective", lib=_LIB)
def _(n, step, wid, module, op, dtype):  # noqa: ANN001, ANN202
    return None


@torch.library.register_fake("kinkgrad::watch_forward", lib=_LIB)
def _(wid):  # noqa: ANN001, ANN202
    return None


def install_hooks(watcher: Any) -> None:
    """The watcher's two global module hooks (filtered by its name map; they cost less
    to add and remove than two per submodule). Entered again, a watcher puts the same
    hooks back under the same handle ids: dynamo guards on those ids, so new ones
    would recompile a compiled model at every `with` block."""
    if watcher._hook_ids is None:
        pre = nn_module.register_module_forward_pre_hook(watcher._pre)
        post = nn_module.register_module_forward_hook(watcher._post, always_call=True)
        watcher._hook_ids = (pre.id, post.id)
        watcher._hook_fns = (watcher._pre, watcher._post)
        return
    (i, j), (pre_fn, post_fn) = watcher._hook_ids, watcher._hook_fns
    nn_module._global_forward_pre_hooks[i] = pre_fn
    nn_module._global_forward_hooks[j] = post_fn
    nn_module._global_forward_hooks_always_called[j] = True


def remove_hooks(watcher: Any) -> None:
    if watcher._hook_ids is not None:
        i, j = watcher._hook_ids
        nn_module._global_forward_pre_hooks.pop(i, None)
        nn_module._global_forward_hooks.pop(j, None)
        nn_module._global_forward_hooks_always_called.pop(j, None)


def new_forward(watcher: Any) -> None:
    """A forward of the root module starts, inside a compiled region."""
    torch.ops.kinkgrad.watch_forward(watcher._wid)


class _Tap(torch.autograd.Function):
    """Identity whose backward records the effective hits (gradient unchanged)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, exact: Tensor, step: Tensor, meta: tuple) -> Tensor:
        ctx.save_for_backward(exact, step)
        ctx.meta = meta
        return values.view_as(values)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        exact, step = ctx.saved_tensors
        n = watch_count.n_effective(as_bool(exact, grad), grad)
        torch.ops.kinkgrad.watch_effective(n, step, *ctx.meta)
        return grad, None, None, None


def _zero(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def before(watcher: Any, spec: Any, call: Any, x: Tensor, module: str) -> Any:
    """Count an elementwise or jump call (from its inputs, which an in-place op
    overwrites); returns what `after` needs."""
    meta = (watcher._wid, module, spec.name, watch_count.dtype_name(x.dtype))
    fam = spec.family
    if not isinstance(fam, (Elementwise, Jump)):
        return (meta, None, None)  # tie ops: from the output, in after
    with torch._C.DisableTorchFunction(), torch.no_grad():
        m = watch_count.Measure(watcher.near, watch_count.floats(call), False)
        if isinstance(fam, Jump):
            exact, near = watch_count.jump(spec, fam, call, m)
            sites = exact.numel()
        else:
            exact, near, sites = watch_count.elementwise(fam, call, m)
        step = torch.ops.kinkgrad.watch_record(
            watch_count.vector(exact, near, m, _zero(x.device)), *meta, x.numel(), sites
        )
    return (meta, exact, step)


def after(watcher: Any, spec: Any, call: Any, out: Any, entry: Any) -> Any:
    """Count a tie op from its output; route the output through `_Tap` for effective
    hits. Returns the output to use instead of `out`, or None."""
    meta, exact, step = entry
    values = out[0] if isinstance(out, tuple) else out
    if not isinstance(values, Tensor):
        return None
    if exact is None:
        x = call.inputs[0]
        with torch._C.DisableTorchFunction(), torch.no_grad():
            v = values.detach()
            m = watch_count.Measure(watcher.near, watch_count.floats(call), False)
            fam = spec.family
            if isinstance(fam, Selection):
                exact, near = watch_count.selection(fam, call, v, m)
            elif isinstance(fam, Pool):
                exact, near = watch_count.pool(spec, fam, call, out, v, m)
            else:
                exact = near = spec.hits(call, out)
            step = torch.ops.kinkgrad.watch_record(
                watch_count.vector(exact, near, m, _zero(v.device)), *meta, x.numel(), v.numel()
            )
    if exact is None or not (values.requires_grad and torch.is_grad_enabled()):
        return None
    # An in-place op (relu_) returns its input: the caller gets the tapped view, so
    # effective hits are counted where the caller uses the op's result (as
    # nn.ReLU(inplace=True) does), not where it reads the overwritten input again.
    with torch._C.DisableTorchFunction():
        tapped = _Tap.apply(values, compact(exact), step, meta)
    if isinstance(out, tuple):
        return type(out)((tapped, *out[1:]))
    return tapped


def in_compiled_graph(depth: int) -> bool:
    """True when the catalog call `depth` frames up (or a few frames above it: torch's
    functional wrappers) was made by a graph that dynamo produced (the `eager` backend
    runs it as Python, through the interception mode): its counts were already
    recorded by the ops traced into that graph."""
    frame = sys._getframe(depth + 1)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code.co_filename.startswith("<eval_with_key>"):
            meta = getattr(frame.f_locals.get("self"), "meta", None)
            return isinstance(meta, dict) and "dynamo_flat_name_to_original_fqn" in meta
        frame = frame.f_back
    return False
