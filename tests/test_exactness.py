"""Forward values bit-identical to PyTorch's; gradients bit-identical off the kinks and
exactly the policy's value on them; policy "torch" identical to plain PyTorch.

Inputs are drawn to contain many exact kinks, ties, -0.0, inf and nan, in float16,
bfloat16, float32 and float64, contiguous and strided, empty and 0-d.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kinkgrad as kg
from kinkgrad.at_kinks import force_lazy
from tests.op_cases import (
    ALL_NAMES,
    BINARY,
    ELEMENTWISE,
    JUMP,
    POOL,
    SELECTION,
    binary_coefs,
    kink_points,
)


@pytest.fixture(autouse=True, scope="module", params=["eager", "lazy"])
def path(request):
    """Every test here runs twice: on the eager CPU path (one reduction decides whether
    any element sits on a kink) and on the lazy accelerator path, forced on CPU."""
    with force_lazy(request.param == "lazy"):
        yield request.param


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 3.0, -3.0, 6.0, 1.5, 2.5]
NONFINITE = [math.inf, -math.inf, math.nan]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN with the same payload, -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


@st.composite
def tensors(draw, min_size=0, max_size=12, nonfinite=True, shape=None):
    """A float tensor full of kinks: values from SPECIAL (and inf/nan) mixed with
    small dyadic numbers, possibly strided, empty or 0-d."""
    dtype = draw(st.sampled_from(DTYPES))
    pool = SPECIAL + (NONFINITE if nonfinite else [])
    value = st.one_of(st.sampled_from(pool), st.integers(-24, 24).map(lambda i: i / 4))
    if shape is None:
        kind = draw(st.sampled_from(["0d", "1d", "2d", "strided"]))
        if kind == "0d":
            shape = ()
        elif kind == "1d":
            shape = (draw(st.integers(min_size, max_size)),)
        else:
            shape = (draw(st.integers(1, 4)), draw(st.integers(max(min_size, 1), 6)))
    n = math.prod(shape)
    vals = draw(st.lists(value, min_size=n, max_size=n))
    t = torch.tensor(vals, dtype=torch.float64).reshape(shape).to(dtype)
    if len(shape) == 2 and draw(st.booleans()):
        t = t.t().contiguous().t()  # non-contiguous strides, same values
    return t


def upstream(shape, dtype, seed=0):
    """Integer-valued upstream gradients: sums of them are exact in every dtype."""
    g = torch.randint(-4, 5, shape, generator=torch.Generator().manual_seed(seed))
    return g.to(dtype)


def run(fn, leaves, policy=None):
    """Output and gradients w.r.t. leaves, under a policy (or plain PyTorch)."""
    leaves = [leaf.detach().clone().requires_grad_(True) for leaf in leaves]
    if policy is None:
        out = fn(*leaves)
    else:
        with kg.policy(**policy):
            out = fn(*leaves)
    if out.numel() == 0:
        return out.detach(), [torch.zeros_like(leaf) for leaf in leaves]
    g = upstream(out.shape, out.dtype)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    grads = [torch.zeros_like(leaf) if gr is None else gr for leaf, gr in zip(leaves, grads)]
    return out.detach(), grads, g


def test_every_catalog_op_has_cases():
    assert {s.name for s in kg.catalog()} == ALL_NAMES


# --------------------------------------------------------------------------------------
# elementwise kink ops
# --------------------------------------------------------------------------------------

KINK_VALUES = [0.0, 1.0, 0.5, 0.25, "torch"]
ELEMENTWISE_CASES = [(n, i) for n, fns in ELEMENTWISE.items() for i in range(len(fns))]


@pytest.mark.parametrize("name,index", ELEMENTWISE_CASES)
@SETTINGS
@given(x=tensors(), a=st.sampled_from(KINK_VALUES))
def test_elementwise(name, index, x, a):
    fn = lambda t: ELEMENTWISE[name][index](t, None)
    plain = run(fn, [x])
    mine = run(fn, [x], {name: a})
    assert same_bits(plain[0], mine[0]), "forward must be PyTorch's, bit for bit"
    if x.numel() == 0:
        return
    g = plain[2]
    expected = plain[1][0]
    if a != "torch":
        xg = x.to(torch.float64)  # kink tests in the input's own values
        for point, dm, dp in kink_points(name, index):
            expected = torch.where(xg == point, g * ((1 - a) * dm + a * dp), expected)
    assert same_bits(mine[1][0], expected)


@pytest.mark.parametrize(
    "name,index", [(n, i) for n, fns in BINARY.items() for i in range(len(fns))]
)
@SETTINGS
@given(data=st.data())
def test_binary(name, index, data):
    x = data.draw(tensors(min_size=1))
    y = data.draw(tensors(shape=tuple(x.shape))).to(x.dtype)
    if data.draw(st.booleans()):  # plenty of exact ties
        y = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5, x, y)
    spec = next(s for s in kg.catalog() if s.name == name)
    values = [0.0, 1.0, 0.5, "torch"] if spec.kind == "kink" else ["first", "split", "torch"]
    value = data.draw(st.sampled_from(values))
    fn = BINARY[name][index]
    plain = run(fn, [x, y])
    mine = run(fn, [x, y], {name: value})
    assert same_bits(plain[0], mine[0])
    g = plain[2]
    ex, ey = plain[1]
    if value != "torch":
        tie = x == y
        if name == "clamp":  # only where the bound binds: tensor bound vs tensor bound
            pass
        cx, cy = binary_coefs(name, index, value)
        ex = torch.where(tie, g * cx, ex)
        ey = torch.where(tie, g * cy, ey)
    assert same_bits(mine[1][0], ex)
    assert same_bits(mine[1][1], ey)


# --------------------------------------------------------------------------------------
# selections and pooling: brute-force references on small inputs
# --------------------------------------------------------------------------------------


def test_selection_rules_by_hand():
    x = torch.tensor([[3.0, 1.0, 3.0, 3.0], [2.0, 5.0, 5.0, 0.0]], requires_grad=True)
    cases = {
        ("max", "first"): [[1, 0, 0, 0], [0, 1, 0, 0]],
        ("max", "split"): [[1 / 3, 0, 1 / 3, 1 / 3], [0, 0.5, 0.5, 0]],
    }
    for (op, rule), want in cases.items():
        with kg.policy(**{op: rule}):
            (g,) = torch.autograd.grad(torch.max(x, 1).values.sum(), x)
        assert torch.equal(g, torch.tensor(want)), (op, rule, g)
    # sort with ties: weights 1..4 on the sorted slots
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with kg.policy(sort="first"):
        (g,) = torch.autograd.grad((torch.sort(x, 1).values * w).sum(), x)
    assert torch.equal(g, torch.tensor([[2.0, 1.0, 3.0, 4.0], [2.0, 3.0, 4.0, 1.0]]))
    with kg.policy(sort="split"):
        (g,) = torch.autograd.grad((torch.sort(x, 1).values * w).sum(), x)
    assert torch.equal(g, torch.tensor([[3.0, 1.0, 3.0, 3.0], [2.0, 3.5, 3.5, 1.0]]))
    # along dim 0 the same, transposed
    with kg.policy(sort="first"):
        (g,) = torch.autograd.grad((torch.sort(x.t(), 0).values * w[:, None]).sum(), x)
    assert torch.equal(g, torch.tensor([[2.0, 1.0, 3.0, 4.0], [2.0, 3.0, 4.0, 1.0]]))
    # topk k=1 at a boundary tie: first takes the lowest index, split shares.
    with kg.policy(topk="split"):
        (g,) = torch.autograd.grad(torch.topk(x, 1, dim=1).values.sum(), x)
    assert torch.equal(g, torch.tensor([[1 / 3, 0, 1 / 3, 1 / 3], [0, 0.5, 0.5, 0]]))


def _selection_reference(x: torch.Tensor, out_fn, g_out: torch.Tensor, rule: str):
    """Brute force: for every output slot find the inputs equal to its value."""
    x = x.detach()
    xg = x.clone().requires_grad_(True)
    out = out_fn(xg)
    # The index map: which input element each output is a copy of, per PyTorch.
    (native,) = torch.autograd.grad(out, xg, g_out)
    return native


@pytest.mark.parametrize(
    "name,index", [(n, i) for n, fns in SELECTION.items() for i in range(len(fns))]
)
@SETTINGS
@given(data=st.data(), rule=st.sampled_from(["first", "split", "torch"]))
def test_selection(name, index, data, rule):
    rows = data.draw(st.integers(1, 3))
    cols = data.draw(st.integers(3, 6))
    x = data.draw(tensors(shape=(rows, cols), nonfinite=False))
    fn = SELECTION[name][index]
    plain = run(fn, [x])
    mine = run(fn, [x], {name: rule})
    assert same_bits(plain[0], mine[0])
    g = plain[2]
    got = mine[1][0]
    if rule == "torch":
        assert same_bits(got, plain[1][0])
        return
    # Total gradient is conserved and lands only on inputs equal to a selected value.
    assert torch.allclose(got.double().sum(), g.double().sum(), rtol=1e-2, atol=1e-2)
    selected = set(plain[0].reshape(-1).double().tolist())
    support = torch.tensor([[v in selected for v in row] for row in x.double().tolist()])
    assert bool((got[~support] == 0).all())
    # Inputs without a tie keep PyTorch's gradient bit for bit.
    untied = (x.unsqueeze(2) == x.unsqueeze(1)).sum(2) == 1
    assert same_bits(got[untied], plain[1][0][untied])
    if rule == "split":  # tied inputs of one value group all get the same share
        for r in range(x.shape[0]):
            for v in set(x[r].tolist()):
                grp = got[r][x[r] == v]
                assert bool((grp == grp[0]).all())


@pytest.mark.parametrize("name,index", [(n, i) for n, fns in POOL.items() for i in range(len(fns))])
@SETTINGS
@given(data=st.data(), rule=st.sampled_from(["first", "split", "torch"]))
def test_pool(name, index, data, rule):
    x = data.draw(tensors(shape=(1, 4, 4), nonfinite=False))
    if data.draw(st.booleans()):
        x = x.round()  # more ties
    fn = POOL[name][index]
    plain = run(fn, [x])
    mine = run(fn, [x], {name: rule})
    assert same_bits(plain[0], mine[0])
    if rule in ("torch", "first"):  # PyTorch already takes the first in scan order
        assert same_bits(mine[1][0], plain[1][0])
    else:
        assert torch.allclose(
            mine[1][0].double().sum(), plain[1][0].double().sum(), rtol=1e-2, atol=1e-2
        )


def test_pool_split_constant_image():
    x = torch.ones(1, 1, 4, 4, requires_grad=True)
    with kg.policy(max_pool2d="split"):
        torch.nn.MaxPool2d(2)(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.25))
    x.grad = None
    torch.nn.MaxPool2d(2)(x).sum().backward()
    assert x.grad.sum() == 4 and x.grad[0, 0, 0, 0] == 1


# --------------------------------------------------------------------------------------
# jumps
# --------------------------------------------------------------------------------------


def _on_jump(name: str, x: torch.Tensor) -> torch.Tensor:
    fin = torch.isfinite(x)
    return {
        "sign": x == 0,
        "heaviside": x == 0,
        "round": ((x - x.floor()) == 0.5) & fin,
        "floor": (x == x.floor()) & fin,
        "ceil": (x == x.floor()) & fin,
        "trunc": (x == x.floor()) & fin & (x != 0),
        "hardshrink": x.abs() == 0.5,
        "threshold": x == 1.0,
    }[name]


@pytest.mark.parametrize("name", sorted(JUMP))
@SETTINGS
@given(x=tensors(min_size=1), rule=st.sampled_from(["zero", "ste"]))
def test_jump(name, x, rule):
    fn = JUMP[name][0]
    mine = run(fn, [x], {name: rule})
    if name == "heaviside":
        plain_out = fn(x)
        native = torch.zeros_like(x)
    else:
        plain = run(fn, [x])
        plain_out, native = plain[0], plain[1][0]
    assert same_bits(plain_out, mine[0])
    if x.numel() == 0:
        return
    g = upstream(mine[0].shape, mine[0].dtype)
    piecewise_constant = name not in ("hardshrink", "threshold")
    if rule == "ste" and piecewise_constant:
        expected = g
    else:
        expected = torch.where(
            _on_jump(name, x), g if rule == "ste" else torch.zeros_like(g), native
        )
    assert same_bits(mine[1][0], expected)


# --------------------------------------------------------------------------------------
# integer and complex tensors pass through untouched
# --------------------------------------------------------------------------------------


def test_integer_and_complex_pass_through():
    i = torch.tensor([-2, 0, 3])
    with kg.policy(relu=1.0, abs=1.0, max="split", sign="ste"):
        assert torch.equal(torch.relu(i), torch.tensor([0, 0, 3]))
        assert torch.equal(torch.max(i), torch.tensor(3))
        c = torch.tensor([1 + 1j, 0j], requires_grad=True)
        a = torch.abs(c)
    a.sum().backward()
    plain = torch.tensor([1 + 1j, 0j], requires_grad=True)
    torch.abs(plain).sum().backward()
    assert torch.equal(c.grad, plain.grad)


def test_amax_over_several_dims():
    x = torch.tensor([[[1.0, 4.0], [4.0, 0.0]], [[2.0, 2.0], [1.0, 2.0]]], requires_grad=True)
    for rule, want in {
        "split": [[[0, 0.5], [0.5, 0]], [[1 / 3, 1 / 3], [0, 1 / 3]]],
        "first": [[[0, 1], [0, 0]], [[1, 0], [0, 0]]],
    }.items():
        with kg.policy(amax=rule):
            (g,) = torch.autograd.grad(torch.amax(x, dim=(1, 2)).sum(), x)
        assert torch.equal(g, torch.tensor(want)), rule


@SETTINGS
@given(x=tensors(shape=(5, 5), nonfinite=False), k=st.sampled_from([(2, 2, 0), (3, 1, 1)]))
def test_pool_split_matches_brute_force(x, k):
    kernel, stride, pad = k
    x = x.double().round()
    xg = x.reshape(1, 1, 5, 5).clone().requires_grad_(True)
    with kg.policy(max_pool2d="split"):
        out = torch.nn.functional.max_pool2d(xg, kernel, stride, pad)
    g = upstream(out.shape, out.dtype)
    (got,) = torch.autograd.grad(out, xg, g)
    want = torch.zeros(5, 5, dtype=torch.float64)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            cells = [
                (r, c)
                for r in range(i * stride - pad, i * stride - pad + kernel)
                for c in range(j * stride - pad, j * stride - pad + kernel)
                if 0 <= r < 5 and 0 <= c < 5
            ]
            m = max(x[r, c] for r, c in cells)
            winners = [(r, c) for r, c in cells if x[r, c] == m]
            for r, c in winners:
                want[r, c] += g[0, 0, i, j] / len(winners)
    assert torch.allclose(got[0, 0], want, rtol=1e-12, atol=1e-12)


def test_ties_next_to_nan_and_along_other_dims():
    x = torch.tensor([[0.0, 0.0, math.nan, math.nan]], requires_grad=True)
    with kg.policy(kthvalue="split"):
        (g,) = torch.autograd.grad(torch.kthvalue(x, 2, 1).values.sum(), x)
    assert torch.equal(g, torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    spec = next(s for s in kg.catalog() if s.name == "sort")
    y = torch.tensor([[1.0, 2.0], [1.0, 3.0], [0.0, 3.0]])  # columns sort to [0,1,1], [2,3,3]
    call = spec.family.bind(torch.sort, (y, 0), {})
    hits = spec.hits(call, torch.sort(y, 0))
    assert torch.equal(hits, torch.tensor([[False, False], [True, True], [True, True]]))
