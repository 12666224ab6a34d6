"""The one TorchFunctionMode, and attaching policies to modules.

Every torch call made while a policy, a watcher or an attached module is active passes
through `_KinkMode.__torch_function__`; calls of catalog ops go to `ops.dispatch`, all
others straight to PyTorch (one dict lookup of overhead).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .catalog import targets, targets_by_name
from .dynamo_graphs import install_if_loaded
from .frames import make_frame, pop_frame, push_frame
from .ops import dispatch

#: `targets_by_name()`, built once as a plain global: what dynamo reads while tracing
#: the mode (through the memo's closure it would guard the closure cell too).
_BY_NAME = targets_by_name()


class _KinkMode(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.table = targets()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if torch.compiler.is_compiling():  # (see `targets_by_name`)
            spec = None
            for fn, candidate in _BY_NAME.get(getattr(func, "__name__", ""), ()):
                if fn is func:
                    spec = candidate
                    break
        else:
            spec = self.table.get(func)
        if kwargs is None:
            kwargs = {}
        if spec is None:
            return func(*args, **kwargs)
        return dispatch(spec, func, args, kwargs)


def _is_ours(mode: object) -> bool:
    return isinstance(mode, _KinkMode)


class _Depth(threading.local):
    def __init__(self) -> None:
        self.count = 0
        self.mode = _KinkMode()  # one per thread, entered and left as often as needed


_DEPTH = _Depth()


def acquire() -> None:
    """Make sure the interception mode is on (reference counted, per thread)."""
    if _DEPTH.count == 0:
        install_if_loaded(_is_ours)
        _DEPTH.mode.__enter__()
    _DEPTH.count += 1


def release() -> None:
    _DEPTH.count -= 1
    if _DEPTH.count == 0:
        _DEPTH.mode.__exit__(None, None, None)


@contextmanager
def active() -> Iterator[None]:
    """The interception mode on for a block, even where the stack of modes was reset:
    the autograd engine runs backward (and a checkpoint's recomputation in it) without
    the Python modes of the thread that called backward."""
    stack = torch.overrides._get_current_function_mode_stack()
    if any(m is _DEPTH.mode for m in stack):
        acquire()
        try:
            yield
        finally:
            release()
        return
    _DEPTH.mode.__enter__()
    try:
        yield
    finally:
        _DEPTH.mode.__exit__(None, None, None)


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach(model: torch.nn.Module, default: object = None, **op_values: object) -> torch.nn.Module:
    """Give `model` a persistent policy, applied whenever its forward runs.

    Policies of enclosing `kinkgrad.policy` blocks still apply to ops the attached
    policy does not name; an attached submodule's policy wins inside it. The policy
    travels with the module: its hooks run in whichever thread calls it, so this is
    the way to set policies for threaded code. TorchScript modules are refused (their
    ops run without Python).

    >>> import torch, kinkgrad as kg
    >>> m = kg.attach(torch.nn.ReLU(), relu=1.0)
    >>> x = torch.zeros(2, requires_grad=True); m(x).sum().backward(); x.grad
    tensor([1., 1.])
    >>> _ = kg.detach(m)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"kinkgrad.attach expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"kinkgrad.attach: {type(model).__name__} is a TorchScript module; its ops run "
            "without Python and no policy can reach them. Attach to the module before "
            "scripting it, and run that module instead"
        )
    frame = make_frame(op_values, default)
    detach(model)

    def pre(module: Any, args: Any) -> None:
        push_frame(frame)
        acquire()

    def post(module: Any, args: Any, output: Any) -> None:
        release()
        pop_frame(frame)

    handles = (
        model.register_forward_pre_hook(pre),
        model.register_forward_hook(post, always_call=True),
    )
    _ATTACHED[model] = (frame, handles)
    return model


def detach(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the policy `attach` gave `model` (no-op if there is none)."""
    entry = _ATTACHED.pop(model, None)
    if entry is not None:
        for handle in entry[1]:
            handle.remove()
    return model


def attached(model: torch.nn.Module) -> dict[str, Any] | None:
    """The policy frame attached to `model`, or None."""
    entry = _ATTACHED.get(model)
    return dict(entry[0]) if entry else None
