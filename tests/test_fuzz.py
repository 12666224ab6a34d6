"""Differential fuzz: kinkgrad against an independently written oracle (`fuzz_oracle`).

Every case draws a tensor full of exact kinks and ties, +-0.0, +-inf, NaN and
subnormals, in 4 dtypes and several layouts (contiguous, transposed, channels_last,
0-d, empty), runs one op in one call style under a policy, on the eager (CPU kink gate)
path or the lazy (accelerator, no host sync) path, and checks that the forward is plain
PyTorch's bit for bit and the gradient is the oracle's: PyTorch's off the kinks, the
policy's on them. Call styles: plain call, in-place on a copy, in-place on a view,
output modified in place, input modified after the op, inside reentrant and
non-reentrant checkpoint, under autocast. Where plain PyTorch raises (an input it saved
was modified), kinkgrad must raise too: right, or loud.

Default: a seeded handful of examples per (op, style, path); `-m slow`: ten times more.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

import kinkgrad as kg
from kinkgrad.at_kinks import force_lazy
from tests import fuzz_oracle as oracle

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
FAST = settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
SLOW = settings(
    max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
PATHS = ["eager", "lazy"]
ELEMENTWISE_STYLES = [
    "call",
    "inplace",
    "inplace_view",
    "output_mutated",
    "input_mutated",
    "checkpoint_reentrant",
    "checkpoint",
    "autocast",
]
TIE_STYLES = [
    "call",
    "output_mutated",
    "input_mutated",
    "checkpoint_reentrant",
    "checkpoint",
    "autocast",
]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def same_values(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> bool:
    """Equal as numbers (NaN where NaN; -0.0 == 0.0), within atol (0: exactly)."""
    if a.shape != b.shape:
        return False
    a, b = a.to(torch.float64), b.to(torch.float64)
    if not torch.equal(a.isnan(), b.isnan()):
        return False
    a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
    if atol == 0.0:
        return torch.equal(a, b)
    return bool(torch.isclose(a, b, rtol=atol, atol=atol).all())


@st.composite
def tensors(draw, points, nd=None, min_numel=0):
    """A tensor whose values are mostly on kinks/ties, plus specials, in some layout."""
    dtype = draw(st.sampled_from(DTYPES))
    tiny = torch.finfo(dtype).tiny / 4  # a subnormal in every dtype
    pool = points + [math.inf, -math.inf, math.nan, tiny, -tiny]
    value = st.one_of(st.sampled_from(pool), st.integers(-12, 12).map(lambda i: i / 4))
    layout = (
        draw(st.sampled_from(["0d", "1d", "2d", "transposed", "channels_last"]))
        if nd is None
        else nd
    )
    if layout == "0d":
        shape: tuple[int, ...] = ()
    elif layout == "1d":
        shape = (draw(st.integers(min_numel, 7)),)
    elif layout in ("2d", "transposed"):
        shape = (draw(st.integers(1, 3)), draw(st.integers(max(min_numel, 1), 5)))
    else:
        shape = (1, 2, draw(st.integers(2, 4)), draw(st.integers(2, 4)))
    n = math.prod(shape)
    vals = draw(st.lists(value, min_size=n, max_size=n))
    t = torch.tensor(vals, dtype=torch.float64).reshape(shape).to(dtype)
    if layout == "transposed":
        t = t.t().contiguous().t()
    elif layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _ints_like(t: torch.Tensor, lo: int, hi: int, seed: int) -> torch.Tensor:
    g = torch.randint(lo, hi, t.shape, generator=torch.Generator().manual_seed(seed))
    return g.to(t.dtype)


def run_style(style, fn, fn_, x, g, w, policy, path):
    """Output and gradient of x, or the exception raised. `fn_` is the in-place form."""
    leaf = x.detach().clone().requires_grad_(True)
    ctx = kg.policy(**policy) if policy else nullcontext()
    lazy = force_lazy() if path == "lazy" else nullcontext()
    try:
        with lazy:
            with ctx:
                if style == "call":
                    out = fn(leaf)
                elif style == "inplace":
                    out = leaf * 1
                    fn_(out)
                elif style == "inplace_view":
                    out = leaf * 1
                    fn_(out[::2] if out.dim() else out[...])
                elif style == "output_mutated":
                    out = fn(leaf * 1)  # a non-leaf input, as in real nets
                    out = out.mul_(w) if out.shape == w.shape else out.mul_(2.0)
                elif style == "input_mutated":
                    y = leaf * 1
                    out = fn(y)
                    y.add_(1.0)
                elif style == "checkpoint_reentrant":
                    out = checkpoint(fn, leaf, use_reentrant=True)
                elif style == "checkpoint":
                    out = checkpoint(fn, leaf, use_reentrant=False)
                elif style == "autocast":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        out = fn(leaf)
                else:
                    raise AssertionError(style)
            # backward outside the policy block: values are captured at forward time
            gg = g if g.shape == out.shape else _ints_like(out, -4, 5, 7)
            if out.numel():
                out.backward(gg.to(out.dtype))  # .backward: reentrant checkpoint refuses .grad
    except RuntimeError as e:
        return e, None, None
    grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
    return None, out.detach(), grad


def reference(fn, x, g, w, style, path):
    """Plain PyTorch without the in-place modification PyTorch refused, modified after."""
    gu = upstream_at_op(style, g, w, fn(x.detach()).shape)
    same_input = (lambda t: fn(t * 1)) if style == "input_mutated" else fn  # x*1 as there
    err, out, grad = run_style("call", same_input, None, x, gu, w, None, path)
    assert err is None
    if style == "output_mutated":
        out = out * w if out.shape == w.shape else out * 2.0
    return err, out, grad


def upstream_at_op(style, g, w, out_shape):
    """The gradient arriving at the op's output in `style`."""
    if style == "output_mutated":
        return g * w if w.shape == out_shape else g * 2.0
    return g


