"""Functional forms, one per catalog op: `kinkgrad.relu(x, kink=1.0)`, ...

Each takes the arguments of its PyTorch counterpart plus one keyword: `kink` for
elementwise kink ops, `ties` for tie ops, `jump` for jump ops (default "torch").
They need no policy block and no interception.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .catalog import OpSpec, catalog
from .frames import validate
from .ops import dispatch

POLICY_KEYWORD = {"kink": "kink", "tie": "ties", "jump": "jump"}


def _make(spec: OpSpec) -> Callable[..., Any]:
    keyword = POLICY_KEYWORD[spec.kind]
    primary = spec.targets[0]

    def fn(*args: Any, **kwargs: Any) -> Any:
        value = validate(spec, kwargs.pop(keyword, "torch"))
        return dispatch(spec, primary, args, kwargs, value)

    fn.__name__ = fn.__qualname__ = spec.name
    fn.__doc__ = (
        f"`{primary.__module__ or 'torch'}.{primary.__name__}` with an explicit derivative at "
        f"its {spec.kind}s ({spec.kinks}).\n\n"
        f"**Arguments**: those of the PyTorch op, plus `{keyword}=` one of the values "
        f"`kinkgrad.policy({spec.name}=...)` accepts. PyTorch's own choice: {spec.torch_native}."
    )
    return fn


__all__ = [spec.name for spec in catalog()]
globals().update({spec.name: _make(spec) for spec in catalog()})
