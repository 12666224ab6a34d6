"""While a watcher is active, an optimizer's `step()` and `zero_grad()` run without
interception.

Why: its calls are parameter updates under `no_grad`, not the model's computation, so
no kink of them is a hit of the model, and no policy can change them (a policy changes
gradients only). Yet intercepting them costs more than the whole watch: a plain SGD step
on six parameters makes ~35 intercepted calls (every `p.grad` read is one), against
seven for the forward. Not suspended: a step given a closure (LBFGS-style: the closure
runs the model's forward and backward, which must be intercepted), optimizers built with
`differentiable=True` (their step is recorded by autograd) and optimizers of tensor
subclasses with their own `__torch_function__` (disabling it would change what they
compute).

`zero_grad()` (every `p.grad` read and write is an intercepted call: a dozen for six
parameters, half the cost of the forward's interception) has no hook, so while a
watcher is active `Optimizer.zero_grad` and `Module.zero_grad` are wrapped to run
without interception when the parameters are plain tensors; they change no gradient
that any policy could choose. A wrapper is put in place only over PyTorch's own method,
and removed with the last watcher.

One pair of global optimizer hooks serves every watcher (reference counted), so
suspensions nest in order. An exception inside `step()` skips the post hook; `resume()`
(called by the watcher at every forward of a module and on exit) ends a suspension left
open that way, so interception never stays off.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _Open(threading.local):
    def __init__(self) -> None:
        self.stack: list[Any] = []  # one entry per step() in progress: a guard or None


OPEN = _Open()
_USERS = 0
_HANDLES: list[tuple[Any, Any]] = []  # (handle, hook)


def _plain_params(optimizer: torch.optim.Optimizer) -> bool:
    return all(type(p) in _PLAIN for g in optimizer.param_groups for p in g["params"])


def _plain(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> bool:
    # args[0] is the optimizer itself; a closure (or anything else) may run the model.
    if any(a is not None for a in args[1:]) or any(v is not None for v in kwargs.values()):
        return False
    if optimizer.defaults.get("differentiable"):
        return False
    return _plain_params(optimizer)


_TORCH_ZERO_GRAD = torch.optim.Optimizer.zero_grad
_TORCH_MODULE_ZERO_GRAD = torch.nn.Module.zero_grad


@torch._disable_dynamo  # (as PyTorch's own Optimizer.zero_grad)
@functools.wraps(_TORCH_ZERO_GRAD)
def _zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    if _plain_params(self):
        with torch._C.DisableTorchFunction():
            return _TORCH_ZERO_GRAD(self, set_to_none)
    return _TORCH_ZERO_GRAD(self, set_to_none)


@functools.wraps(_TORCH_MODULE_ZERO_GRAD)
def _module_zero_grad(self: torch.nn.Module, set_to_none: bool = True) -> None:
    if all(type(p) in _PLAIN for p in self.parameters()):
        with torch._C.DisableTorchFunction():
            return _TORCH_MODULE_ZERO_GRAD(self, set_to_none)
    return _TORCH_MODULE_ZERO_GRAD(self, set_to_none)


#: class -> (PyTorch's zero_grad, the wrapper that runs it without interception)
_ZERO_GRADS = {
    torch.optim.Optimizer: (_TORCH_ZERO_GRAD, _zero_grad),
    torch.nn.Module: (_TORCH_MODULE_ZERO_GRAD, _module_zero_grad),
}


def _wrap_zero_grad(on: bool) -> None:
    for cls, (theirs, ours) in _ZERO_GRADS.items():
        current = cls.__dict__.get("zero_grad")
        if on and current is theirs:
            cls.zero_grad = ours
        elif not on and current is ours:  # (left alone if someone wrapped it since)
            cls.zero_grad = theirs


def _pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    guard = None
    if _plain(optimizer, args, kwargs):
        guard = torch._C.DisableTorchFunction()
        guard.__enter__()
    OPEN.stack.append(guard)


def _post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if OPEN.stack:
        guard = OPEN.stack.pop()
        if guard is not None:
            guard.__exit__(None, None, None)


def resume() -> None:
    """End suspensions an exception inside `step()` left open (normally none)."""
    stack = OPEN.stack
    while stack:
        guard = stack.pop()
        if guard is not None:
            guard.__exit__(None, None, None)


def acquire() -> None:
    global _USERS
    if _USERS == 0:
        # Registered once, then put back under the same ids: a watcher entered every
        # step would otherwise make two new handles per step.
        if not _HANDLES:
            _HANDLES[:] = [
                (register_optimizer_step_pre_hook(_pre), _pre),
                (register_optimizer_step_post_hook(_post), _post),
            ]
        else:
            for handle, hook in _HANDLES:
                hooks = handle.hooks_dict_ref()
                if hooks is not None:
                    hooks[handle.id] = hook
        _wrap_zero_grad(True)
    _USERS += 1


def release() -> None:
    global _USERS
    _USERS -= 1
    if _USERS == 0:
        for handle, _ in _HANDLES:
            handle.remove()
        _wrap_zero_grad(False)
        resume()