# --------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------

ELEMENTWISE_CASES = [
    (name, style, path)
    for name in oracle.ELEMENTWISE
    for style in ELEMENTWISE_STYLES
    for path in PATHS
    if not (style.startswith("inplace") and oracle.ELEMENTWISE[name][1] is None)
]


def _elementwise_case(name, style, path, x, a):
    fn, fn_, kinks = oracle.ELEMENTWISE[name]
    g = _ints_like(x, -4, 5, 1)
    w = _ints_like(x, 1, 4, 2)
    policy = {oracle.POLICY_NAME.get(name, name): a}
    err0, out0, grad0 = run_style(style, fn, fn_, x, g, w, None, path)
    err1, out1, grad1 = run_style(style, fn, fn_, x, g, w, policy, path)
    if err0 is not None:  # PyTorch refuses (a saved input was modified)
        if err1 is not None:
            return  # loud, as PyTorch
        # kinkgrad saved what it needs itself: its gradient must then be right, i.e.
        # the one at the forward's values (plain PyTorch on an unmodified input).
        err0, out0, grad0 = reference(fn, x, g, w, style, path)
    assert err1 is None, f"kinkgrad raised {err1!r}; plain PyTorch did not"
    assert same_bits(out0, out1), "forward must be PyTorch's, bit for bit"
    assert out0.stride() == out1.stride(), "and in PyTorch's memory format"
    if x.numel() == 0:
        return
    region = torch.ones(x.shape, dtype=torch.bool)
    if style == "inplace_view" and x.dim():
        region = torch.zeros(x.shape, dtype=torch.bool)
        region[::2] = True
    gu = upstream_at_op(style, g, w, x.shape)
    expected = grad0
    xd = x.to(torch.float64)
    for point, dm, dp in kinks:
        hit = (xd == point) & region
        expected = torch.where(hit, gu * ((1 - a) * dm + a * dp), expected)
    assert same_values(grad1, expected), (grad1, expected)


