"""The policy's gradient at kink elements, expressed as two ordinary autograd nodes.

An elementwise kink op under a policy runs as

    x_in = Block(x, on_kink)          # same values; its gradient is -0.0 on kinks
    native = op(x_in, ...)            # PyTorch's own op: forward bit for bit
    out = Slopes(native, on_kink, x)  # same values; d out/d x = policy's slope on kinks

so the gradient reaching x is PyTorch's off the kinks (plus -0.0, the exact additive
identity) and `g * slope` on them (plus -0.0 again). Nothing reads a tensor's values on
the host and nothing is hooked onto the graph afterwards, which is what makes the same
code right for in-place ops (the mask is built before the op runs), views (the result
is copied back with `copy_`, which autograd tracks), checkpoint recomputation, double
backward, `torch.compile` (both nodes trace into the graph) and `torch.func`
(`generate_vmap_rule`).

One difference in the sign of zero remains, for in-place ops on a view (`y[1:].relu_()`)
when the nodes are inserted (a kink is hit, or the lazy path): the base then receives
its gradient along two paths (the in-place copy and the view read by `Block`), and
autograd pads the view's path with +0.0, so a -0.0 gradient element of the base comes
back as +0.0. Values are equal (-0.0 == 0.0); only sign-sensitive uses of a gradient
(`copysign`, `1 / g`, `torch.signbit`) can tell. PyTorch's own in-place op has a single
path; matching it would need a nested backward (`tests/test_policy_adversarial.py`
pins the current behaviour).

Which path a call takes: on CPU in eager mode one cheap reduction first decides whether
any element sits on a kink at all (`Kink.possible`) and, if none does, the op runs plain.
On accelerators (asking would synchronise the host), while tracing or compiling, and
under functorch transforms the nodes are always inserted ("lazy" path). Tests force the
lazy path on CPU with `force_lazy()` (or `KINKGRAD_LAZY=1`), so both paths are tested.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


class _Lazy(threading.local):
    forced: bool = os.environ.get("KINKGRAD_LAZY", "") == "1"


LAZY = _Lazy()


@contextmanager
def force_lazy(on: bool = True) -> Iterator[None]:
    """Take the accelerator (no host synchronisation) path on every device, this thread.

    >>> import torch, kinkgrad as kg
    >>> from kinkgrad.at_kinks import force_lazy
    >>> x = torch.zeros(2, requires_grad=True)
    >>> with force_lazy(), kg.policy(relu=1.0):
    ...     torch.relu(x).sum().backward()
    >>> x.grad
    tensor([1., 1.])
    """
    old = LAZY.forced
    LAZY.forced = on
    try:
        yield
    finally:
        LAZY.forced = old


def _transformed() -> bool:
    """True inside torch.func transforms (vmap, grad, jacrev, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def traced() -> bool:
    """Tracing, compiling, under torch.func, or forced: no hooks on graph nodes."""
    return LAZY.forced or torch.compiler.is_compiling() or _transformed()


def lazy(x: Tensor) -> bool:
    """Must this call go without a host-side kink check?"""
    return LAZY.forced or x.device.type != "cpu" or torch.compiler.is_compiling() or _transformed()


def as_bool(mask: Tensor, g: Tensor) -> Tensor:
    """The condition for `torch.where` in a backward: `mask` itself, or, for a `compact`
    mask, `mask != 0` written as one op that also reads `g` (see `compact`)."""
    if mask.dtype == torch.bool:
        return mask
    never = g < g  # all False (NaN too); computed from g so it stays in the backward
    # (as floats: inductor's uint8-to-mask casts cost three times as much)
    return torch.logical_xor(mask.to(g.dtype), never)


def minus_zero(mask: Tensor, g: Tensor) -> Tensor | float:
    """-0.0, the additive identity the backward nodes fill with. For a `compact` mask
    (compiled code) it is computed from `g`: inductor 2.13 merges the constants -0.0
    and 0.0 of one kernel (they compare equal), which turned PyTorch's -0.0 gradients
    into +0.0."""
    if mask.dtype == torch.bool:
        return -0.0
    return -((g < g).to(g.dtype))


def compact(mask: Tensor) -> Tensor:
    """The mask as saved for backward: uint8 while compiling, else `mask` itself.

    Why: inductor's CPU code stores bool tensors element by element (a 256x1024 bool
    output costs ~0.9 ms, the ReLU writing it ~0.03 ms; measured with torch 2.13), and
    AOTAutograd's partitioner saves the smallest tensor it can, which is any bool
    computed from forward values alone. So the saved mask is uint8 (written through a
    float `where`, which vectorises), and the backward turns it into a condition with an
    op that also reads the incoming gradient (`as_bool`), which the partitioner cannot
    move into the forward. (`mask.view(torch.bool)` fails to compile in inductor 2.13
    when the mask is recomputed inside a fused kernel; a float mask would be saved as
    the bool it is computed from.)
    """
    if torch.compiler.is_compiling():
        return torch.where(mask, 1.0, 0.0).to(torch.uint8)
    return mask


class Block(torch.autograd.Function):
    """Identity in value; the gradient is PyTorch's off `mask` and -0.0 on it (the policy's
    term is added by `Slopes`, and -0.0 + v == v bit for bit)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]  # noqa: ANN001
        (mask,) = ctx.saved_tensors
        return torch.where(as_bool(mask, g), minus_zero(mask, g), g), None


class Slopes(torch.autograd.Function):
    """Identity in value on the op's output; adds `g * coefs[k][j]` to input j's gradient
    where `masks[k]` holds (-0.0 elsewhere). Arguments: out, number of kinks, the
    coefficients (Python floats), then the masks, then the differentiable inputs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(out: Tensor, n_kinks: int, coefs: tuple, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        # A clone, not `out` itself: an input returned as-is becomes a view that autograd
        # forbids modifying in place, and users do `y += residual`.
        return out.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        _, n_kinks, coefs, *tensors = inputs
        ctx.n_kinks, ctx.coefs = n_kinks, coefs
        ctx.shapes = [t.shape if isinstance(t, Tensor) else None for t in tensors[n_kinks:]]
        ctx.save_for_backward(*tensors[:n_kinks])

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]  # noqa: ANN001
        masks = ctx.saved_tensors
        grads: list[Tensor | None] = []
        for j, shape in enumerate(ctx.shapes):
            if shape is None or not ctx.needs_input_grad[3 + ctx.n_kinks + j]:
                grads.append(None)
                continue
            acc: Tensor | float = minus_zero(masks[0], g) if masks else -0.0
            for mask, coef in zip(reversed(masks), reversed(ctx.coefs), strict=True):
                acc = torch.where(as_bool(mask, g), g * coef[j], acc)
            if not isinstance(acc, Tensor):  # no kink at all: a -0.0 gradient
                acc = torch.full_like(g, -0.0)
            if acc.shape != shape:
                acc = acc.sum_to_size(shape)
            grads.append(acc)
        return (g, None, None, *([None] * ctx.n_kinks), *grads)


class Assign(torch.autograd.Function):
    """`x.copy_(out)` whose gradient goes to `out` only. (`copy_` would also send zeros
    to x's earlier history, turning a -0.0 gradient there into +0.0.)"""

    @staticmethod
    def forward(ctx, x: Tensor, out: Tensor) -> Tensor:  # type: ignore[override]  # noqa: ANN001
        x.copy_(out)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]  # noqa: ANN001
        return None, g
