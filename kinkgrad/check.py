"""First-order check at a point, one that works at kinks: `kinkgrad.check(f, *inputs)`.

`torch.autograd.gradcheck` compares backprop with a central difference and fails at
every kink (relu at 0: numerical 0.5, analytical 0). At a kink the right question is
whether backprop's g is a *Clarke generalized gradient* of f at x. `check` answers
"passed", "failed" or "inconclusive", each with the test that decided it.

Along random unit directions d (and -d) it measures, in float64: the one-sided
derivative f'(x; d) (forward differences inside the linearization radius, Richardson
extrapolation), the limiting gradient G(d) = lim_{t->0+} grad f(x + t d) (an element of
the Clarke set), and the increments f(x + t d) - f(x) over decades of t. Then, for a
piecewise-smooth f (a continuous selection of finitely many C^1 functions, which every
composition of catalog ops and smooth torch ops is; Scholtes 2012):

*failed*, only with a certificate:
  - **non-finite g**: a Clarke generalized gradient is a finite vector.
  - **discontinuity**: along some d, f(x + t d) - f(x), less its part linear in t,
    keeps the same size J for t from 1e-6 to 1e-10 (times the scale of x); a continuous
    f would need a slope above J / (1e-10 scale) along d. A kink or a smooth f shrinks
    linearly with t. Not when |<g, d>| 1e-10 scale >= `STEEP` |J|: backprop's slope
    says f may be that steep (tanh(1e12 x) at 0 is smooth); nor when a kink closer
    than 1e-10 scale, with slopes <g, d> before and the measured one after, explains J.
  - **differentiability**: along every random direction f'(x; -d) = -f'(x; d), every
    G(+-d) is the same vector a, and f'(x; d) = <a, d>. The Clarke set of a
    piecewise-smooth f is the hull of the gradients of its essentially active pieces
    (Scholtes 2012, Prop. 4.3.1); each such piece is entered by a random direction with
    the probability of its (open) cone, so with k directions a second piece escapes
    with probability (1 - p)^k, p its share of directions. The Clarke set is then {a},
    and a g with |g - a| above tolerance is not a Clarke gradient (at least
    `MIN_CERTIFYING` = 8 random directions are required to fail on this ground, and
    the certificate must also hold along `PROBES_TOWARD_G` directions near g - a: a
    narrow cone that random directions miss (p = 6% for relu(x1 - 10 |x2|), where
    16 directions failed a valid g for half the seeds) lies toward any g of the Clarke
    set when f is convex or concave near x, as g - a is then where f'(x; .) exceeds
    <a, .>).
  - **one variable**: f of a single variable has Clarke set [min(D-, D+), max(D-, D+)]
    (the left and right derivatives, the gradients of the two pieces touching x;
    Clarke 1983, Thm. 2.5.1); a g outside it fails.

*passed*, when g is shown to be a Clarke element:
  - it equals a where f is differentiable (above);
  - it lies in the convex hull of the sampled limiting gradients (each in the Clarke
    set, which is convex); or
  - (f of one variable only) it satisfies the Fréchet subgradient inequalities
    <g, d> <= f'(x; d) (or the supergradient ones, >=) for d = +-1, which are then all
    directions: a regular sub/supergradient lies in the Clarke set (Rockafellar & Wets
    1998, Thm. 8.6 and 8.49). In n >= 2 variables finitely many directions certify
    nothing (a g outside the Clarke set can violate the inequalities only in a narrow
    cone), so there the hull must reach g. Besides the random directions,
    "adversarial" ones are tried: d = g - p, p the nearest point of the sampled hull,
    which separates g from the hull (for a convex f, G(d) is the vertex of the Clarke
    set that maximizes <v, d>, and for a concave one G(-d) is: Gilbert's step, so
    the hull closes in on a g of the Clarke set); the gradients sampled along +-d
    join the hull, for `ADVERSARIAL` steps and more while the distance keeps falling.

A direction is *steep* (`DirectionCheck.steep`) when f moves below the differences'
steps: a "jump" that g's slope could explain or that fades at a smaller step, or a
quotient (f(x + t d) - f(x)) / t at t = 1e-8, 1e-10 (extrapolated to 0) that disagrees
with the differences (a Python branch or a bump within 1e-6 of x). The differences and
the sampled gradients then describe f farther out, not at x: no pass and no failure on
the differentiability, one-variable or hull tests rests on such a direction.

*inconclusive* otherwise, with the distance from g to the sampled hull.

Limiting gradients are extrapolated from backprop's gradients at x + t d for t = 1e-6,
1e-6 / 8, 1e-6 / 64 (times the scale of x, and within the linearization radius of the
catalog ops met; smaller where they have not converged, and no pass rests on samples
that never do: `Point.limit_grad`), each kept only when <G(d), d> matches the
finite-difference f'(x; d): a kink of a non-catalog op (a Python branch) closer to x
than that is not seen.

Tolerances: `rtol` (default 1000 ulps of g's dtype, within [1e-6, 1e-2]) times the
magnitudes compared, plus the finite differences' own error estimates (Richardson
agreement, agreement with the extrapolate at the smallest steps, and rounding
eps |f| / h) and the sampled gradients' (the difference of two extrapolates).

CLI: `kinkgrad check MODULE:FUNCTION` (`kinkgrad.check_cli`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._inputs import _check_inputs, _check_output, _new_seed
from ._probe import Point, flat, float64_version, hull_projection
from .check_report import CheckReport, DirectionCheck
from .linearize import linearization
from .policy import STATE

#: Adversarial directions tried at least when g is not yet in the sampled hull (each:
#: two linearizations, ~30 evaluations of f and four gradients) ...
ADVERSARIAL = 8
#: ... and at most, while they keep bringing the hull closer to g (Gilbert's algorithm
#: converges like 1/k: a vertex g of a many-faceted Clarke set needs more steps).
ADVERSARIAL_MAX = 96
#: ... stopping when the distance fell by less than 2% over this many steps (Wolfe's
#: nearest-point iterations plateau until a face is complete: a vertex g of a
#: 20-generator zonotope needed ~60).
STALL = 12
#: Random directions the differentiability certificate needs before it fails a g (a
#: second piece of share p escapes k directions with probability (1 - p)^k).
MIN_CERTIFYING = 8
#: Directions toward g (from the gradient a) tried before g fails on differentiability.
PROBES_TOWARD_G = 2
#: Relative size of the random jitter added to an adversarial direction (so that it
#: sits inside one piece's cone, not on a boundary between pieces).
JITTER = 1e-3

#: A "jump" J seen down to t_min is no certificate when |<g, d>| t_min >= STEEP |J|:
#: f may be continuous and that steep (its slope at x is that of g; tanh(k x) looks
#: like a jump within 10% from k t_min = 1.5 on, where the slope gives 1.5 |J|).
STEEP = 0.5

VERDICTS = ("passed", "failed", "inconclusive")


# --------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------


def check(
    f: Callable[..., Tensor],
    *inputs: Tensor,
    directions: int = 16,
    seed: int | None = None,
    rtol: float | None = None,
) -> CheckReport:
    """Is backprop's gradient of f at `inputs` a Clarke generalized gradient?

    **Arguments**: `f` maps the inputs to a one-element floating tensor; `inputs`
    floating tensors with `requires_grad=True` and finite values (the point); the
    gradient g is what backprop returns under the policies active around the call;
    `directions` random unit directions are tried (default 16; up to `ADVERSARIAL`
    more are chosen from the results); `seed` fixes them; `rtol` the relative
    tolerance (default: 1000 ulps of g's dtype, within [1e-6, 1e-2]).

    **Returns**: `CheckReport` (`.verdict` "passed" / "failed" / "inconclusive",
    `.passed`, `.reason`, `.decided_by`, `.evidence`, `.directions`;
    `print(report)` shows a table).

    >>> import torch, kinkgrad as kg
    >>> x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    >>> rep = kg.check(lambda x: (torch.relu(x) - torch.relu(-x)).sum(), x, seed=0)
    >>> rep.verdict, rep.decided_by     # f is the identity; backprop says 0
    ('failed', 'differentiability')
    """
    who = "kinkgrad.check"
    xs = _check_inputs(inputs, who)
    if not isinstance(directions, int) or isinstance(directions, bool) or directions < 1:
        raise ValueError(f"{who}: directions must be a positive integer, got {directions!r}")
    if rtol is not None and not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"{who}: rtol must be a number in (0, 1), got {rtol!r}")
    saved, STATE.watchers = STATE.watchers, []  # the check's evaluations are not training
    try:
        return _Check(f, xs, directions, _new_seed(seed), rtol, who).run()
    finally:
        STATE.watchers = saved


class _Check:
    def __init__(
        self,
        f: Callable[..., Tensor],
        xs: list[Tensor],
        n_dirs: int,
        seed: int,
        rtol: float | None,
        who: str,
    ) -> None:
        out = _check_output(f(*xs), who)
        self.value = float(out.detach())
        if not math.isfinite(self.value):
            raise ValueError(
                f"{who}: f(x) = {self.value} at the point given; a derivative needs a finite "
                "value there"
            )
        if out.requires_grad:
            try:
                raw = torch.autograd.grad(out.reshape(()), xs, allow_unused=True)
            except RuntimeError as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RuntimeError(
                    f"{who}: backprop through f failed ({msg}); an op without a "
                    "derivative can be given one with kinkgrad.policy"
                ) from None
        else:
            raw = (None,) * len(xs)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(raw, xs, strict=True)]
        self.g = flat(grads)
        self.dtype = str(grads[0].dtype).replace("torch.", "")
        # 1000 ulps of g's dtype (rounding accumulated through the backward pass), at
        # least 1e-6 (float64 differences), at most 1e-2 (1000 ulps of float16 would be
        # ~1: anything would pass)
        ulps = 1000 * torch.finfo(grads[0].dtype).eps
        self.rtol = rtol if rtol is not None else min(max(1e-6, ulps), 1e-2)
        self.f64, self.fd_name, pts = float64_version(f, xs, who)
        self.pt = Point(self.f64, pts)
        self.pt.sample_rtol = 0.1 * self.rtol
        self.pts = pts
        self.n_dirs, self.seed = n_dirs, seed
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: list[DirectionCheck] = []
        self.dirs: list[Tensor] = []  # flat unit direction of each row
        self.rejected = 0  # sampled gradients inconsistent with the differences
        self.samples: list[Tensor] = []
        self.sample_err: list[float] = []
        self.coarse = False  # some sampled gradient did not converge (no pass on samples)
        self.kinks_hit = 0

    # ----------------------------------------------------------------------------------
    def _unflat(self, v: Tensor) -> list[Tensor]:
        out, i = [], 0
        for p in self.pts:
            out.append(v[i : i + p.numel()].reshape(p.shape).to(p.dtype))
            i += p.numel()
        return out

    def _random_unit(self) -> Tensor:
        v = torch.randn(int(self.g.numel()), generator=self.gen, dtype=torch.float64)
        return v / (v.norm() or 1.0)

    def _measure(self, dflat: Tensor, kind: str) -> DirectionCheck:
        pt = self.pt
        d = self._unflat(dflat)
        neg = [-di for di in d]
        lin = linearization(self.f64, *self.pts, direction=d)
        lin_back = linearization(self.f64, *self.pts, direction=neg)
        if not self.rows:
            self.kinks_hit = lin.kinks_hit
        jump = pt.jump(d) or pt.jump(neg)
        fwd, e1 = pt.one_sided(d, lin.radius)
        bwd, e2 = pt.one_sided(neg, lin_back.radius)
        pred = float(self.g @ dflat)
        steep = False
        if jump is not None:
            t_min, s1 = jump.steps[-1], abs(pred)
            if not jump.at_x or s1 * t_min >= STEEP * abs(jump.size):
                # f rises by J beyond x within t_min (it fades at a smaller step), or
                # backprop's own slope at x could carry it across J: a steep continuous
                # f (tanh(1e12 x)) is no certificate of a jump, and the differences
                # along d (steps >= t_min) cannot see its derivative either
                jump, steep = None, True
            elif (s1 + jump.slope_after) * t_min >= abs(jump.size):
                # a kink at r < t_min with slopes s1, s2 leaves (s1 - s2) r: not a jump
                jump = None
        base = self.rtol * (abs(fwd) + abs(bwd) + float(self.g.norm()))
        tol_f, tol_b = base + 10 * e1, base + 10 * e2
        limits = [pt.limit_grad(d, lin.radius), pt.limit_grad(neg, lin_back.radius)]
        lip = max(float(self.g.norm()), *(float(s.norm()) for s, _, _ in limits))
        for dd, r, deriv, tol in ((d, lin.radius, fwd, tol_f), (neg, lin_back.radius, bwd, tol_b)):
            slope, noise, skew = pt.small_step_slope(dd, r)
            if not abs(slope - deriv) <= 2 * tol + noise + skew * lip:
                # f turns below the differences' steps (a Python branch within
                # 1e-6 of x): the differences and the samples describe f farther
                # out, not at x, and decide nothing
                steep = True
        sym = abs(fwd + bwd) <= self.rtol * (abs(fwd) + abs(bwd)) + 10 * (e1 + e2)
        row = DirectionCheck(
            index=len(self.rows),
            kind=kind,
            forward=fwd,
            backward=bwd,
            predicted=pred,
            error=abs(fwd - pred),
            tolerance=tol_f,
            fd_error=e1,
            fd_error_back=e2,
            ok=abs(fwd - pred) <= tol_f,
            symmetric=sym,
            subgradient=pred <= fwd + tol_f and -pred <= bwd + tol_b,
            supergradient=pred >= fwd - tol_f and -pred >= bwd - tol_b,
            radius=lin.radius,
            radius_back=lin_back.radius,
            jump=jump,
            steep=steep,
        )
        self.rows.append(row)
        self.dirs.append(dflat)
        for (s, err, converged), deriv, tol, sign in (
            (limits[0], fwd, tol_f, 1.0),
            (limits[1], bwd, tol_b, -1.0),
        ):
            self.coarse = self.coarse or not converged
            # On the piece x + t d enters, f'(x; d) = <G(d), d>: a sampled gradient that
            # disagrees with the differences is not trusted (backprop wrong off the kink,
            # or the sample crossed an unseen branch) and stays out of the hull.
            if abs(sign * float(s @ dflat) - deriv) <= tol + err:
                self.samples.append(s)
                self.sample_err.append(err)
            else:
                self.rejected += 1
        return row

    def _hull_tolerance(self) -> float:
        if not self.samples:
            return 0.0
        gmax = max(float(s.norm()) for s in self.samples)
        return self.rtol * (float(self.g.norm()) + gmax) + max(self.sample_err)

    def _hull(self) -> tuple[float, Tensor | None]:
        if not self.samples:
            return math.inf, None
        return hull_projection(self.g, self.samples)

    # ----------------------------------------------------------------------------------
    def run(self) -> CheckReport:
        bad = int((~torch.isfinite(self.g)).sum())
        if bad:  # Clarke gradients are finite vectors (f locally Lipschitz), or none exist
            return self._report(
                "failed",
                "non-finite g",
                f"g holds {bad} non-finite value(s) (NaN or inf): not a generalized gradient",
                [
                    "a Clarke generalized gradient is a finite vector; where f is not locally "
                    "Lipschitz (sqrt at 0) none exists"
                ],
                math.inf,
            )
        for _ in range(self.n_dirs):
            self._measure(self._random_unit(), "random")
        jumped = [r for r in self.rows if r.jump]
        if jumped:
            return self._jump(jumped[0])
        diff = self._differentiable()
        if diff is not None and diff.verdict == "failed":
            # Before failing g, look where g points: random directions miss a piece
            # whose cone is narrow (relu(x1 - 10 |x2|) at 0, 6% of directions), but if
            # g is in the Clarke set C and C != {a}, the direction g - a finds the
            # difference for a convex or concave f (f'(x; g - a) >= <g, g - a> >
            # <a, g - a>, resp. for -d): the certificate must survive it.
            a = self.samples[0]
            for _ in range(PROBES_TOWARD_G):
                d = (self.g - a) / (self.g - a).norm() + JITTER * self._random_unit()
                row = self._measure(d / d.norm(), "adversarial")
                if row.jump:
                    return self._jump(row)
            diff = self._differentiable()
        if diff is not None:
            return diff
        dist, p = self._hull()
        history = [dist]
        for k in range(ADVERSARIAL_MAX):
            if dist <= self._hull_tolerance():
                break
            if k >= max(ADVERSARIAL, STALL) and not history[-1] < 0.98 * history[-STALL]:
                break  # stalled: the hull no longer closes in on g
            if p is None:  # no trusted sample: a random direction instead
                d = self._random_unit()
            else:
                d = (self.g - p) / dist + JITTER * self._random_unit()
            row = self._measure(d / d.norm(), "adversarial")
            if row.jump:
                return self._jump(row)
            dist, p = self._hull()
            history.append(dist)
        return self._verdict(dist)

    def _report(
        self, verdict: str, by: str, reason: str, evidence: Sequence[str], dist: float
    ) -> CheckReport:
        return CheckReport(
            verdict,
            by,
            reason,
            tuple(evidence),
            self.value,
            float(self.g.norm()),
            tuple(self.rows),
            by == "differentiability",
            dist,
            self._hull_tolerance(),
            self.kinks_hit,
            self.dtype,
            self.fd_name,
            len(self.samples),
            self.seed,
        )

    def _jump(self, row: DirectionCheck) -> CheckReport:
        j = row.jump
        assert j is not None
        incs = ", ".join(f"{t:.0e}: {v:.3g}" for t, v in zip(j.steps, j.increments, strict=True))
        dist, _ = self._hull()
        return self._report(
            "failed",
            "discontinuity",
            f"f is discontinuous at x along direction {row.index} (jump of about "
            f"{abs(j.size):.3g})",
            [
                f"f(x + t d) - f(x) for t = {incs} (along d or -d): it keeps its size as "
                f"t shrinks, where a kink or a smooth f shrinks linearly; a continuous f "
                f"would need a slope above {j.slope_bound:.3g} along d",
                "no generalized gradient exists at a discontinuity",
            ],
            dist,
        )

    def _differentiable(self) -> CheckReport | None:
        """The differentiability certificate (module docstring), or None."""
        rows, samples = self.rows, self.samples
        if not samples or not all(r.symmetric and not r.steep for r in rows):
            return None  # (along a steep d the differences are blind to a rise < t_min)
        a = samples[0]
        spread = max(float((s - a).norm()) for s in samples)
        amax = max(float(s.norm()) for s in samples)
        tol_s = self.rtol * 2 * amax + 2 * max(self.sample_err)
        if spread > tol_s:
            return None
        for r in rows:
            fit = float(a @ self._row_dir(r))
            # a carries its sampling error (|d| = 1), the differences theirs
            tol_fit = self.rtol * (abs(r.forward) + float(a.norm())) + 10 * r.fd_error
            if abs(r.forward - fit) > tol_fit + 2 * max(self.sample_err):
                return None
        gap = float((self.g - a).norm())
        tol = self.rtol * (float(self.g.norm()) + float(a.norm())) + 2 * max(self.sample_err)
        what = (
            f"f is differentiable at x: along all {len(rows)} random directions "
            f"f'(x; -d) = -f'(x; d), f'(x; d) = <a, d>, and the limiting gradients agree (spread "
            f"{spread:.2g}), so for a piecewise-smooth f the Clarke set is {{a}}, "
            f"|a| = {float(a.norm()):.6g}"
        )
        if gap > tol and len(rows) < MIN_CERTIFYING:
            return None  # too few directions to fail anything on this ground
        if gap <= tol:  # g = a, a limiting gradient: in the Clarke set in any case
            if self.coarse:
                return None  # a is known too coarsely to say g = a
            return self._report(
                "passed",
                "differentiability",
                f"g is the gradient of f, which is differentiable at x (|g - a| = {gap:.2g})",
                [what],
                gap,
            )
        worst = max(rows, key=lambda r: r.error)
        return self._report(
            "failed",
            "differentiability",
            f"g is not the gradient: |g - a| = {gap:.3g} (tolerance {tol:.1g}) where f is "
            f"differentiable at x",
            [
                what,
                f"worst direction {worst.index}: f'(x; d) = {worst.forward:.6g}, "
                f"<g, d> = {worst.predicted:.6g}",
                "a fixed choice at a kink (PyTorch's, or the active policy's) left the "
                "generalized gradient; kinkgrad.certified_grad returns one",
            ],
            gap,
        )

    def _row_dir(self, r: DirectionCheck) -> Tensor:
        return self.dirs[r.index]

    def _verdict(self, dist: float) -> CheckReport:
        rows = self.rows
        ctol = self._hull_tolerance()
        n_adv = sum(r.kind == "adversarial" for r in rows)
        tried = (
            f"tried {len(rows)} directions ({len(rows) - n_adv} random, {n_adv} "
            f"adversarial) and {len(self.samples)} limiting gradients ({self.rejected} "
            f"more disagreed with the differences and were dropped); f sits on a kink "
            f"({sum(not r.symmetric for r in rows)} directions with f'(x; -d) != -f'(x; d))"
        )
        unseen = self.coarse or any(r.steep for r in rows)  # samples are not limits at x
        if dist <= ctol and not unseen:  # (a blurred or far-out hull passes nothing)
            return self._report(
                "passed",
                "Clarke hull",
                f"g lies in the convex hull of the limiting gradients sampled at x "
                f"(distance {dist:.2g}, tolerance {ctol:.1g}): a Clarke generalized gradient",
                [tried],
                dist,
            )
        for kind, ok in (("sub", "subgradient"), ("super", "supergradient")):
            # Only in one variable are +-d *all* directions: in n >= 2 the inequalities
            # along finitely many directions prove nothing (sum |x_i| at 0 with
            # g = 1.05 e_1 satisfies them along every direction but those within ~0.05
            # of e_1, and the adversarial ones approach e_1 only like 1/k); see
            # tests/test_check_adversarial.py.
            if self.g.numel() == 1 and all(getattr(r, ok) and not r.steep for r in rows):
                rel = "<=" if kind == "sub" else ">="
                return self._report(
                    "passed",
                    f"Fréchet {ok}",
                    f"g is a regular {ok}: <g, d> {rel} f'(x; d) along all {2 * len(rows)} "
                    f"directions +-d tried, and a regular {ok} lies in the Clarke set",
                    [tried, f"distance from g to the sampled hull: {dist:.3g}"],
                    dist,
                )
        if self.g.numel() == 1 and not any(r.steep for r in rows):
            verdict = self._one_variable(dist)
            if verdict is not None:
                return verdict
        return self._report(
            "inconclusive",
            "none",
            f"g is at distance {dist:.3g} (tolerance {ctol:.1g}) from the hull of the "
            f"sampled limiting gradients and no certificate decides",
            [
                tried,
                f"neither a regular subgradient ({sum(not r.subgradient for r in rows)} "
                f"directions violate <g, d> <= f'(x; d)) nor a regular supergradient "
                f"({sum(not r.supergradient for r in rows)} violate >=)",
            ],
            dist,
        )

    def _one_variable(self, dist: float) -> CheckReport | None:
        r = self.rows[0]
        s = float(self._row_dir(r)[0])  # +1 or -1
        right, left = (r.forward, -r.backward) if s > 0 else (r.backward, -r.forward)
        lo, hi = min(left, right), max(left, right)
        g = float(self.g[0])
        tol = self.rtol * (abs(g) + abs(lo) + abs(hi)) + 10 * max(r.fd_error, r.fd_error_back)
        if lo - tol <= g <= hi + tol:
            return None
        return self._report(
            "failed",
            "one variable",
            f"g = {g:.6g} is outside the Clarke set [{lo:.6g}, {hi:.6g}] of f at x",
            [
                "f has one variable: its Clarke set is the interval between the left and "
                f"right derivatives (D- = {left:.6g}, D+ = {right:.6g}) for a "
                "piecewise-smooth f"
            ],
            dist,
        )
