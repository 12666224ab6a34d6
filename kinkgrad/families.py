"""Op families: how to read a call, where its kinks are, and the policy's gradient there.

Every catalog entry (`catalog.py`) is one instance of a family (here: elementwise kinks,
binary ties, jumps; `ties.py`: selections and pooling) plus its data. The forward is
always PyTorch's own op on the same values, so forward values are PyTorch's bit for bit.
Off the kinks the gradient is PyTorch's own too: an elementwise family only *replaces*
the gradient at the elements that sit exactly on a kink, with two ordinary autograd
nodes (`at_kinks.py`). Nothing is paid where nothing changes: with the "torch" policy
nothing is inserted, and in eager mode on CPU only when some element sits on a kink.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .at_kinks import Assign, Block, Slopes, _transformed, as_bool, compact, lazy
from .calls import (  # noqa: F401  (re-exported: certify and watch import them from here)
    Call,
    Family,
    Kink,
    _bind,
    _grad_wanted,
    _is_float,
    _needs_grad,
    _warn_once,
    check_node_inputs,
    refuse_forward_ad,
)
from .ties import (  # noqa: F401  (re-exported)
    Pool,
    Selection,
    _groups,
    _run_with_input_fix,
    _selection_grad,
    _to_device,
)


class Elementwise(Family):
    """Elementwise op with kinks at points given by `kinks(call)`.

    `signature` names the op's parameters after the input; `tensor_params` are those
    that may be differentiable tensors (clamp's bounds). A numeric policy value `a`
    means derivative := (1 - a) * D- + a * D+ at the kink, times the upstream gradient.
    """

    def __init__(
        self,
        signature: Sequence[str],
        defaults: dict[str, Any],
        kinks: Callable[[Call], list[Kink]],
        tensor_params: Sequence[str] = (),
        inplace_funcs: Sequence[Callable] = (),
        alt_signature: Sequence[str] | None = None,
    ) -> None:
        # alt_signature: a second way the op is called (nn.ReLU6 calls F.hardtanh(x, 0, 6)).
        self.alt_signature = None if alt_signature is None else ("input", *alt_signature)
        self.signature = ("input", *signature)
        self.defaults = defaults
        self.kinks = kinks
        self.tensor_params = tuple(tensor_params)
        self.inplace_funcs = tuple(inplace_funcs)

    def bind(self, func: Callable, args: tuple, kwargs: dict) -> Call:
        if len(args) == 1 and not kwargs and not self.tensor_params:  # the hot path: relu(x)
            params = dict(self.defaults)
            params["input"] = args[0]
            return Call(func, args, kwargs, params, [args[0]], func in self.inplace_funcs)
        try:
            params = _bind(self.signature, self.defaults, args, kwargs)
        except TypeError:
            if self.alt_signature is None:
                raise
            params = _bind(self.alt_signature, self.defaults, args, kwargs)
        inplace = bool(params.get("inplace")) or func in self.inplace_funcs
        tensors = [params.get(p) for p in self.tensor_params]
        if any(isinstance(t, Tensor) for t in tensors):
            inputs = [params["input"], *(t if isinstance(t, Tensor) else None for t in tensors)]
        else:
            inputs = [params["input"]]
        return Call(func, args, kwargs, params, inputs, inplace)

    def value_to_number(self, value: Any) -> float:
        return float(value)

    def kink_list(self, call: Call) -> tuple[list[Kink], Call]:
        if len(call.inputs) > 1:
            call = _broadcast(call)
        return self.kinks(call), call

    def apply(self, call: Call, value: Any) -> Any:
        refuse_forward_ad(call, value)
        if not _is_float(call.inputs[0]) and _grad_wanted(call.inputs):
            call = _promote(call)
        x = call.inputs[0]
        if not _is_float(x) or x.numel() == 0 or not _grad_wanted(call.inputs):
            return call.run()  # no gradient will be asked for: the forward is all there is
        if x.layout != torch.strided:
            _warn_once(
                f"kinkgrad: policies do not apply to {x.layout} tensors; this call runs as "
                "plain PyTorch (PyTorch's gradient at every kink)"
            )
            return call.run()
        kinks, call = self.kink_list(call)
        if not lazy(x):  # eager CPU: one cheap reduction, then only kinks that are hit
            kinks = [k for k in kinks if k.possible()]
            kinks = [k for k in kinks if bool(k.mask.any())]
        if not kinks:
            return call.run()
        a = self.value_to_number(value)
        masks = [k.mask for k in kinks]  # built before the op: an in-place op overwrites x
        coefs = tuple(
            tuple((1 - a) * m + a * p for m, p in zip(k.minus, k.plus, strict=False)) for k in kinks
        )
        on_any = masks[0]
        for m in masks[1:]:
            on_any = on_any | m
        on_any, masks = compact(on_any), [compact(m) for m in masks]
        inputs = [t if isinstance(t, Tensor) else None for t in call.inputs]
        swap = {}
        for i, t in enumerate(inputs):
            if t is not None and (t.requires_grad or (i == 0 and call.inplace)):
                swap[t] = Block.apply(t, on_any) if t.requires_grad else t.clone()
        native = call.replace(swap).run()
        out = Slopes.apply(native, len(masks), coefs, *masks, *inputs)
        if call.inplace:  # autograd tracks this copy into x, views of x included
            # (Assign is exact to the sign of zero gradients, but autograd's view
            # handling drops the rest of a view's base through a custom in-place node.)
            if x._is_view() or _transformed():
                return x.copy_(out)
            return Assign.apply(x, out)
        return out

    def exact_hits(self, call: Call, out: Any = None) -> Tensor:
        kinks, _ = self.kink_list(call)
        mask = torch.zeros_like(call.inputs[0], dtype=torch.bool)
        for k in kinks:
            mask = mask | k.mask
        return mask


def _promote(call: Call) -> Call:
    """An integer or bool x with a floating tensor argument (`maximum(int_t, w)`,
    `clamp(int_t, min=w)`): PyTorch computes in the promoted floating dtype, and `w`'s
    gradient has the kink at `x == w` too. Casting x first is what PyTorch does inside
    the op (same forward bits) and lets the policy reach `w`. In place, PyTorch refuses
    the op itself (it cannot write floats into x)."""
    floats = [t for t in call.inputs[1:] if _is_float(t)]
    x = call.inputs[0]
    if call.inplace or not floats or not isinstance(x, Tensor) or x.is_complex():
        return call
    # PyTorch's promotion: dimensioned tensors win over 0-d ones within a category,
    # and any floating tensor wins over x's integer category.
    pool = [t for t in floats if t.dim()] or floats
    dtype = pool[0].dtype
    for t in pool[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return call.replace({x: x.to(dtype)})


def _broadcast(call: Call) -> Call:
    """Expand tensor inputs to the output shape, so the autograd node sees full-shape
    gradients (the engine would otherwise sum a broadcast input's gradient before our
    hook could replace single elements). Expanding changes no forward value."""
    tensors = [t for t in call.inputs if isinstance(t, Tensor)]
    if len(tensors) < 2:
        return call
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    if all(t.shape == shape for t in tensors) or (call.inplace and tensors[0].shape != shape):
        return call  # nothing to do, or PyTorch itself will refuse the in-place op
    return call.replace({t: t.expand(shape) for t in tensors if t.shape != shape})


class BinaryTie(Elementwise):
    """maximum/minimum/fmax/fmin: a tie a == b is the kink of max(a - b, 0) + b.

    Tie rules map to the numeric convention: "first" gives everything to the first
    argument, "split" halves it (PyTorch's choice for maximum/minimum).
    """

    def __init__(self, first_side: str) -> None:
        self.first_side = first_side  # "plus" for max-like, "minus" for min-like
        if first_side == "plus":  # maximum: a > b selects a
            kinks = lambda c: [Kink(c.inputs[0], c.inputs[1], (0.0, 1.0), (1.0, 0.0), (1.0, -1.0))]
        else:  # minimum: a < b selects a
            kinks = lambda c: [Kink(c.inputs[0], c.inputs[1], (1.0, 0.0), (0.0, 1.0), (1.0, -1.0))]
        super().__init__(("other",), {}, kinks, tensor_params=("other",))

    def bind(self, func: Callable, args: tuple, kwargs: dict) -> Call:
        call = super().bind(func, args, kwargs)
        if len(call.inputs) != 2:
            raise TypeError(f"{func.__name__} expects two tensors")
        return call

    def value_to_number(self, value: Any) -> float:
        if value == "split":
            return 0.5
        return 1.0 if self.first_side == "plus" else 0.0  # "first"

    def apply(self, call: Call, value: Any) -> Any:
        if not (_is_float(call.inputs[0]) or _is_float(call.inputs[1])):
            return call.run()  # integers: no gradient anywhere
        return super().apply(call, value)


# --------------------------------------------------------------------------------------
# Jumps
# --------------------------------------------------------------------------------------


class _Surrogate(torch.autograd.Function):
    """Identity on PyTorch's own output; backward is the jump policy's rule. Written with
    `setup_context` and a generated vmap rule, so torch.func transforms accept it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(rule, out, on_jump, snapshot, x):  # type: ignore[override]  # noqa: ANN001
        return out.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        # snapshot: the input's values for the rule (a copy when the op is in place,
        # which overwrites the input itself).
        ctx.rule, _, on_jump, snapshot, x = inputs
        ctx.save_for_backward(on_jump, x if snapshot is None else snapshot)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]  # noqa: ANN001
        on_jump, xs = ctx.saved_tensors
        return None, None, None, None, ctx.rule(g, xs, as_bool(on_jump, g))


class Jump(Family):
    """Ops with a jump (sign, round, hardshrink, ...): no Clarke gradient exists there.

    "zero" is the almost-everywhere derivative (0 at the jump); "ste" the straight-through
    surrogate: slope 1 at the jump, and everywhere for piecewise-constant ops. Both are
    reported as surrogates, never as certified.
    """

    def __init__(
        self,
        signature: Sequence[str],
        defaults: dict[str, Any],
        jumps: Callable[[Call], Tensor],
        piecewise_constant: bool,
        native_grad: Callable[[Tensor, Call, Tensor], Tensor] | None,
        inplace_funcs: Sequence[Callable] = (),
        outofplace: Callable | None = None,
        native_is_policy_zero: bool = True,
    ) -> None:
        self.native_is_policy_zero = native_is_policy_zero
        self.signature = ("input", *signature)
        self.defaults = defaults
        self.jumps = jumps
        self.piecewise_constant = piecewise_constant
        self.native_grad = native_grad
        self.inplace_funcs = tuple(inplace_funcs)
        self.outofplace = outofplace

    def bind(self, func: Callable, args: tuple, kwargs: dict) -> Call:
        params = _bind(self.signature, self.defaults, args, kwargs)
        inplace = bool(params.get("inplace")) or func in self.inplace_funcs
        return Call(func, args, kwargs, params, [params["input"]], inplace)

    def exact_hits(self, call: Call, out: Any = None) -> Tensor:
        return self.jumps(call)

    def apply(self, call: Call, value: Any) -> Any:
        if value == "zero" and self.native_is_policy_zero:
            return call.run()  # PyTorch already returns the a.e. derivative, 0 at the jump
        if value != "zero":  # forward mode's derivative of a jump is 0: "zero" is exact
            refuse_forward_ad(call, value)
        x = call.inputs[0]
        if not _is_float(x) or not (torch.is_grad_enabled() and x.requires_grad):
            return call.run()
        on_jump = self.jumps(call)
        with torch.no_grad():
            out = call.run() if not call.inplace else self._outofplace(call)
        native = self.native_grad
        ste = value == "ste"
        if ste and self.piecewise_constant:
            rule = lambda g, xs, on_jump: g.clone()
        else:

            def rule(g, xs, on_jump):
                base = native(g, call, xs) if native is not None else torch.zeros_like(g)
                at = g if ste else torch.zeros_like(g)
                return torch.where(on_jump, at, base)

        snapshot = x.detach().clone() if call.inplace else None
        res = _Surrogate.apply(rule, out, compact(on_jump), snapshot, x)
        if call.inplace:
            return x.copy_(res)
        return res

    def _outofplace(self, call: Call) -> Tensor:
        params = dict(call.params)
        params.pop("inplace", None)
        rest = [params[n] for n in self.signature[1:] if n in params and n != "inplace"]
        return self.outofplace(params["input"], *rest)
