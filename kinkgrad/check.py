"""First-order check at a point, one that works at kinks: `kinkgrad.check(f, *inputs)`.

`torch.autograd.gradcheck` compares backprop with a central difference and fails at
every kink (relu at 0: numerical 0.5, analytical 0), so tests avoid kinks. What makes
backprop useful is the first-order model f(x + t d) ~ f(x) + t <g, d>; at a kink no
linear model holds in every direction, and the right question becomes whether g is a
generalized gradient. The check answers both, at the point you give:

1. along random directions d (and -d), the one-sided derivative f'(x; d) by forward
   differences with shrinking steps and Richardson extrapolation, in float64, against
   <g, d> for the gradient g that backprop returns under the active policy;
2. f is *differentiable* there when f'(x; -d) = -f'(x; d) along every direction (and,
   when there are fewer variables than directions, the f'(x; d) fit one linear map);
   then g passes when <g, d> matches f'(x; d) along every direction;
3. otherwise f sits on a kink, and g passes when it lies in the convex hull of the
   gradients at nearby differentiable points x +- eps d (eps inside the linearization
   radius, so each sample is the gradient of a piece touching x): the sampled Clarke
   subdifferential. The distance is a small non-negative least-squares problem;
4. along each direction the linearization radius, exact for piecewise-linear f, from
   one forward-mode pass (`kinkgrad.linearization`).

CLI: `kinkgrad check MODULE:FUNCTION` (see `cli`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .certify import _check_inputs, _check_output, _new_seed, linearization
from .policy import STATE

#: Forward-difference steps per one-sided derivative (halving from the first).
LEVELS = 12


@dataclass(frozen=True)
class DirectionCheck:
    """One direction d (unit norm over all inputs): `forward` = f'(x; d) and `backward`
    = f'(x; -d) (one-sided, float64 finite differences, `fd_error` their error
    estimate), `predicted` = <g, d>, `error` = |forward - predicted|, `tolerance`, `ok`
    (the first-order model holds along d), `symmetric` (forward == -backward within
    tolerance), `radius` / `radius_back` (linearization radius along d / -d)."""

    index: int
    forward: float
    backward: float
    predicted: float
    error: float
    tolerance: float
    fd_error: float
    ok: bool
    symmetric: bool
    radius: float
    radius_back: float


@dataclass(frozen=True, repr=False)
class CheckReport:
    """Result of `check`.

    **Fields**: `value` f(x); `grad_norm` |g|; `directions` (one `DirectionCheck`
    each); `differentiable` (one-sided derivatives agree with a linear map); `kink`
    (= not differentiable); `clarke_distance` (from g to the convex hull of gradients
    sampled at nearby differentiable points) and `clarke_tolerance`; `kinks_hit`
    (kink-op elements exactly on a kink at x); `passed`; `reasons` (why, in words);
    `dtype` (of g) and `fd_dtype` (of the finite differences: "float64", "float64
    (promoted)" when f's own tensors had to be promoted, or f's dtype when that failed);
    `samples` (gradients sampled).
    """

    value: float
    grad_norm: float
    directions: tuple[DirectionCheck, ...]
    differentiable: bool
    clarke_distance: float
    clarke_tolerance: float
    kinks_hit: int
    passed: bool
    reasons: tuple[str, ...]
    dtype: str
    fd_dtype: str
    samples: int

    @property
    def kink(self) -> bool:
        return not self.differentiable

    def table(self) -> Any:
        """The per-direction table as a `rich.table.Table`."""
        from rich.table import Table

        t = Table(title="first-order check along random unit directions d", title_justify="left")
        for col in ("d", "f'(x; d)", "-f'(x; -d)", "<g, d>", "|f'(x;d) - <g,d>|", "tol"):
            t.add_column(col, justify="right")
        t.add_column("radius d / -d", justify="right")
        t.add_column("", justify="left")
        for d in self.directions:
            t.add_row(
                str(d.index),
                f"{d.forward:.8g}",
                f"{-d.backward:.8g}",
                f"{d.predicted:.8g}",
                f"{d.error:.2e}",
                f"{d.tolerance:.1e}",
                f"{_fmt_radius(d.radius)} / {_fmt_radius(d.radius_back)}",
                ("ok" if d.ok else "off") + ("" if d.symmetric else " kink"),
            )
        return t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=110, color_system=None, force_terminal=False)
        verdict = "PASSED" if self.passed else "FAILED"
        console.print(
            f"kinkgrad check: {verdict}  f(x) = {self.value:.10g}, |g| = {self.grad_norm:.6g} "
            f"(g in {self.dtype}; differences in {self.fd_dtype})"
        )
        where = "differentiable" if self.differentiable else "on a kink (not differentiable)"
        console.print(
            f"f is {where} at x; kink-op elements exactly on a kink: {self.kinks_hit}; "
            f"distance from g to the convex hull of {self.samples} nearby gradients: "
            f"{self.clarke_distance:.3g} (tolerance {self.clarke_tolerance:.1g})"
        )
        console.print(self.table())
        for r in self.reasons:
            console.print(f"- {r}")
        return buf.getvalue().rstrip()

    def __repr__(self) -> str:
        return (
            f"CheckReport(passed={self.passed}, differentiable={self.differentiable}, "
            f"clarke_distance={self.clarke_distance:.3g}, directions={len(self.directions)})"
        )


def _fmt_radius(r: float) -> str:
    return "inf" if math.isinf(r) else f"{r:.3g}"


# --------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------


def _one_sided(
    phi: Callable[[float], float], f0: float, h0: float, eps: float
) -> tuple[float, float]:
    """lim_{h->0+} (phi(h) - f0) / h by forward differences at h0, h0/2, ... and two
    Richardson steps; returns (estimate, error estimate), choosing where successive
    extrapolates agree best (a piecewise-linear f gives exact quotients once h is
    inside the linearization radius)."""
    hs = [h0 * 0.5**k for k in range(LEVELS)]
    vals = [phi(h) for h in hs]
    q = [(v - f0) / h for v, h in zip(vals, hs, strict=True)]
    r1 = [2 * q[k + 1] - q[k] for k in range(len(q) - 1)]
    r2 = [(4 * r1[k + 1] - r1[k]) / 3 for k in range(len(r1) - 1)]
    best = (q[-1], math.inf)
    for seq, lag in ((q, 0), (r1, 1), (r2, 2)):
        for k in range(len(seq) - 1):
            h = hs[k + 1 + lag]
            noise = 8 * eps * (abs(f0) + max(abs(v) for v in vals)) / h
            err = abs(seq[k + 1] - seq[k]) + noise
            if err < best[1]:
                best = (seq[k + 1], err)
    return best


def _clarke_distance(g: Tensor, samples: Sequence[Tensor]) -> float:
    """Distance from g to the convex hull of `samples` (all flat float64): minimise
    |G lambda - g| over the simplex, as a non-negative least-squares problem with the
    sum-to-one row weighted heavily."""
    import numpy as np
    from scipy.optimize import nnls

    G = torch.unique(torch.stack(list(samples)), dim=0).T.numpy()  # [n, k], repeats dropped
    b = g.numpy()
    weight = 1e3 * (1.0 + float(np.abs(G).max()) + float(np.abs(b).max()))
    A = np.vstack([G, weight * np.ones((1, G.shape[1]))])
    rhs = np.concatenate([b, [weight]])
    lam, _ = nnls(A, rhs, maxiter=50 * A.shape[1] + 100)
    if lam.sum() <= 0:
        return float(min(np.linalg.norm(G[:, j] - b) for j in range(G.shape[1])))
    lam = lam / lam.sum()
    return float(np.linalg.norm(G @ lam - b))


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


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
    """First-order check of backprop's gradient of f at `inputs`, valid at kinks.

    **Arguments**: `f` maps the inputs to a one-element floating tensor; `inputs`
    floating tensors with `requires_grad=True` and finite values (the point); the
    gradient g is what backprop returns under the policies active around the call;
    `directions` random unit directions are tried (default 16); `seed` fixes them;
    `rtol` the relative tolerance (default: 1e-6, or 1000 ulps of g's dtype if larger).

    **Returns**: `CheckReport` (`.passed`, `.differentiable`, `.clarke_distance`,
    `.directions`, `.reasons`; `print(report)` shows a table).

    >>> import torch, kinkgrad as kg
    >>> x = torch.zeros(1, requires_grad=True)
    >>> rep = kg.check(lambda x: (torch.relu(x) - torch.relu(-x)).sum(), x, seed=0)
    >>> rep.passed, rep.differentiable      # f is the identity; backprop says 0
    (False, True)
    """
    who = "kinkgrad.check"
    xs = _check_inputs(inputs, who)
    saved, STATE.watchers = STATE.watchers, []  # the check's evaluations are not training
    try:
        return _check(f, xs, directions, seed, rtol, who)
    finally:
        STATE.watchers = saved


def _check(
    f: Callable[..., Tensor],
    xs: list[Tensor],
    directions: int,
    seed: int | None,
    rtol: float | None,
    who: str,
) -> CheckReport:
    if not isinstance(directions, int) or directions < 1:
        raise ValueError(f"{who}: directions must be a positive integer, got {directions!r}")
    out = _check_output(f(*xs), who)
    value = float(out.detach())
    if out.requires_grad:
        raw = torch.autograd.grad(out.reshape(()), xs, allow_unused=True)
    else:
        raw = (None,) * len(xs)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(raw, xs, strict=True)]
    g = _flat(grads)
    if rtol is None:
        rtol = max(1e-6, 1000 * torch.finfo(grads[0].dtype).eps)

    # Differences in float64: f as it is, else with every float tensor it touches
    # promoted (a float32 model), else in the inputs' own dtype.
    f, fd_name, pts = _float64_version(f, xs, who)
    fd_dtype = pts[0].dtype
    fd_eps = torch.finfo(fd_dtype).eps

    def at(h: float, d: Sequence[Tensor]) -> list[Tensor]:
        return [p + h * di for p, di in zip(pts, d, strict=True)]

    def fval(h: float, d: Sequence[Tensor]) -> float:
        with torch.no_grad():
            return float(f(*at(h, d)))

    def grad_at(h: float, d: Sequence[Tensor]) -> Tensor:
        q = [t.detach().requires_grad_() for t in at(h, d)]
        o = f(*q)
        if not o.requires_grad:
            return torch.zeros_like(g)
        gs = torch.autograd.grad(o.reshape(()), q, allow_unused=True)
        return _flat([torch.zeros_like(t) if v is None else v for v, t in zip(gs, q, strict=True)])

    f0 = fval(0.0, [torch.zeros_like(p) for p in pts])
    scale_x = 1.0 + max(float(p.abs().max()) if p.numel() else 0.0 for p in pts)
    base = 1e-3 * scale_x
    gen = torch.Generator().manual_seed(_new_seed(seed))
    rows: list[DirectionCheck] = []
    flat_dirs: list[Tensor] = []
    samples: list[Tensor] = []
    kinks_hit = 0
    for i in range(directions):
        d = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in pts]
        norm = math.sqrt(sum(float((di**2).sum()) for di in d)) or 1.0
        d = [(di / norm).to(fd_dtype) for di in d]
        flat_dirs.append(_flat(d))
        neg = [-di for di in d]
        lin = linearization(f, *pts, direction=d)
        lin_back = linearization(f, *pts, direction=neg)
        if i == 0:
            kinks_hit = lin.kinks_hit
        fwd, e1 = _one_sided(lambda h, d=d: fval(h, d), f0, _first_step(base, lin.radius), fd_eps)
        bwd, e2 = _one_sided(
            lambda h, n=neg: fval(h, n), f0, _first_step(base, lin_back.radius), fd_eps
        )
        pred = float(
            sum(float((gi.double() * di.double()).sum()) for gi, di in zip(grads, d, strict=True))
        )
        atol = 1e-12 * (1.0 + abs(f0))
        scale = abs(fwd) + abs(bwd) + float(g.norm())
        tol = rtol * scale + 10 * e1 + atol
        sym_tol = max(1e-6, 100 * fd_eps) * (abs(fwd) + abs(bwd)) + 10 * (e1 + e2) + atol
        err = abs(fwd - pred)
        rows.append(
            DirectionCheck(
                i,
                fwd,
                bwd,
                pred,
                err,
                tol,
                e1,
                err <= tol,
                abs(fwd + bwd) <= sym_tol,
                lin.radius,
                lin_back.radius,
            )
        )
        eps = 1e-7 * scale_x
        samples.append(grad_at(min(eps, 0.5 * lin.radius), d))
        samples.append(grad_at(min(eps, 0.5 * lin_back.radius), neg))

    differentiable = all(r.symmetric for r in rows) and _linear(rows, flat_dirs)
    dist = _clarke_distance(g, samples)
    gmax = max(float(s.norm()) for s in samples) if samples else 0.0
    ctol = rtol * (float(g.norm()) + gmax) + 1e-12 + math.sqrt(fd_eps) * 1e-3 * gmax
    reasons, passed = _verdict(rows, differentiable, dist, ctol)
    return CheckReport(
        value,
        float(g.norm()),
        tuple(rows),
        differentiable,
        dist,
        ctol,
        kinks_hit,
        passed,
        tuple(reasons),
        str(grads[0].dtype).replace("torch.", ""),
        fd_name,
        len(samples),
    )


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


def _float64_version(
    f: Callable[..., Tensor], xs: Sequence[Tensor], who: str
) -> tuple[Callable[..., Tensor], str, list[Tensor]]:
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


def _first_step(base: float, radius: float) -> float:
    # Inside the linearization radius the quotients of a piecewise-linear f are exact.
    if math.isfinite(radius) and radius > 0:
        return max(min(base, 0.5 * radius), 1e-9 * base)
    return base


def _linear(rows: Sequence[DirectionCheck], dirs: Sequence[Tensor]) -> bool:
    """With fewer variables than directions, the one-sided derivatives must also fit
    one linear map (a function odd along every line can still be nonlinear)."""
    n = dirs[0].numel() if dirs else 0
    if n == 0 or n >= len(rows):
        return True
    A = torch.stack(list(dirs))  # [k, n]
    b = torch.tensor([r.forward for r in rows], dtype=torch.float64)
    a = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    res = (A @ a - b).abs()
    tol = torch.tensor([r.tolerance for r in rows], dtype=torch.float64)
    return bool((res <= tol + 1e-9 * b.abs().max()).all())


def _verdict(
    rows: Sequence[DirectionCheck], differentiable: bool, dist: float, ctol: float
) -> tuple[list[str], bool]:
    bad = [r for r in rows if not r.ok]
    asym = [r for r in rows if not r.symmetric]
    reasons: list[str] = []
    if differentiable:
        if not bad:
            reasons.append(
                f"f is differentiable here and <g, d> matches the one-sided derivative "
                f"along all {len(rows)} directions: the first-order model holds"
            )
            return reasons, True
        worst = max(bad, key=lambda r: r.error / max(r.tolerance, 1e-300))
        reasons.append(
            f"f is differentiable here (f'(x; -d) = -f'(x; d) along all {len(rows)} "
            f"directions), but backprop's gradient disagrees with its directional "
            f"derivatives along {len(bad)} of them; worst, direction {worst.index}: "
            f"f'(x; d) = {worst.forward:.6g}, <g, d> = {worst.predicted:.6g}"
        )
        reasons.append(
            f"g is not the gradient: its distance to the gradients sampled nearby is "
            f"{dist:.3g}. A fixed choice at a kink (PyTorch's, or the active policy's) "
            f"left the generalized gradient; kinkgrad.certified_grad returns one"
        )
        return reasons, False
    first = asym[0] if asym else rows[0]
    kink = (
        f"f sits on a kink: one-sided derivatives differ along {len(asym)} of "
        f"{len(rows)} directions (e.g. direction {first.index}: f'(x; d) = "
        f"{first.forward:.6g}, -f'(x; -d) = {-first.backward:.6g})"
    )
    reasons.append(kink)
    if dist <= ctol:
        reasons.append(
            f"g lies in the sampled Clarke subdifferential (distance {dist:.2g} to the "
            f"convex hull of nearby gradients): a valid generalized gradient"
        )
        return reasons, True
    reasons.append(
        f"g is at distance {dist:.3g} (tolerance {ctol:.1g}) from the convex hull of the "
        f"gradients sampled nearby: not a Clarke generalized gradient"
    )
    return reasons, False


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

_CLI_HELP = """\
Check backprop's gradient of FUNCTION at a point (first-order model, kinks, Clarke).

Two ways to give the point:
  * no --at/--shape: FUNCTION() takes no arguments and returns (f, inputs), inputs a
    tensor or a tuple of tensors;
  * --at / --shape, once per input: FUNCTION is f itself; --at takes a JSON number or
    nested list ('[0, 1.5, -2]'), --shape a comma-separated shape ('3,4') filled with
    standard normal values from --seed.
MODULE is a dotted module name (importable from the current directory) or a path to a
.py file. Exit status: 0 passed, 1 failed, 2 bad arguments.

examples:
  kinkgrad check mypkg.cases:relu_identity
  kinkgrad check cases.py:f --at '[0.0]' --policy relu=0.5
"""


def _load(target: str) -> Callable[..., Any]:
    if ":" not in target:
        raise ValueError(f"expected MODULE:FUNCTION, got {target!r}")
    mod_name, fn_name = target.rsplit(":", 1)
    if mod_name.endswith(".py") or os.sep in mod_name:
        path = os.path.abspath(mod_name)
        if not os.path.exists(path):
            raise ValueError(f"no such file: {mod_name}")
        name = "_kinkgrad_check_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(mod_name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{mod_name} has no callable {fn_name!r}")
    return fn


def _policy_values(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--policy expects OP=VALUE (e.g. relu=1.0), got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value: Any = float(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


def _cli_inputs(args: argparse.Namespace, fn: Callable[..., Any]) -> tuple[Callable, list[Tensor]]:
    dtype = getattr(torch, args.dtype)
    if args.at or args.shape:
        gen = torch.Generator().manual_seed(args.seed if args.seed is not None else 0)
        inputs = [torch.tensor(json.loads(a), dtype=dtype) for a in args.at]
        for s in args.shape:
            shape = tuple(int(v) for v in s.split(",") if v.strip())
            inputs.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        return fn, [x.requires_grad_() for x in inputs]
    try:
        made = fn()
    except TypeError as e:
        raise ValueError(
            f"FUNCTION() failed ({e}); if FUNCTION is f itself, give the point with --at or --shape"
        ) from None
    if not (isinstance(made, tuple) and made and callable(made[0])):
        raise ValueError(
            f"with no --at/--shape, FUNCTION() must return (f, inputs); got {type(made).__name__}"
        )
    f, rest = made[0], made[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = tuple(rest[0])
    inputs = []
    for x in rest:
        if not isinstance(x, Tensor):
            raise ValueError(f"inputs must be tensors, got {type(x).__name__}")
        inputs.append(x if x.requires_grad else x.detach().clone().requires_grad_())
    return f, inputs


def cli(argv: list[str]) -> int:
    """`kinkgrad check MODULE:FUNCTION [--at JSON]... [--shape S]... [options]`."""
    parser = argparse.ArgumentParser(
        prog="kinkgrad check",
        description=_CLI_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="MODULE:FUNCTION")
    parser.add_argument("--at", action="append", default=[], help="one input as JSON")
    parser.add_argument("--shape", action="append", default=[], help="one random input")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--directions", type=int, default=16)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--policy", action="append", default=[], help="OP=VALUE (or default=VALUE)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        pol = _policy_values(args.policy)
        fn = _load(args.target)
        f, inputs = _cli_inputs(args, fn)
    except (ValueError, ImportError, json.JSONDecodeError) as e:
        print(f"kinkgrad check: {e}", file=sys.stderr)
        return 2
    from .policy import policy

    try:
        if pol:
            default = pol.pop("default", None)
            with policy(default, **pol):
                report = check(f, *inputs, directions=args.directions, seed=args.seed)
        else:
            report = check(f, *inputs, directions=args.directions, seed=args.seed)
    except (ValueError, TypeError) as e:
        print(f"kinkgrad check: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.passed else 1
