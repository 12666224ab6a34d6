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
#: A jump must be this many times the rounding error of the values compared (16 ulps
#: of the largest): 1e4 x 16 ulps is 3.5e-11 relative in float64, so a jump of 1e-3 on
#: a function of size 1e6 is seen (at 1e6 x 16 ulps it was not).
JUMP_NOISE = 1e4


@dataclass(frozen=True)
class Jump:
    """f(x + t d) - f(x) at each step t (`steps`, `increments`): once the part linear in
    t is removed (from pairs of steps), what is left at the three smallest steps agrees
    within 10% and exceeds the rounding noise by `JUMP_NOISE`, so f is discontinuous
    along d (or steeper than `slope_bound`). With `at_x` False it faded at a smaller
    step: a steep rise just beyond x, no certificate."""

    size: float
    steps: tuple[float, ...]
    increments: tuple[float, ...]
    slope_after: float = 0.0  # |slope| of the increments between the two smallest steps
    at_x: bool = True  # False: gone at a step below t_min, so f rises steeply beyond x

    @property
    def slope_bound(self) -> float:
        return abs(self.size) / self.steps[-1]


class Point:
    """f in float64 at the point `pts`, with the measurements along a direction."""

    def __init__(self, f: Callable[..., Tensor], pts: list[Tensor]) -> None:
        self.f, self.pts = f, pts
        self.eps = torch.finfo(pts[0].dtype).eps
        self.sample_rtol = 1e-7  # sampled gradients are refined to this (`limit_grad`)
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
        # An estimate chosen at large steps must agree with the extrapolate at the
        # smallest ones (O(h^2) off for a smooth f, exact for a piecewise-linear one):
        # tanh(1e6 x) gives quotients 1/h at h >= 1e-5 (saturated) that "converge" to
        # 2000 with error 1000, while the smallest steps see ~1e6.
        est, err = best
        noise = 8 * self.eps * (abs(f0) + max(abs(v) for v in vals)) / hs[-1]
        return est, max(err, abs(r1[-1] - est) - noise)

    def small_step_slope(self, d: Sequence[Tensor], radius: float) -> tuple[float, float, float]:
        """f'(x; d) from two steps below the differences' smallest (~5e-7 scale): the
        quotients (f(x + t d) - f(x)) / t at t1 = 1e-8 and t2 = 1e-10 times the scale
        (within half the linearization radius), extrapolated linearly to t = 0, and
        its error bound (rounding, 100 x 16 ulps: sums with cancellation round worse
        than |f| says). A feature of f that the differences and the sampled gradients
        straddle (a Python branch or a bump of width 1e-9) shows as a disagreement."""
        ts = [self.scale * 10.0**-k for k in (8, 10)]
        if 0 < radius < math.inf:
            ts = [min(t, 0.5 * radius) for t in ts]
            if ts[0] == ts[1]:
                ts[1] = ts[0] / 100
        t1, t2 = ts
        v1, v2 = self.value(t1, d), self.value(t2, d)
        s1, s2 = (v1 - self.f0) / t1, (v2 - self.f0) / t2
        s0 = s2 - (s1 - s2) * t2 / (t1 - t2)  # slope(t) = s0 + c t on a smooth piece
        n1 = 1600 * self.eps * (abs(self.f0) + abs(v1)) / t1
        n2 = 1600 * self.eps * (abs(self.f0) + abs(v2)) / t2
        # x + t d is rounded too (at x = 1e6 a step of 1e-4 is known to 1e-6 of
        # itself): the direction actually taken is off by `skew` (times the gradient)
        skew = 0.0
        for t in ts:
            moved = [(q - p) - t * di for q, p, di in zip(self.at(t, d), self.pts, d, strict=True)]
            skew = max(skew, float(torch.cat([m.reshape(-1) for m in moved]).norm()) / t)
        return s0, n2 * (1 + 2 * t2 / (t1 - t2)) + n1 * t2 / (t1 - t2), 3 * skew

    def limit_grad(self, d: Sequence[Tensor], radius: float) -> tuple[Tensor, float, bool]:
        """lim_{t->0+} grad f(x + t d) (a limiting gradient, hence in the Clarke set),
        an error estimate, and whether it converged.

        Gradients at h, h / 8 and h / 64 inside the linearization radius (identical
        for a piecewise-linear f) are extrapolated linearly to 0 in two pairs (on a
        smooth piece grad f(x + h d) = G + h H d + O(h^2)); the two extrapolates'
        difference is the error estimate. Where it exceeds `sample_rtol` times the
        gradients' size (the gradient still turns at this scale: tanh(1e6 x) at
        h = 1e-6 was off by 5%, and a g 5% off passed), h shrinks by 100, down to
        1e-12 scale; past that the sample is reported as not converged."""
        h = 1e-6 * self.scale
        if 0 < radius < math.inf:
            h = min(h, 0.5 * radius)
        size = None
        while True:
            g1, g2, g3 = (self.grad(h / 8**k, d) for k in range(3))
            e12 = g2 + (g2 - g1) / 7  # (h2 / (h1 - h2)) = 1 / 7
            e23 = g3 + (g3 - g2) / 7
            if size is None:  # the gradients' size near x (0 at a smooth minimum)
                size = float(g1.norm())
            err = float((e23 - e12).norm()) + 4 * self.eps * float(g3.norm())
            if err <= self.sample_rtol * max(size, float(e23.norm())):
                return e23, err, True
            if h < 1e-11 * self.scale:
                return e23, err, False
            h /= 100

    def jump(self, d: Sequence[Tensor]) -> Jump | None:
        """A certificate that f is discontinuous at x along d, or None.

        On a piece, f(x + t d) - f(x) = J + s t + O(t^2) with J = 0 for a continuous f.
        The pair of steps (a, b = a / 100) gives J's estimate (a inc(b) - b inc(a)) /
        (a - b), in which s cancels (and the O(t^2) term leaves -c a b, a hundred times
        smaller at the next pair: no agreement). Comparing raw increments instead
        missed any jump smaller than s t_min's neighbours (x + 1e-9 step(x) at 0)."""
        steps = tuple(self.scale * 10.0**-k for k in JUMP_DECADES)
        vals = [self.value(t, d) for t in steps]
        inc = tuple(v - self.f0 for v in vals)
        last = inc[-3:]
        if not all(math.isfinite(v) for v in last):
            return None
        noise = 16 * self.eps * max(abs(self.f0), *(abs(v) for v in vals[-3:]))
        a, b, c = steps[-3:]
        # x + t d is rounded (ulp(x) per coordinate, the same at every small t): a
        # constant error of up to |rounding| x slope that the pairs do not cancel (relu
        # at x = 1e6 showed a "jump" of 1e-10); the slope is bounded by that seen at a,
        # times sqrt(n) for the part of the gradient across d
        n = sum(p.numel() for p in self.pts)
        moved = max(
            float(
                torch.cat(
                    [
                        ((q - p) - t * di).reshape(-1)
                        for q, p, di in zip(self.at(t, d), self.pts, d, strict=True)
                    ]
                ).norm()
            )
            for t in (b, c)
        )
        noise += 4 * moved * (abs(last[0]) / a) * math.sqrt(n)
        j1 = (a * last[1] - b * last[0]) / (a - b)
        j2 = (b * last[2] - c * last[1]) / (b - c)
        size = j2
        if abs(size) <= JUMP_NOISE * noise or abs(j1 - j2) > 0.1 * abs(size):
            return None
        # A kink at distance r < t_min along d, with slopes s1 before and s2 after it,
        # also leaves a constant J = (s1 - s2) r: the caller compares J with
        # (|s1| + |s2|) t_min, s1 from g (`kinkgrad.check`).
        s2 = (last[1] - last[2]) / (b - c)
        # Below t_min, down to where x + t d no longer moves x: a jump at x is still
        # there; a steep rise at some r < t_min (clamp(1e12 (x - 1e-11), 0, 1) at 0)
        # is gone once t < r.
        for k in range(1, 6):
            t = c * 10.0**-k
            moved = self.at(t, d)
            if all(torch.equal(m, p) for m, p in zip(moved, self.pts, strict=True)):
                break
            if not abs(self.value(t, d) - self.f0) >= 0.5 * abs(size):
                return Jump(size, steps, inc, abs(s2), at_x=False)
        return Jump(size, steps, inc, abs(s2))


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
    # in units of the largest entry: the sum-to-one row's weight is relative to 1, so
    # gradients of size 1e-30 are fitted as well as gradients of size 1
    unit = max(float(np.abs(G).max()), float(np.abs(b).max()))
    unit = unit if unit > 0 and math.isfinite(unit) else 1.0
    G, b = G / unit, b / unit
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
    return float(np.linalg.norm(p - b)) * unit, torch.from_numpy(p * unit)


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
