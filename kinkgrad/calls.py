"""What every family works with: one intercepted call (`Call`), one kink point on it
(`Kink`), argument binding, and the family base class."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor


class Kink:
    """One kink point of an elementwise op, evaluated on a call: the elements where
    `x == point` (and `valid`, if given) sit on it.

    `minus[i]` / `plus[i]` are the one-sided partial derivatives of the output with
    respect to differentiable input i on the side where `direction . inputs` is smaller /
    larger; `direction` is what the certified ("directional") mode projects tangents on.
    The mask is built only when asked for: on CPU most calls never need it.
    """

    __slots__ = ("x", "point", "valid", "minus", "plus", "direction", "_mask")

    def __init__(
        self,
        x: Tensor,
        point: float | Tensor,
        minus: tuple[Any, ...],
        plus: tuple[Any, ...],
        direction: tuple[float, ...],
        valid: Tensor | None = None,
    ) -> None:
        self.x, self.point, self.valid = x, point, valid
        self.minus, self.plus, self.direction = minus, plus, direction
        self._mask: Tensor | None = None

    @property
    def mask(self) -> Tensor:
        """Bool tensor: elements exactly on this kink (-0.0 counts as 0; NaN never)."""
        if self._mask is None:
            mask = self.x == self.point
            self._mask = mask if self.valid is None else mask & self.valid
        return self._mask

    def possible(self) -> bool:
        """False only if no element can be on the kink. On CPU one reduction decides
        (counting the non-zeros of x - point is much cheaper than building the mask);
        on accelerators asking would synchronise the host, so the answer is always True
        there."""
        x = self.x
        if not x.is_cpu or isinstance(self.point, Tensor):
            return True
        # count_nonzero reads x once and allocates nothing of x's size (and records no
        # graph: its output is an integer).
        d = x if self.point == 0 else x.detach() - self.point
        return int(torch.count_nonzero(d)) < d.numel()  # NaN is nonzero: never a kink


@dataclass
class Call:
    """One intercepted call, normalised: the callable, its bound parameters, its inputs."""

    func: Callable
    args: tuple
    kwargs: dict
    params: dict[str, Any]
    # Differentiable tensor inputs, in the order of the autograd node's grad_inputs;
    # None where the node has a slot but the argument is not a tensor.
    inputs: list[Tensor | None]
    inplace: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def run(self) -> Any:
        return self.func(*self.args, **self.kwargs)

    def replace(self, new: dict[Tensor, Tensor]) -> Call:
        """The same call with some tensor arguments swapped (matched by identity)."""
        pairs = list(new.items())

        def sub(v: Any) -> Any:
            for old, repl in pairs:  # `is`, not id(): torch.compile traces this
                if v is old:
                    return repl
            return v

        return Call(
            self.func,
            tuple(sub(a) for a in self.args),
            {k: sub(v) for k, v in self.kwargs.items()},
            {k: sub(v) for k, v in self.params.items()},
            [sub(t) for t in self.inputs],
            self.inplace,
            dict(self.extra),
        )


def _bind(names: Sequence[str], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict:
    """Map positional and keyword arguments to parameter names (signature of the op)."""
    bound = dict(defaults)
    if len(args) > len(names):
        raise TypeError(f"too many positional arguments: {len(args)} > {len(names)}")
    bound.update(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key in ("inplace", "out", "return_indices") or key in names:
            bound[key] = value
        else:
            raise TypeError(f"unexpected keyword argument {key!r}")
    return bound


def _grad_wanted(inputs: Sequence[Any]) -> bool:
    """Will autograd record this call? (Else the forward is all there is.)"""
    if not torch.is_grad_enabled():
        return False
    for t in inputs:  # a loop, not any(genexpr): this runs on every intercepted call
        if isinstance(t, Tensor) and t.requires_grad:
            return True
    return False


def refuse_forward_ad(call: Call, value: Any) -> None:
    """Raise if an input carries a forward-mode tangent (torch.func.jvp, jacfwd,
    `torch.autograd.forward_ad`): policies are autograd nodes of reverse mode, so the
    tangent would silently get PyTorch's derivative at every kink."""
    if fwAD._current_level < 0:  # no dual level open: the common case costs one read
        return
    for t in call.inputs:
        if isinstance(t, Tensor) and fwAD.unpack_dual(t).tangent is not None:
            name = getattr(call.func, "__name__", str(call.func))
            raise RuntimeError(
                f"kinkgrad: {name} received a forward-mode tangent (torch.func.jvp, "
                f"jacfwd or torch.autograd.forward_ad) under the policy {value!r}; "
                "policies apply to reverse mode only (backward, torch.func.vjp, grad, "
                "jacrev), and forward mode would silently use PyTorch's derivative at "
                "kinks. Use reverse mode, or kinkgrad.certified_grad for directional "
                "derivatives"
            )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)


def _needs_grad(out: Any) -> bool:
    return torch.is_grad_enabled() and isinstance(out, Tensor) and out.grad_fn is not None


def _is_float(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


# --------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------


class Family:
    """Base: binding, running, and the exact-hit mask used by `kinkgrad.watch`."""

    def bind(self, func: Callable, args: tuple, kwargs: dict) -> Call:  # pragma: no cover
        raise NotImplementedError

    def apply(self, call: Call, value: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def exact_hits(self, call: Call, out: Any) -> Tensor:  # pragma: no cover
        """Bool tensor: elements (or windows/reductions, for ties) exactly on a kink."""
        raise NotImplementedError


def check_node_inputs(node: Any, grad_inputs: tuple, expected: int) -> None:
    """A hook replaces gradients by position: refuse a node whose inputs differ from
    the catalog's (a PyTorch version that changed the op's signature)."""
    if len(grad_inputs) != expected:
        raise RuntimeError(
            f"kinkgrad: autograd node {type(node).__name__} has {len(grad_inputs)} "
            f"inputs, expected {expected}; please report this PyTorch version"
        )
