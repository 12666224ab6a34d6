"""The catalog: one `OpSpec` per nonsmooth op, the single source of truth.

Each entry says where the op's kinks (ties, jumps) are, the one-sided derivatives
there, the Clarke subdifferential, what PyTorch returns, which torch callables compute
it, and which family of rules (`families.py`) implements the policy. Interception,
policies, the watcher, certification, the conventions table and the tests all read
these entries; adding an op means adding one entry here plus its probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .families import BinaryTie, Call, Elementwise, Family, Jump, Kink, Pool, Selection


@dataclass(frozen=True)
class Probe:
    """A point where the op sits on a kink, for the conventions table and the tests.

    `fn(*inputs)` is evaluated at `inputs`; its gradient is compared with the Clarke set
    (`in_clarke(grads) -> bool`, grads flattened per input). `jax` (optional) builds the
    same computation with jax.numpy so the table can measure JAX too.
    """

    at: str
    inputs: tuple[Sequence[float], ...]
    fn: Callable[..., Tensor]
    clarke: str
    in_clarke: Callable[[list[list[float]]], bool] | None
    jax: Callable[..., Any] | None = None


@dataclass(frozen=True)
class OpSpec:
    """One nonsmooth op.

    **Fields**: `name` (policy keyword), `kind` ("kink", "tie" or "jump"), `targets`
    (the torch callables routed here), `kinks` (where), `one_sided` (D- and D+ there),
    `clarke` (the Clarke subdifferential there; "none" for jumps), `torch_native`
    (what PyTorch returns there), `value_range` (numeric policy values accepted; values
    outside [0, 1] are not Clarke), `family` (the rules), `probes`.
    """

    name: str
    kind: str
    targets: tuple[Callable, ...]
    kinks: str
    one_sided: str
    clarke: str
    torch_native: str
    family: Family = field(repr=False, compare=False)
    probes: tuple[Probe, ...] = field(default=(), repr=False, compare=False)
    value_range: tuple[float, float] = (0.0, 1.0)
    route: Callable[[tuple, dict], str | None] | None = field(default=None, repr=False)

    def hits(self, call: Call, out: Any = None) -> Tensor:
        """Bool tensor of elements (ties: windows/reductions) exactly on a kink."""
        return self.family.exact_hits(call, out)


# --------------------------------------------------------------------------------------
# helpers for entries
# --------------------------------------------------------------------------------------


def _fns(*paths: str) -> tuple[Callable, ...]:
    """Resolve dotted names; names a given torch build lacks are skipped."""
    found = []
    roots = {"torch": torch, "F": F, "Tensor": torch.Tensor, "_nn": torch._C._nn}
    for path in paths:
        head, *rest = path.split(".")
        obj: Any = roots[head]
        try:
            for part in rest:
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if obj not in found:
            found.append(obj)
    return tuple(found)


def _x(c: Call) -> Tensor:
    return c.inputs[0]


def _scalar_kinks(points: Callable[[dict], list[tuple[float, float, float]]]):
    """Kinks of a one-input op at scalar points: (point, D-, D+)."""
    return lambda c: [Kink(_x(c), p, (dm,), (dp,), (1.0,)) for p, dm, dp in points(c.params)]


def _within(lo: float, hi: float) -> Callable[[list[list[float]]], bool]:
    return lambda grads: all(lo - 1e-12 <= g <= hi + 1e-12 for g in grads[0])


def _simplex(grads: list[list[float]]) -> bool:
    """Gradients spread over tied elements: non-negative and summing to one."""
    flat = [g for gs in grads for g in gs]
    return all(g >= -1e-12 for g in flat) and abs(sum(flat) - 1.0) < 1e-9


def _clamp_kinks(c: Call) -> list[Kink]:
    x, lo, hi = _x(c), c.params.get("min"), c.params.get("max")
    n = len(c.inputs)
    both = lo is not None and hi is not None
    out = []
    if lo is not None:
        valid = _lt(lo, hi) if both else None
        # below lo the output is lo (d/dx 0, d/dlo 1); above, it is x.
        out.append(
            Kink(x, lo, (0.0, 1.0, 0.0)[:n], (1.0, 0.0, 0.0)[:n], (1.0, -1.0, 0.0)[:n], valid)
        )
    if hi is not None:
        valid = _lt(lo, hi) if both else None
        out.append(
            Kink(x, hi, (1.0, 0.0, 0.0)[:n], (0.0, 0.0, 1.0)[:n], (1.0, 0.0, -1.0)[:n], valid)
        )
    return out


def _softshrink_kinks(c: Call) -> list[Kink]:
    """softshrink compares x with lambd in float32 for float16/bfloat16 inputs (unlike
    clamp and hardtanh, which round the bound to x's dtype): its kinks are at
    float32(lambd), and an x on the grid of float16/bfloat16 sits there only when that
    value is representable; otherwise no element is on a kink (bfloat16(0.1) is already
    on the linear piece: PyTorch's forward returns x - 0.1 there)."""
    x = _x(c)
    lambd = _opmath_point(x, float(c.params["lambd"]))
    if lambd is None or not lambd > 0:
        return []
    return [Kink(x, -lambd, (1.0,), (0.0,), (1.0,)), Kink(x, lambd, (0.0,), (1.0,), (1.0,))]


def _opmath_point(x: Tensor, point: float) -> float | None:
    """`point` as an op that computes float16/bfloat16 in float32 compares with it
    (softshrink, threshold), or None when no value of x's dtype equals it."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return point
    point = torch.tensor(point, dtype=torch.float32).item()
    return point if torch.tensor(point, dtype=x.dtype).item() == point else None


def _threshold_jumps(c: Call) -> Tensor:
    """threshold keeps x where x > float32(threshold) for float16/bfloat16 (see
    `_opmath_point`): the jump is there, not at the threshold rounded to x's dtype."""
    x = _x(c)
    point = _opmath_point(x, float(c.params["threshold"]))
    if point is None:
        return torch.zeros_like(x, dtype=torch.bool)
    return x == point


def _lt(lo: Any, hi: Any) -> Any:
    """lo < hi for numbers or tensors. With lo >= hi clamp is constant in x (PyTorch
    returns hi), so neither bound is a kink of x; that case keeps PyTorch's gradient."""
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        return torch.as_tensor(lo) < torch.as_tensor(hi)
    return None if lo < hi else torch.tensor(False)


def _jax(name: str) -> Callable[..., Any]:
    def build(jnp: Any, jax: Any, *xs: Any) -> Any:
        return {
            "relu": lambda x: jax.nn.relu(x),
            "relu6": lambda x: jax.nn.relu6(x),
            "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
            "hardtanh": lambda x: jax.nn.hard_tanh(x),
            "abs": lambda x: jnp.abs(x),
            "clamp0": lambda x: jnp.clip(x, 0.0, 1.0),
            "clamp1": lambda x: jnp.clip(x, 0.0, 1.0),
            "hardsigmoid": lambda x: jax.nn.hard_sigmoid(x),
            "hardswish": lambda x: jax.nn.hard_swish(x),
            "maximum": lambda a, b: jnp.maximum(a, b),
            "minimum": lambda a, b: jnp.minimum(a, b),
            "fmax": lambda a, b: jnp.fmax(a, b),
            "fmin": lambda a, b: jnp.fmin(a, b),
            "max": lambda x: jnp.max(x),
            "min": lambda x: jnp.min(x),
            "sort": lambda x: jnp.sum(jnp.sort(x) * jnp.arange(1.0, x.shape[0] + 1)),
            "median": lambda x: jnp.median(x),
            "sign": lambda x: jnp.sign(x),
            "round": lambda x: jnp.round(x),
            "floor": lambda x: jnp.floor(x),
            "ceil": lambda x: jnp.ceil(x),
            "trunc": lambda x: jnp.trunc(x),
        }[name](*xs).sum()

    return build


def _p(at, inputs, fn, clarke, in_clarke, jax=None) -> Probe:
    return Probe(at, tuple(inputs), fn, clarke, in_clarke, jax)


REALS = (-math.inf, math.inf)  # numeric values the paper studies go far outside [0, 1]
_NONE = "none (jump)"

# --------------------------------------------------------------------------------------
# The entries
# --------------------------------------------------------------------------------------


def _entries() -> list[OpSpec]:
    E = Elementwise
    relu6_k = _scalar_kinks(lambda p: [(0.0, 0.0, 1.0), (6.0, 1.0, 0.0)])
    return [
        # ---------------- elementwise kinks ----------------
        OpSpec(
            "relu",
            "kink",
            _fns("torch.relu", "F.relu", "Tensor.relu", "torch.relu_", "Tensor.relu_"),
            "x = 0",
            "D- = 0, D+ = 1",
            "[0, 1]",
            "0",
            E(
                ("inplace",),
                {"inplace": False},
                _scalar_kinks(lambda p: [(0.0, 0.0, 1.0)]),
                inplace_funcs=_fns("torch.relu_", "Tensor.relu_"),
            ),
            (_p("x=0", [[0.0]], torch.relu, "[0, 1]", _within(0, 1), _jax("relu")),),
            REALS,
        ),
        OpSpec(
            "relu6",
            "kink",
            _fns("F.relu6", "_nn.relu6", "_nn.relu6_"),
            "x = 0, x = 6",
            "at 0: 0 | 1; at 6: 1 | 0",
            "[0, 1]",
            "0 at both",
            E(
                ("inplace",),
                {"inplace": False},
                relu6_k,
                inplace_funcs=_fns("_nn.relu6_"),
                alt_signature=("min_val", "max_val", "inplace"),
            ),
            (
                _p("x=0", [[0.0]], F.relu6, "[0, 1]", _within(0, 1), _jax("relu6")),
                _p("x=6", [[6.0]], F.relu6, "[0, 1]", _within(0, 1), _jax("relu6")),
            ),
            REALS,
        ),
        OpSpec(
            "leaky_relu",
            "kink",
            _fns("F.leaky_relu", "_nn.leaky_relu", "F.leaky_relu_"),
            "x = 0",
            "D- = slope, D+ = 1",
            "[slope, 1]",
            "slope",
            E(
                ("negative_slope", "inplace"),
                {"negative_slope": 0.01, "inplace": False},
                _scalar_kinks(lambda p: [(0.0, float(p["negative_slope"]), 1.0)]),
                inplace_funcs=_fns("F.leaky_relu_"),
            ),
            (
                _p(
                    "x=0 (slope 0.01)",
                    [[0.0]],
                    F.leaky_relu,
                    "[0.01, 1]",
                    _within(0.01, 1),
                    _jax("leaky_relu"),
                ),
            ),
            REALS,
        ),
        OpSpec(
            "hardtanh",
            "kink",
            _fns("F.hardtanh", "_nn.hardtanh", "F.hardtanh_"),
            "x = min_val, x = max_val",
            "at min: 0 | 1; at max: 1 | 0",
            "[0, 1]",
            "0 at both",
            E(
                ("min_val", "max_val", "inplace"),
                {"min_val": -1.0, "max_val": 1.0, "inplace": False},
                _scalar_kinks(
                    lambda p: (
                        [(float(p["min_val"]), 0.0, 1.0), (float(p["max_val"]), 1.0, 0.0)]
                        if p["min_val"] < p["max_val"]
                        else []
                    )
                ),
                inplace_funcs=_fns("F.hardtanh_"),
            ),
            (
                _p("x=-1", [[-1.0]], F.hardtanh, "[0, 1]", _within(0, 1), _jax("hardtanh")),
                _p("x=+1", [[1.0]], F.hardtanh, "[0, 1]", _within(0, 1), _jax("hardtanh")),
            ),
            REALS,
            # nn.ReLU6 is a Hardtanh(0, 6): count and treat it as the relu6 it is.
            route=lambda args, kwargs: (
                "relu6" if _hardtanh_bounds(args, kwargs) == (0, 6) else None
            ),
        ),
        OpSpec(
            "clamp",
            "kink",
            _fns(
                "torch.clamp",
                "Tensor.clamp",
                "torch.clamp_",
                "Tensor.clamp_",
                "torch.clip",
                "Tensor.clip",
                "torch.clip_",
                "Tensor.clip_",
            ),
            "x = min, x = max (scalar or tensor bounds)",
            "at min: d/dx 0 | 1, d/dmin 1 | 0; at max: d/dx 1 | 0, d/dmax 0 | 1",
            "d/dx in [0, 1] (bounds get the complement)",
            "d/dx = 1 at both bounds",
            E(
                ("min", "max"),
                {"min": None, "max": None},
                _clamp_kinks,
                tensor_params=("min", "max"),
                inplace_funcs=_fns("torch.clamp_", "Tensor.clamp_", "torch.clip_", "Tensor.clip_"),
            ),
            (
                _p(
                    "x=min (clamp(x, 0, 1) at 0)",
                    [[0.0]],
                    lambda x: torch.clamp(x, 0.0, 1.0),
                    "[0, 1]",
                    _within(0, 1),
                    _jax("clamp0"),
                ),
                _p(
                    "x=max (clamp(x, 0, 1) at 1)",
                    [[1.0]],
                    lambda x: torch.clamp(x, 0.0, 1.0),
                    "[0, 1]",
                    _within(0, 1),
                    _jax("clamp1"),
                ),
            ),
            REALS,
        ),
        OpSpec(
            "clamp_min",
            "kink",
            _fns("torch.clamp_min", "Tensor.clamp_min", "torch.clamp_min_", "Tensor.clamp_min_"),
            "x = min",
            "d/dx 0 | 1",
            "[0, 1]",
            "1",
            E(
                ("min",),
                {},
                _clamp_kinks,
                tensor_params=("min",),
                inplace_funcs=_fns("torch.clamp_min_", "Tensor.clamp_min_"),
            ),
            (
                _p(
                    "x=min (clamp_min(x, 0) at 0)",
                    [[0.0]],
                    lambda x: torch.clamp_min(x, 0.0),
                    "[0, 1]",
                    _within(0, 1),
                ),
            ),
            REALS,
        ),
        OpSpec(
            "clamp_max",
            "kink",
            _fns("torch.clamp_max", "Tensor.clamp_max", "torch.clamp_max_", "Tensor.clamp_max_"),
            "x = max",
            "d/dx 1 | 0",
            "[0, 1]",
            "1",
            E(
                ("max",),
                {},
                _clamp_kinks,
                tensor_params=("max",),
                inplace_funcs=_fns("torch.clamp_max_", "Tensor.clamp_max_"),
            ),
            (
                _p(
                    "x=max (clamp_max(x, 0) at 0)",
                    [[0.0]],
                    lambda x: torch.clamp_max(x, 0.0),
                    "[0, 1]",
                    _within(0, 1),
                ),
            ),
            REALS,
        ),
        OpSpec(
            "abs",
            "kink",
            _fns(
                "torch.abs",
                "Tensor.abs",
                "torch.abs_",
                "Tensor.abs_",
                "torch.absolute",
                "Tensor.absolute",
                "Tensor.absolute_",
                "Tensor.__abs__",
            ),
            "x = 0",
            "D- = -1, D+ = 1",
            "[-1, 1]",
            "0",
            E(
                (),
                {},
                _scalar_kinks(lambda p: [(0.0, -1.0, 1.0)]),
                inplace_funcs=_fns("torch.abs_", "Tensor.abs_", "Tensor.absolute_"),
            ),
            (_p("x=0", [[0.0]], torch.abs, "[-1, 1]", _within(-1, 1), _jax("abs")),),
        ),
        OpSpec(
            "hardsigmoid",
            "kink",
            _fns("F.hardsigmoid", "_nn.hardsigmoid", "_nn.hardsigmoid_"),
            "x = -3, x = 3",
            "at -3: 0 | 1/6; at 3: 1/6 | 0",
            "[0, 1/6]",
            "0 at both",
            E(
                ("inplace",),
                {"inplace": False},
                _scalar_kinks(lambda p: [(-3.0, 0.0, 1 / 6), (3.0, 1 / 6, 0.0)]),
                inplace_funcs=_fns("_nn.hardsigmoid_"),
            ),
            (
                _p(
                    "x=-3",
                    [[-3.0]],
                    F.hardsigmoid,
                    "[0, 1/6]",
                    _within(0, 1 / 6),
                    _jax("hardsigmoid"),
                ),
                _p(
                    "x=+3",
                    [[3.0]],
                    F.hardsigmoid,
                    "[0, 1/6]",
                    _within(0, 1 / 6),
                    _jax("hardsigmoid"),
                ),
            ),
        ),
        OpSpec(
            "hardswish",
            "kink",
            _fns("F.hardswish", "_nn.hardswish", "_nn.hardswish_"),
            "x = -3, x = 3",
            "at -3: 0 | -1/2; at 3: 3/2 | 1",
            "[-1/2, 0] and [1, 3/2]",
            "0 at -3, 1 at 3",
            E(
                ("inplace",),
                {"inplace": False},
                _scalar_kinks(lambda p: [(-3.0, 0.0, -0.5), (3.0, 1.5, 1.0)]),
                inplace_funcs=_fns("_nn.hardswish_"),
            ),
            (
                _p("x=-3", [[-3.0]], F.hardswish, "[-1/2, 0]", _within(-0.5, 0), _jax("hardswish")),
                _p("x=+3", [[3.0]], F.hardswish, "[1, 3/2]", _within(1, 1.5), _jax("hardswish")),
            ),
        ),
        OpSpec(
            "softshrink",
            "kink",
            _fns("F.softshrink", "_nn.softshrink"),
            "x = -lambd, x = lambd",
            "at -lambd: 1 | 0; at lambd: 0 | 1",
            "[0, 1]",
            "0 at both",
            E(
                ("lambd",),
                {"lambd": 0.5},
                _softshrink_kinks,
            ),
            (
                _p("x=-0.5", [[-0.5]], F.softshrink, "[0, 1]", _within(0, 1)),
                _p("x=+0.5", [[0.5]], F.softshrink, "[0, 1]", _within(0, 1)),
            ),
        ),
        # ---------------- ties ----------------
        OpSpec(
            "maximum",
            "tie",
            _fns("torch.maximum", "Tensor.maximum"),
            "a == b",
            "(d/da, d/db) = (0, 1) | (1, 0)",
            "{(t, 1 - t): t in [0, 1]}",
            "(1/2, 1/2)",
            BinaryTie("plus"),
            (_p("a == b", [[0.0], [0.0]], torch.maximum, "{(t, 1-t)}", _simplex, _jax("maximum")),),
        ),
        OpSpec(
            "minimum",
            "tie",
            _fns("torch.minimum", "Tensor.minimum"),
            "a == b",
            "(d/da, d/db) = (1, 0) | (0, 1)",
            "{(t, 1 - t): t in [0, 1]}",
            "(1/2, 1/2)",
            BinaryTie("minus"),
            (_p("a == b", [[0.0], [0.0]], torch.minimum, "{(t, 1-t)}", _simplex, _jax("minimum")),),
        ),
        OpSpec(
            "fmax",
            "tie",
            _fns("torch.fmax", "Tensor.fmax"),
            "a == b",
            "(d/da, d/db) = (0, 1) | (1, 0)",
            "{(t, 1 - t): t in [0, 1]}",
            "(1, 0)",
            BinaryTie("plus"),
            (_p("a == b", [[0.0], [0.0]], torch.fmax, "{(t, 1-t)}", _simplex, _jax("fmax")),),
        ),
        OpSpec(
            "fmin",
            "tie",
            _fns("torch.fmin", "Tensor.fmin"),
            "a == b",
            "(d/da, d/db) = (1, 0) | (0, 1)",
            "{(t, 1 - t): t in [0, 1]}",
            "(1, 0)",
            BinaryTie("minus"),
            (_p("a == b", [[0.0], [0.0]], torch.fmin, "{(t, 1-t)}", _simplex, _jax("fmin")),),
        ),
        OpSpec(
            "max",
            "tie",
            _fns("torch.max", "Tensor.max"),
            "several elements equal the maximum (full or along dim)",
            "one-hot on any tied element",
            "convex hull of the one-hots (simplex)",
            "full: split evenly; along dim: the returned index",
            Selection("auto", ("input", "dim", "keepdim"), {"dim": None, "keepdim": False}),
            (
                _p("full, x = [1, 1]", [[1.0, 1.0]], torch.max, "simplex", _simplex, _jax("max")),
                _p(
                    "dim=0, x = [1, 1]",
                    [[1.0, 1.0]],
                    lambda x: torch.max(x, 0).values,
                    "simplex",
                    _simplex,
                ),
            ),
            route=lambda args, kwargs: "maximum" if _other_tensor(args, kwargs) else None,
        ),
        OpSpec(
            "min",
            "tie",
            _fns("torch.min", "Tensor.min"),
            "several elements equal the minimum (full or along dim)",
            "one-hot on any tied element",
            "convex hull of the one-hots (simplex)",
            "full: split evenly; along dim: the returned index",
            Selection("auto", ("input", "dim", "keepdim"), {"dim": None, "keepdim": False}),
            (
                _p("full, x = [1, 1]", [[1.0, 1.0]], torch.min, "simplex", _simplex, _jax("min")),
                _p(
                    "dim=0, x = [1, 1]",
                    [[1.0, 1.0]],
                    lambda x: torch.min(x, 0).values,
                    "simplex",
                    _simplex,
                ),
            ),
            route=lambda args, kwargs: "minimum" if _other_tensor(args, kwargs) else None,
        ),
        OpSpec(
            "amax",
            "tie",
            _fns("torch.amax", "Tensor.amax"),
            "several elements equal the maximum over dims",
            "one-hot on any tied element",
            "simplex",
            "split evenly",
            Selection("dims", ("input", "dim", "keepdim"), {"dim": (), "keepdim": False}),
            (_p("x = [1, 1]", [[1.0, 1.0]], torch.amax, "simplex", _simplex),),
        ),
        OpSpec(
            "amin",
            "tie",
            _fns("torch.amin", "Tensor.amin"),
            "several elements equal the minimum over dims",
            "one-hot on any tied element",
            "simplex",
            "split evenly",
            Selection("dims", ("input", "dim", "keepdim"), {"dim": (), "keepdim": False}),
            (_p("x = [1, 1]", [[1.0, 1.0]], torch.amin, "simplex", _simplex),),
        ),
        OpSpec(
            "sort",
            "tie",
            _fns("torch.sort", "Tensor.sort", "torch.msort", "Tensor.msort"),
            "equal elements (any permutation of them sorts)",
            "each permutation of a tied group",
            "convex hull of the permutations",
            "one permutation (the kernel's)",
            Selection(
                "slots",
                ("input", "dim", "descending", "stable"),
                {"dim": -1, "descending": False, "stable": False},
            ),
            (
                _p(
                    "x = [1, 1], weights [1, 2]",
                    [[1.0, 1.0]],
                    lambda x: torch.sort(x).values * torch.tensor([1.0, 2.0], dtype=x.dtype),
                    "{(1+t, 2-t)}",
                    lambda g: (
                        abs(sum(g[0]) - 3) < 1e-9 and all(1 - 1e-12 <= v <= 2 + 1e-12 for v in g[0])
                    ),
                    _jax("sort"),
                ),
            ),
        ),
        OpSpec(
            "topk",
            "tie",
            _fns("torch.topk", "Tensor.topk"),
            "equal elements at or inside the k-th place",
            "each choice of tied elements",
            "convex hull of the choices",
            "one choice (the kernel's)",
            Selection(
                "slots",
                ("input", "k", "dim", "largest", "sorted"),
                {"dim": -1, "largest": True, "sorted": True},
            ),
            (
                _p(
                    "k=1, x = [1, 1]",
                    [[1.0, 1.0]],
                    lambda x: torch.topk(x, 1).values,
                    "simplex",
                    _simplex,
                ),
            ),
        ),
        OpSpec(
            "kthvalue",
            "tie",
            _fns("torch.kthvalue", "Tensor.kthvalue"),
            "several elements equal the k-th smallest",
            "one-hot on any tied element",
            "simplex",
            "the returned index",
            Selection("dim", ("input", "k", "dim", "keepdim"), {"dim": -1, "keepdim": False}),
            (
                _p(
                    "k=1, x = [1, 1]",
                    [[1.0, 1.0]],
                    lambda x: torch.kthvalue(x, 1).values,
                    "simplex",
                    _simplex,
                ),
            ),
        ),
        OpSpec(
            "median",
            "tie",
            _fns("torch.median", "Tensor.median"),
            "several elements equal the median",
            "one-hot on any tied element",
            "simplex",
            "full: split evenly; along dim: the returned index",
            Selection("auto", ("input", "dim", "keepdim"), {"dim": None, "keepdim": False}),
            (
                _p(
                    "full, x = [1, 1, 2]",
                    [[1.0, 1.0, 2.0]],
                    torch.median,
                    "simplex",
                    lambda g: _simplex(g) and abs(g[0][2]) < 1e-12,
                    _jax("median"),
                ),
            ),
        ),
        *[
            OpSpec(
                f"max_pool{nd}d",
                "tie",
                _fns(
                    f"F.max_pool{nd}d",
                    f"F.max_pool{nd}d_with_indices",
                    f"torch.max_pool{nd}d",
                    f"torch.max_pool{nd}d_with_indices",
                    f"_nn.max_pool{nd}d_with_indices",
                ),
                "a window whose maximum is carried by several inputs",
                "one-hot on any tied element of the window",
                "simplex per window",
                "first tied element in scan order",
                Pool(nd, adaptive=False),
                (
                    _p(
                        "constant window",
                        [[[1.0] * (2**nd)]],
                        lambda x, nd=nd: getattr(F, f"max_pool{nd}d")(
                            x.reshape((1, 1) + (2,) * nd), 2
                        ),
                        "simplex",
                        _simplex,
                    ),
                ),
            )
            for nd in (1, 2, 3)
        ],
        *[
            OpSpec(
                f"adaptive_max_pool{nd}d",
                "tie",
                _fns(
                    f"F.adaptive_max_pool{nd}d",
                    f"F.adaptive_max_pool{nd}d_with_indices",
                    f"torch.adaptive_max_pool{nd}d",
                    f"_nn.adaptive_max_pool{nd}d",
                ),
                "a window whose maximum is carried by several inputs",
                "one-hot on any tied element of the window",
                "simplex per window",
                "first tied element in scan order",
                Pool(nd, adaptive=True),
                (
                    _p(
                        "constant input, output 1",
                        [[[1.0] * (2**nd)]],
                        lambda x, nd=nd: getattr(F, f"adaptive_max_pool{nd}d")(
                            x.reshape((1, 1) + (2,) * nd), 1
                        ),
                        "simplex",
                        _simplex,
                    ),
                ),
            )
            for nd in (1, 2, 3)
        ],
        # ---------------- jumps ----------------
        _jump(
            "sign",
            _fns("torch.sign", "Tensor.sign", "Tensor.sign_"),
            "x = 0",
            lambda c: _x(c) == 0,
            torch.sign,
            _fns("Tensor.sign_"),
        ),
        OpSpec(
            "heaviside",
            "jump",
            _fns("torch.heaviside", "Tensor.heaviside", "Tensor.heaviside_"),
            "x = 0",
            "0 | 0 (jump from 0 to 1)",
            _NONE,
            "error: derivative not implemented",
            Jump(
                ("values",),
                {},
                lambda c: _x(c) == 0,
                True,
                None,
                _fns("Tensor.heaviside_"),
                torch.heaviside,
                native_is_policy_zero=False,
            ),
            (_p("x=0", [[0.0]], lambda x: torch.heaviside(x, torch.zeros_like(x)), _NONE, None),),
        ),
        _jump(
            "round",
            _fns("torch.round", "Tensor.round", "torch.round_", "Tensor.round_"),
            "x = k + 1/2",
            _round_jumps,
            torch.round,
            _fns("torch.round_", "Tensor.round_"),
            signature=("decimals",),
            defaults={"decimals": 0},
            at=0.5,
        ),
        _jump(
            "floor",
            _fns("torch.floor", "Tensor.floor", "torch.floor_", "Tensor.floor_"),
            "x integer",
            lambda c: _isint(_x(c)),
            torch.floor,
            _fns("torch.floor_", "Tensor.floor_"),
            at=1.0,
        ),
        _jump(
            "ceil",
            _fns("torch.ceil", "Tensor.ceil", "torch.ceil_", "Tensor.ceil_"),
            "x integer",
            lambda c: _isint(_x(c)),
            torch.ceil,
            _fns("torch.ceil_", "Tensor.ceil_"),
            at=1.0,
        ),
        _jump(
            "trunc",
            _fns(
                "torch.trunc",
                "Tensor.trunc",
                "torch.trunc_",
                "Tensor.trunc_",
                "torch.fix",
                "Tensor.fix",
                "torch.fix_",
                "Tensor.fix_",
            ),
            "x nonzero integer",
            lambda c: _isint(_x(c)) & (_x(c) != 0),
            torch.trunc,
            _fns("torch.trunc_", "Tensor.trunc_", "torch.fix_", "Tensor.fix_"),
            at=1.0,
        ),
        OpSpec(
            "hardshrink",
            "jump",
            _fns("torch.hardshrink", "Tensor.hardshrink", "F.hardshrink"),
            "x = -lambd, x = lambd",
            "1 | 0 and 0 | 1, with a jump of lambd",
            _NONE,
            "0",
            Jump(
                ("lambd",),
                {"lambd": 0.5},
                lambda c: (_x(c).abs() == c.params["lambd"]) & (c.params["lambd"] > 0),
                False,
                lambda g, c, x: torch.ops.aten.hardshrink_backward(g, x, c.params["lambd"]),
            ),
            (_p("x=0.5", [[0.5]], F.hardshrink, _NONE, None),),
        ),
        OpSpec(
            "threshold",
            "jump",
            _fns("F.threshold", "torch.threshold", "F.threshold_", "torch.threshold_"),
            "x = threshold",
            "0 | 1, with a jump unless value == threshold",
            _NONE,
            "0",
            Jump(
                ("threshold", "value", "inplace"),
                {"inplace": False},
                _threshold_jumps,
                False,
                lambda g, c, x: torch.ops.aten.threshold_backward(g, x, c.params["threshold"]),
                _fns("F.threshold_", "torch.threshold_"),
                torch.threshold,
            ),
            (
                _p(
                    "x=threshold (1, value 0)",
                    [[1.0]],
                    lambda x: F.threshold(x, 1.0, 0.0),
                    _NONE,
                    None,
                ),
            ),
        ),
    ]


def _other_tensor(args: tuple, kwargs: dict) -> bool:
    return (len(args) > 1 and isinstance(args[1], Tensor)) or isinstance(
        kwargs.get("other"), Tensor
    )


def _hardtanh_bounds(args: tuple, kwargs: dict) -> tuple[float, float]:
    lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return lo, hi


def _isint(x: Tensor) -> Tensor:
    return (x == torch.floor(x)) & torch.isfinite(x)


def _round_jumps(c: Call) -> Tensor:
    x = _x(c)
    d = int(c.params.get("decimals") or 0)
    if d:
        x = x * (10.0**d)
    return ((x - torch.floor(x)) == 0.5) & torch.isfinite(x)


def _jump(
    name, targets, where, jumps, outofplace, inplace_funcs, signature=(), defaults=None, at=0.0
) -> OpSpec:
    """Piecewise-constant op: derivative 0 everywhere it exists."""
    return OpSpec(
        name,
        "jump",
        targets,
        where,
        "0 | 0 (jump)",
        _NONE,
        "0",
        Jump(tuple(signature), dict(defaults or {}), jumps, True, None, inplace_funcs, outofplace),
        (_p(f"x={at:g}", [[at]], outofplace, _NONE, None, _jax(name)),),
    )


def _memo(build: Callable[[], Any]) -> Callable[[], Any]:
    """Build once, then a plain dict read: torch.compile traces a policy opened inside a
    compiled function down to here, and reads a dict without the warning it gives for
    functools caches."""
    box: dict[str, Any] = {}

    def get() -> Any:
        if "v" not in box:
            box["v"] = build()
        return box["v"]

    get.__name__, get.__doc__ = build.__name__, build.__doc__
    return get


@_memo
def _catalog() -> tuple[OpSpec, ...]:
    specs = tuple(_entries())
    names = [s.name for s in specs]
    assert len(set(names)) == len(names), "duplicate op names in the catalog"
    return specs


def catalog() -> list[OpSpec]:
    """All supported nonsmooth ops, one `OpSpec` each.

    >>> import kinkgrad as kg
    >>> [s.name for s in kg.catalog()][:3]
    ['relu', 'relu6', 'leaky_relu']
    """
    return list(_catalog())


@_memo
def _by_name() -> dict[str, OpSpec]:
    return {s.name: s for s in _catalog()}


def spec_by_name(name: str) -> OpSpec | None:
    return _by_name().get(name)


@_memo
def targets() -> dict[Callable, OpSpec]:
    """torch callable -> the spec it computes (what the interception layer routes)."""
    table: dict[Callable, OpSpec] = {}
    for spec in _catalog():
        for fn in spec.targets:
            if fn in table:
                raise AssertionError(f"{fn} is claimed by {table[fn].name} and {spec.name}")
            table[fn] = spec
    return table


def targets_by_name() -> dict[str, tuple[tuple[Callable, OpSpec], ...]]:
    """`targets()` grouped by the callables' `__name__`: what dynamo traces. A dict keyed
    by callables makes dynamo guard every key (over a hundred guards, evaluated at every
    call of the compiled code); a string key is guarded alone."""
    groups: dict[str, list[tuple[Callable, OpSpec]]] = {}
    for fn, spec in targets().items():
        groups.setdefault(getattr(fn, "__name__", ""), []).append((fn, spec))
    return {name: tuple(pairs) for name, pairs in groups.items()}
