"""`kinkgrad.policy`: choose the derivative at kinks for every catalog op in a block.

Frames, validation and the per-thread stack live in `frames.py`; this module only opens
and closes a frame around the interception mode (`intercept.py`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

from .frames import (  # noqa: F401  (re-exported: older imports name this module)
    COMMON,
    JUMP_RULES,
    KINK_ALIASES,
    STATE,
    TIE_RULES,
    Value,
    allowed_values,
    make_frame,
    pop_frame,
    push_frame,
    validate,
)
from .intercept import acquire, release


@contextmanager
def policy(default: object = None, **op_values: object) -> Iterator[Mapping[str, Value]]:
    """Choose the derivative at kinks for every catalog op called inside the block.

    **Arguments**: `default` applies to every op of the kind it fits (a number to every
    elementwise kink op, "first"/"split" to tie ops, "zero"/"ste" to jump ops); keywords
    name ops of `kinkgrad.catalog()`. Inner blocks win per op. Values are captured when
    the forward runs, so `backward()` may run after the block (checkpoint recomputation
    included). A block applies to the thread that opened it, like `torch.no_grad()`:
    for forwards in other threads use `kinkgrad.attach`.

    **Returns**: the validated frame (op name -> value), read-only.

    >>> import torch, kinkgrad as kg
    >>> x = torch.zeros(3, requires_grad=True)
    >>> with kg.policy(relu=1.0):
    ...     y = torch.relu(x).sum()
    >>> y.backward(); x.grad
    tensor([1., 1., 1.])
    """
    frame = make_frame(op_values, default)
    push_frame(frame)
    acquire()
    try:
        yield MappingProxyType(frame)
    finally:
        release()
        pop_frame(frame)
