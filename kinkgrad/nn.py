"""Drop-in modules: `kinkgrad.nn.ReLU(kink=1.0)`, `kinkgrad.nn.MaxPool2d(2, ties="split")`.

Each subclasses the torch.nn module of the same name, takes one extra keyword (`kink`,
`ties` or `jump`) and applies that policy to its own op only.
"""

from __future__ import annotations

from typing import Any

import torch.nn as tnn

from .frames import make_frame, pop_frame, push_frame
from .functional import POLICY_KEYWORD
from .intercept import acquire, release


class _WithPolicy:
    """Mixin: push this module's one-op policy around the parent's forward."""

    kg_op = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from .catalog import spec_by_name

        keyword = POLICY_KEYWORD[spec_by_name(self.kg_op).kind]
        value = kwargs.pop(keyword, "torch")
        super().__init__(*args, **kwargs)
        self.kg_frame = make_frame({self.kg_op: value})
        self.kg_value = self.kg_frame[self.kg_op]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        push_frame(self.kg_frame)
        acquire()
        try:
            return super().forward(*args, **kwargs)
        finally:
            release()
            pop_frame(self.kg_frame)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.kg_op}={self.kg_value!r}".lstrip(", ")


def _dropin(base: type, op: str) -> type:
    return type(
        base.__name__,
        (_WithPolicy, base),
        {"kg_op": op, "__module__": __name__, "__doc__": f"{base.__doc__ or ''}"},
    )


ReLU = _dropin(tnn.ReLU, "relu")
ReLU6 = _dropin(tnn.ReLU6, "relu6")
LeakyReLU = _dropin(tnn.LeakyReLU, "leaky_relu")
Hardtanh = _dropin(tnn.Hardtanh, "hardtanh")
Hardsigmoid = _dropin(tnn.Hardsigmoid, "hardsigmoid")
Hardswish = _dropin(tnn.Hardswish, "hardswish")
Softshrink = _dropin(tnn.Softshrink, "softshrink")
Hardshrink = _dropin(tnn.Hardshrink, "hardshrink")
Threshold = _dropin(tnn.Threshold, "threshold")
MaxPool1d = _dropin(tnn.MaxPool1d, "max_pool1d")
MaxPool2d = _dropin(tnn.MaxPool2d, "max_pool2d")
MaxPool3d = _dropin(tnn.MaxPool3d, "max_pool3d")
AdaptiveMaxPool1d = _dropin(tnn.AdaptiveMaxPool1d, "adaptive_max_pool1d")
AdaptiveMaxPool2d = _dropin(tnn.AdaptiveMaxPool2d, "adaptive_max_pool2d")
AdaptiveMaxPool3d = _dropin(tnn.AdaptiveMaxPool3d, "adaptive_max_pool3d")

__all__ = [
    "ReLU",
    "ReLU6",
    "LeakyReLU",
    "Hardtanh",
    "Hardsigmoid",
    "Hardswish",
    "Softshrink",
    "Hardshrink",
    "Threshold",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d",
    "AdaptiveMaxPool3d",
]