@pytest.mark.parametrize("name,style,path", ELEMENTWISE_CASES)
@FAST
@given(data=st.data())
def test_fuzz_elementwise(name, style, path, data):
    x = data.draw(tensors(oracle.POINTS))
    a = data.draw(st.sampled_from([0.0, 1.0, 0.5, 0.25]))
    _elementwise_case(name, style, path, x, a)


@pytest.mark.slow
@pytest.mark.parametrize("name,style,path", ELEMENTWISE_CASES)
@SLOW
@given(data=st.data())
def test_fuzz_elementwise_slow(name, style, path, data):
    x = data.draw(tensors(oracle.POINTS))
    a = data.draw(st.sampled_from([0.0, 1.0, 0.5, 0.25, 0.75]))
    _elementwise_case(name, style, path, x, a)


# --------------------------------------------------------------------------------------
# binary ties: maximum / minimum (x against a partner with many exact ties)
# --------------------------------------------------------------------------------------

BINARY = {"maximum": torch.maximum, "minimum": torch.minimum}


def _binary_case(name, path, x, rule, seed):
    pick = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) < 0.6
    y = torch.where(pick, x, _ints_like(x, -2, 3, seed))
    g = _ints_like(x, -4, 5, 3)
    leaves0 = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    leaves1 = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    out0 = BINARY[name](*leaves0)
    with force_lazy() if path == "lazy" else nullcontext(), kg.policy(**{name: rule}):
        out1 = BINARY[name](*leaves1)
    assert same_bits(out0.detach(), out1.detach())
    if not x.numel():
        return
    gx0, gy0 = torch.autograd.grad(out0, leaves0, g)
    gx1, gy1 = torch.autograd.grad(out1, leaves1, g)
    tie = x == y
    cx, cy = (1.0, 0.0) if rule == "first" else (0.5, 0.5)
    assert same_values(gx1, torch.where(tie, g * cx, gx0))
    assert same_values(gy1, torch.where(tie, g * cy, gy0))


def _draw_binary_case(name, path, data):
    x = data.draw(tensors(oracle.POINTS))
    _binary_case(
        name, path, x, data.draw(st.sampled_from(["first", "split"])), data.draw(st.integers(0, 99))
    )


@pytest.mark.parametrize("name", list(BINARY))
@pytest.mark.parametrize("path", PATHS)
@FAST
@given(data=st.data())
def test_fuzz_binary(name, path, data):
    _draw_binary_case(name, path, data)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BINARY))
@pytest.mark.parametrize("path", PATHS)
@SLOW
@given(data=st.data())
def test_fuzz_binary_slow(name, path, data):
    _draw_binary_case(name, path, data)


# --------------------------------------------------------------------------------------
# selections and pooling
# --------------------------------------------------------------------------------------

# name -> (policy name, fn(x) -> values, dim for the oracle (None: all), layouts)
TIES = {
    "sort": ("sort", lambda x: torch.sort(x, -1).values, -1, ["0d", "1d", "2d", "transposed"]),
    "sort/desc": ("sort", lambda x: x.sort(dim=-1, descending=True)[0], -1, ["1d", "2d"]),
    "topk": ("topk", lambda x: torch.topk(x, 2, dim=-1).values, -1, ["1d", "2d", "transposed"]),
    "max/dim": ("max", lambda x: torch.max(x, -1, keepdim=True).values, -1, ["1d", "2d"]),
    "max/full": ("max", lambda x: torch.max(x).reshape(1), None, ["0d", "1d", "2d"]),
    "amax": ("amax", lambda x: torch.amax(x, -1, keepdim=True), -1, ["1d", "2d", "transposed"]),
    "median": ("median", lambda x: torch.median(x, -1, keepdim=True).values, -1, ["1d", "2d"]),
    "kthvalue": (
        "kthvalue",
        lambda x: torch.kthvalue(x, 2, -1, keepdim=True).values,
        -1,
        ["1d", "2d"],
    ),
    "max_pool2d/k2": (
        "max_pool2d",
        lambda x: F.max_pool2d(x, 2),
        "pool:2:2:0",
        ["channels_last", "4d"],
    ),
    "max_pool1d/k2": ("max_pool1d", lambda x: F.max_pool1d(x.flatten(2), 2), "pool1d", ["4d"]),
    "max_pool2d/k3p1": (
        "max_pool2d",
        lambda x: torch.nn.MaxPool2d(3, stride=1, padding=1)(x),
        "pool:3:1:1",
        ["4d"],
    ),
}
TIE_POINTS = [0.0, -0.0, 1.0, -1.0, 2.0]
TIE_CASES = [(n, s, p) for n in TIES for s in TIE_STYLES for p in PATHS]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6, torch.float64: 1e-12}


