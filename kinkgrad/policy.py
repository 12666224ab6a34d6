"""`kinkgrad.policy`: choose the derivative at kinks for every catalog op in a block.

Frames, validation and the per-thread stack live in `frames.py`; this module only opens
and closes a frame around the interception mode (`intercept.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ContextDecorator
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


class _PolicyBlock(ContextDecorator):
    """What `policy(...)` returns: a context manager (and decorator) for one frame.
    A class, not a generator: it is entered at every training step, and the generator
    machinery of `@contextmanager` cost as much again as the work itself."""

    def __init__(self, frame: dict[str, Value]) -> None:
        self.frame = frame
        self.view = MappingProxyType(frame)

    def __enter__(self) -> Mapping[str, Value]:
        push_frame(self.frame)
        acquire()
        return self.view

    def __exit__(self, *exc: object) -> None:
        release()
        pop_frame(self.frame)


def policy(default: object = None, **op_values: object) -> _PolicyBlock:
    """Choose the derivative at kinks for every catalog op called inside the block.

    **Arguments**: `default` applies to every op of the kind it fits (a number to every
    elementwise kink op, "first"/"split" to tie ops, "zero"/"ste" to jump ops); keywords
    name ops of `kinkgrad.catalog()`. Inner blocks win per op. Values are captured when
    the forward runs, so `backward()` may run after the block (checkpoint recomputation
    included). A block applies to the thread that opened it, like `torch.no_grad()`:
    for forwards in other threads use `kinkgrad.attach`. Invalid values raise here,
    before the block is entered. Usable as a decorator too.

    **Returns**: a context manager whose `with ... as frame` gives the validated frame
    (op name -> value), read-only.

    >>> import torch, kinkgrad as kg
    >>> x = torch.zeros(3, requires_grad=True)
    >>> with kg.policy(relu=1.0):
    ...     y = torch.relu(x).sum()
    >>> y.backward(); x.grad
    tensor([1., 1., 1.])
    """
    return _PolicyBlock(make_frame(op_values, default))
