"""`kinkgrad.watch` inside `torch.func` transforms (vmap, grad): the call on the plain
tensor below the wrappers, where it can be counted."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from . import watch_count
from .families import Elementwise, Jump


def unwrapped(watcher: Any, spec: Any, call: Any) -> Any:
    """The call on the plain tensor under `torch.func` wrappers, whose elements are
    those of every vmapped instance; None (and a warning, once per op) for what
    cannot be counted there: ops with several tensor inputs, whose batch layouts
    would have to be aligned, and tie ops. Effective hits are not counted inside
    transforms: a backward hook there sees the gradient of the transform's level,
    not the one the exact mask is laid out for; a warning says so once."""
    tensors = [t for t in call.inputs if isinstance(t, Tensor)]
    if isinstance(spec.family, (Elementwise, Jump)) and len(tensors) == 1:
        x = call.inputs[0]
        if torch._C._functorch.is_gradtrackingtensor(x) and not watcher._said_effective:
            watcher._said_effective = True
            warnings.warn(
                "kinkgrad.watch counts exact, near, subnormal and non-finite elements "
                "inside torch.func transforms (vmap, grad), but not effective hits: "
                "Watcher.records() has effective = 0 for those calls",
                RuntimeWarning,
                stacklevel=5,
            )
        return call.replace({x: watch_count.unwrap_transforms(x)})
    watch_count.tally_and_warn_once(
        watcher.uncounted,
        spec.name,
        f"kinkgrad.watch cannot count {spec.name!r} inside torch.func transforms "
        f"(vmap, grad): there it counts one-input elementwise and jump ops only; "
        f"the op ran unchanged, and Watcher.uncounted counts the calls skipped",
        stacklevel=5,
    )
    return None