def _tie_expected(name, x, values, gu, rule):
    _, _, dim, _ = TIES[name]
    if dim == "pool1d":  # a [N, C, 1, L] image with (1, 2) windows
        x4, v4, g4 = (t.reshape(*t.shape[:2], 1, -1) for t in (x, values, gu))
        ours, touched = oracle.pool2d_expected(x4, v4, g4, 2, 2, 0, rule, kh=1)
        return ours.reshape(x.shape), touched.reshape(x.shape)
    if isinstance(dim, str):
        _, k, s, p = dim.split(":")
        return oracle.pool2d_expected(x, values, gu, int(k), int(s), int(p), rule)
    if name == "max/full":
        return oracle.selection_expected(x, values, gu, None, rule)
    if x.dim() == 0:
        return oracle.selection_expected(x.reshape(1), values.reshape(1), gu.reshape(1), -1, rule)
    return oracle.selection_expected(x, values, gu, dim, rule)


def _tie_case(name, style, path, x, rule):
    policy_name, fn, _, _ = TIES[name]
    with torch.no_grad():
        values = fn(x)
    g = _ints_like(values, -4, 5, 1)
    w = _ints_like(values, 1, 4, 2)
    err0, out0, grad0 = run_style(style, fn, None, x, g, w, None, path)
    err1, out1, grad1 = run_style(style, fn, None, x, g, w, {policy_name: rule}, path)
    if err1 is not None:  # loud: as PyTorch, or kinkgrad's own message on a modified input
        own = "kinkgrad" in str(err1) or "modified by an inplace operation" in str(err1)
        assert err0 is not None or (style == "input_mutated" and own), err1
        return
    gu = upstream_at_op(style, g, w, values.shape)
    if err0 is not None:  # kinkgrad computed a gradient where PyTorch refused: it must be right
        err0, out0, grad0 = reference(fn, x, g, w, style, path)
    assert same_bits(out0, out1), "forward must be PyTorch's, bit for bit"
    assert out0.stride() == out1.stride(), "and in PyTorch's memory format"
    if x.numel() == 0:
        return
    ours, touched = _tie_expected(name, x, values, gu, rule)
    if x.dim() == 0:
        ours, touched = ours.reshape(()), touched.reshape(())
    expected = torch.where(touched, ours.to(grad0.dtype), grad0)
    tol = TOL[x.dtype] if rule == "split" else 0.0
    assert same_values(grad1, expected, tol), (x, grad1, expected)


@st.composite
def tie_tensors(draw, name):
    layout = draw(st.sampled_from(TIES[name][3]))
    if layout == "4d":
        layout = "channels_last" if draw(st.booleans()) else "4d"
    if layout == "4d":
        t = draw(tensors(TIE_POINTS, nd="channels_last"))
        return t.contiguous()
    return draw(tensors(TIE_POINTS, nd=layout, min_numel=2))


def _draw_tie_case(name, style, path, data):
    x = data.draw(tie_tensors(name))
    _tie_case(name, style, path, x, data.draw(st.sampled_from(["first", "split"])))


@pytest.mark.parametrize("name,style,path", TIE_CASES)
@FAST
@given(data=st.data())
def test_fuzz_ties(name, style, path, data):
    _draw_tie_case(name, style, path, data)


@pytest.mark.slow
@pytest.mark.parametrize("name,style,path", TIE_CASES)
@SLOW
@given(data=st.data())
def test_fuzz_ties_slow(name, style, path, data):
    _draw_tie_case(name, style, path, data)
