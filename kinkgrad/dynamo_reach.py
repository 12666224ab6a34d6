"""Let `torch.compile` see every catalog callable that eager interception sees.

Eager PyTorch calls `__torch_function__` for every function bound in C, including the
in-place spellings (`torch.relu_`, `torch.abs_`, `torch.clamp_`, `F.hardtanh_`, ...).
Dynamo dispatches to a `TorchFunctionMode` only for the functions listed by
`torch.overrides.get_overridable_functions()`, a list that omits those spellings, so
under `torch.compile` they would run as plain PyTorch inside a policy: a silently wrong
gradient. Adding them to that (cached) list, before dynamo copies it, and to dynamo's
copy if it already exists, makes compiled code dispatch them to kinkgrad like eager
code does. `tests/test_compile.py` checks every such spelling against eager kinkgrad.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
from torch.overrides import get_overridable_functions


def _builtin(fn: Callable) -> bool:
    # Python-level functions (F.hardswish, ...) are inlined by dynamo, which then sees
    # their own has_torch_function check; only C-bound callables need listing.
    return not hasattr(fn, "__code__")


def install(targets: Iterable[Callable]) -> list[Callable]:
    """Register the C-bound `targets` as overridable; return those that were missing."""
    table = get_overridable_functions()
    known = {f for fs in table.values() for f in fs}
    missing = [f for f in targets if _builtin(f) and f not in known]
    if missing:
        table[torch].extend(missing)  # the cached dict: dynamo builds its set from it
        dynamo = sys.modules.get("torch._dynamo.variables.torch")
        if dynamo is not None:  # dynamo already built (and cached) its own set
            dynamo.get_overridable_functions().update(missing)
    return missing
