"""Policies that survive recomputation, and loud refusal where they cannot reach.

`torch.utils.checkpoint` runs a forward again during backward, possibly long after the
`kinkgrad.policy` block closed (reentrant: always outside any block). The policy frames
active when the checkpointed forward first ran are captured and pushed again around the
recomputation, so it computes the same gradients as the first forward. Installed once,
at import, by wrapping `CheckpointFunction.forward` (reentrant) and
`_checkpoint_without_reentrant_generator` (non-reentrant); idempotent.

TorchScript (`torch.jit.script` / `torch.jit.trace`) runs ops without Python, so no
policy can reach them: a scripted or traced module or function called while a policy is
active warns once per callable, and `kinkgrad.attach` refuses a scripted module.
`torch._C.ScriptFunction` is a C type, but its `__call__` slot can be replaced like a
Python class's, so scripted functions are caught the same way as modules.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint as _cp

from .frames import STATE, pop_frame, push_frame
from .intercept import active


def _with_frames(fn: Callable[..., Any], frames: tuple[dict, ...]) -> Callable[..., Any]:
    """`fn` run under `frames` (on top of whatever is active when it runs)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        for frame in frames:
            push_frame(frame)
        try:
            with active():
                return fn(*args, **kwargs)
        finally:
            for frame in reversed(frames):
                pop_frame(frame)

    return run


def _install_checkpoint() -> None:
    cls = _cp.CheckpointFunction
    if getattr(cls.forward, "_kinkgrad", False):
        return
    reentrant = cls.forward

    def forward(ctx: Any, run_function: Callable, preserve_rng_state: bool, *args: Any) -> Any:
        frames = tuple(STATE.frames)
        if frames:
            run_function = _with_frames(run_function, frames)
        return reentrant(ctx, run_function, preserve_rng_state, *args)

    forward._kinkgrad = True  # type: ignore[attr-defined]
    cls.forward = staticmethod(forward)

    generator = _cp._checkpoint_without_reentrant_generator

    @functools.wraps(generator)
    def without_reentrant(fn: Callable, *args: Any, **kwargs: Any) -> Any:
        frames = tuple(STATE.frames)
        if frames:
            fn = _with_frames(fn, frames)
        return generator(fn, *args, **kwargs)

    _cp._checkpoint_without_reentrant_generator = without_reentrant


_WARNED: set[str] = set()


def _warn_unreachable(kind: str, name: str) -> None:
    key = f"{kind} {name}"
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"kinkgrad: TorchScript {kind} {name!r} runs without Python, so the active "
            "kinkgrad policy does not reach the ops inside it (they get PyTorch's own "
            f"gradients); call the unscripted {kind} instead",
            stacklevel=3,
        )


def _wrap_call(cls: type, kind: str, name_of: Callable[[Any], str]) -> None:
    if getattr(cls.__call__, "_kinkgrad", False):
        return
    call = cls.__call__

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if STATE.frames:
            _warn_unreachable(kind, name_of(self))
        return call(self, *args, **kwargs)

    __call__._kinkgrad = True  # type: ignore[attr-defined]
    cls.__call__ = __call__


def _install_script_warning() -> None:
    _wrap_call(
        torch.jit.ScriptModule,
        "module",
        lambda m: getattr(m, "original_name", type(m).__name__),
    )
    _wrap_call(torch._C.ScriptFunction, "function", lambda f: f.qualified_name)


def install() -> None:
    _install_checkpoint()
    _install_script_warning()
