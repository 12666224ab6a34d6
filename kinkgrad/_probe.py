"""The measurements behind `kinkgrad.check`, all along one direction d at a point x in
float64: one-sided derivatives, the limiting gradient x + t d approaches, the size of a
jump, and the distance from a vector to the convex hull of sampled gradients.

Tolerances are relative to what is measured: the finite-difference error estimates
come from the differences themselves (successive Richardson extrapolates, plus the
rounding error eps |f| / h of a quotient with step h); gradients sampled at two steps
give their own error estimate (the size of the first-order correction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ._inputs import _check_output

#: Forward-difference steps per one-sided derivative (halving from the first).
LEVELS = 12
#: Steps t = scale * 10^-k at which a jump is looked for. A jump J keeps its size at
#: every t; a continuous f whose increments stay near J down to t_min = 1e-10 * scale
#: would need a slope above J / t_min along d (reported as the evidence).
JUMP_DECADES = (2, 4, 6, 8, 10)
#: A jump must be this many times the rounding error of the values compared.
JUMP_NOISE = 1e6


@dataclass(frozen=True)
class Jump:
    """f(x + t d) - f(x) at each step t (`steps`, `increments`): the increments at the
    three smallest steps agree within 10% and exceed the rounding noise by
    `JUMP_NOISE`, so f is discontinuous along d (or steeper than `slope_bound`)."""

    size: float
    steps: tuple[float, ...]
    increments: tuple[float, ...]

    @property
    def slope_bound(self) -> float:
        return abs(self.size) / self.steps[-1]


class Point:
    """f in float64 at the point `pts`, with the measurements along a direction."""

    def __init__(self, f: Callable[..., Tensor], pts: list[Tensor]) -> None:
        self.f, self.pts = f, pts
        self.eps = torch.finfo(pts[0].dtype).eps
        self.scale = 1.0 + max(float(p.abs().max()) if p.numel() else 0.0 for p in pts)
        self.f0 = self.value(0.0, [torch.zeros_like(p) for p in pts])

    def at(self, h: float, d: Sequence[Tensor]) -> list[Tensor]:
        return [p + h * di for p, di in zip(self.pts, d, strict=True)]

    def value(self, h: float, d: Sequence[Tensor]) -> float:
        with torch.no_grad():
            return float(self.f(*self.at(h, d)))

    def grad(self, h: float, d: Sequence[Tensor]) -> Tensor:
        q = [t.detach().requires_grad_() for t in self.at(h, d)]
        o = self.f(*q)
        if not o.requires_grad:
            return torch.zeros(sum(t.numel() for t in q), dtype=torch.float64)
        gs = torch.autograd.grad(o.reshape(()), q, allow_unused=True)
        return flat([torch.zeros_like(t) if v is None else v for v, t in zip(gs, q, strict=True)])

    def one_sided(self, d: Sequence[Tensor], radius: float) -> tuple[float, float]:
        """f'(x; d) by forward differences at h0, h0/2, ... (h0 inside the linearization
        radius, where a piecewise-linear f gives exact quotients) and two Richardson
        steps; returns (estimate, error estimate), where successive extrapolates agree
        best."""
        base = 1e-3 * self.scale
        h0 = max(min(base, 0.5 * radius), 1e-9 * base) if 0 < radius < math.inf else base
        hs = [h0 * 0.5**k for k in range(LEVELS)]
        vals = [self.value(h, d) for h in hs]
        f0 = self.f0
        q = [(v - f0) / h for v, h in zip(vals, hs, strict=True)]
        r1 = [2 * q[k + 1] - q[k] for k in range(len(q) - 1)]
        r2 = [(4 * r1[k + 1] - r1[k]) / 3 for k in range(len(r1) - 1)]
        best = (q[-1], math.inf)
        for seq, lag in ((q, 0), (r1, 1), (r2, 2)):
            for k in range(len(seq) - 1):
                h = hs[k + 1 + lag]
                noise = 8 * self.eps * (abs(f0) + max(abs(v) for v in vals)) / h
                err = abs(seq[k + 1] - seq[k]) + noise
                if err < best[1]:
                    best = (seq[k + 1], err)
        return best

    def limit_grad(self, d: Sequence[Tensor], radius: float) -> tuple[Tensor, float]:
        """lim_{t->0+} grad f(x + t d) (a limiting gradient, hence in the Clarke set)
        and an error estimate: gradients at h1 and h2 = h1 / 8 inside the linearization
        radius (identical for a piecewise-linear f), extrapolated linearly to 0 (on a
        smooth piece grad f(x + h d) = G + h H d + O(h^2))."""
        h1 = 1e-6 * self.scale
        if 0 < radius < math.inf:
            h1 = min(h1, 0.5 * radius)
        h2 = h1 / 8
        g1, g2 = self.grad(h1, d), self.grad(h2, d)
        corr = (g2 - g1) * (h2 / (h1 - h2))
        return g2 + corr, float(corr.norm()) + 4 * self.eps * float(g2.norm())

    def jump(self, d: Sequence[Tensor]) -> Jump | None:
        """A certificate that f is discontinuous at x along d, or None."""
        steps = tuple(self.scale * 10.0**-k for k in JUMP_DECADES)
        vals = [self.value(t, d) for t in steps]
        inc = tuple(v - self.f0 for v in vals)
        last = inc[-3:]
        if not all(math.isfinite(v) for v in last):
            return None
        noise = 16 * self.eps * max(abs(self.f0), *(abs(v) for v in vals))
        size = last[-1]
        if abs(size) <= JUMP_NOISE * noise:
            return None
        if any(abs(v - size) > 0.1 * abs(size) for v in last):
            return None
        return Jump(size, steps, inc)


def flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def hull_projection(g: Tensor, samples: Sequence[Tensor]) -> tuple[float, Tensor]:
    """(distance, nearest point) from g to the convex hull of `samples` (flat float64):
    min |G lam - g| over the simplex, as non-negative least squares with the sum-to-one
    row weighted heavily. The point returned is in the hull (lam renormalised), so the
    distance is an upper bound of the exact one: a "within tolerance" is never
    optimistic."""
    import numpy as np
    from scipy.optimize import nnls

    G = torch.unique(torch.stack(list(samples)), dim=0).T.numpy()  # [n, k], repeats dropped
    b = g.numpy()
    weight = 1e3 * (1.0 + float(np.abs(G).max()) + float(np.abs(b).max()))
    A = np.vstack([G, weight * np.ones((1, G.shape[1]))])
    rhs = np.concatenate([b, [weight]])
    try:
        lam, _ = nnls(A, rhs, maxiter=50 * A.shape[1] + 100)
    except RuntimeError:  # iteration limit: fall back to the nearest sample
        lam = np.zeros(G.shape[1])
    if lam.sum() <= 0:
        j = int(np.argmin([np.linalg.norm(G[:, j] - b) for j in range(G.shape[1])]))
        lam = np.zeros(G.shape[1])
        lam[j] = 1.0
    lam = lam / lam.sum()
    p = G @ lam
    return float(np.linalg.norm(p - b)), torch.from_numpy(p)


# --------------------------------------------------------------------------------------
# f in float64
# --------------------------------------------------------------------------------------


class _Float64(TorchFunctionMode):
    """Runs torch calls in float64: floating tensor arguments of lower precision (a
    float32 model's parameters) are promoted first. In-place methods and conversions
    are left alone."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not (name.endswith("_") or name in _KEEP):
            args, kwargs = tree_map(_to64, (args, kwargs))
        return func(*args, **kwargs)


_KEEP = {"__get__", "__set__", "__setitem__", "to", "type", "float", "half", "bfloat16"}


def _to64(v: Any) -> Any:
    if isinstance(v, Tensor) and v.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return v.to(torch.float64)
    return v


def float64_version(
    f: Callable[..., Tensor], xs: Sequence[Tensor], who: str
) -> tuple[Callable[..., Tensor], str, list[Tensor]]:
    """f evaluated in float64: as it is, else with every float tensor it touches
    promoted (a float32 model), else in the inputs' own dtype (named in the report)."""
    pts = [x.detach().to(torch.float64) for x in xs]

    def promoted(*args: Tensor) -> Tensor:
        with _Float64():
            return f(*args)

    for candidate, name in ((f, "float64"), (promoted, "float64 (promoted)")):
        try:
            with torch.no_grad():
                out = _check_output(candidate(*pts), who)
            if out.dtype == torch.float64:
                return candidate, name, pts
        except (RuntimeError, TypeError):
            pass
    return f, str(xs[0].dtype).replace("torch.", ""), [x.detach() for x in xs]
