"""kinkgrad.watch: exact counts on constructed inputs, a reference count for every
catalog op, attribution to steps and module paths, bit-for-bit invariance, results
(records, summary, files, plot, table, CLI) and bad input.

Every counting test runs twice: with the CPU pre-check (one reduction decides whether
anything can count) and with the device path accelerators use (no read-back). With a
CUDA device, two more tests check that no op synchronises the host and that counts and
gradients match the CPU's.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kinkgrad as kg
from kinkgrad.catalog import catalog
from kinkgrad.intercept import _DEPTH
from kinkgrad.policy import STATE
from tests.op_cases import ALL_NAMES, BINARY, ELEMENTWISE, JUMP, POOL, SELECTION, kink_points

watch_count = importlib.import_module("kinkgrad.watch_count")


@pytest.fixture(params=[True, False], ids=["cpu-precheck", "device-path"])
def path(request, monkeypatch):
    monkeypatch.setattr(watch_count, "CPU_PRECHECK", request.param)
    return request.param


class Fn(nn.Module):
    """A module around a function: calls inside count for "(root)"."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def totals(w: kg.Watcher) -> dict:
    return w.summary().total


def only(w: kg.Watcher) -> dict:
    recs = w.records()
    assert len(recs) == 1, recs
    return recs[0]


# --------------------------------------------------------------------------------------
# Exact counts on constructed inputs
# --------------------------------------------------------------------------------------


def test_relu_known_zeros_samples_and_effective(path):
    x = torch.tensor(
        [[0.0, 1.0, -2.0, 0.0], [3.0, -1.0, 2.0, 5.0], [-0.0, 0.0, 4.0, 0.0]],
        requires_grad=True,
    )
    # Upstream gradient is zero at (0, 0) and (2, 3): those hits are exact, not effective.
    g = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    model = nn.Sequential(nn.ReLU())
    with kg.watch(model) as w:
        (model(x) * g).sum().backward()
    r = only(w)
    assert (r["module"], r["op"], r["dtype"], r["step"]) == ("0", "relu", "float32", 0)
    assert r["calls"] == 1 and r["elements"] == 12 and r["sites"] == 12
    assert r["exact"] == 5  # 0.0 twice in row 0, -0.0, 0.0, 0.0 in row 2
    assert r["effective"] == 3
    assert r["samples"] == 2  # rows 0 and 2
    assert r["near"] == 5  # nothing else within 4 eps of 0 at magnitude 5
    assert r["subnormal"] == 0 and r["nonfinite"] == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.ReLU(inplace=True),
        lambda: Fn(lambda x: x.relu_()),
        lambda: Fn(lambda x: F.relu(x, inplace=True)),
        lambda: Fn(lambda x: torch.relu_(x)),
    ],
    ids=["nn.ReLU(inplace)", "relu_", "F.relu(inplace)", "torch.relu_"],
)
def test_inplace_relu_counts_its_input(make, path):
    base = torch.tensor([[0.0, -1.0, 0.0], [2.0, 0.0, -3.0]], requires_grad=True)
    model = make()
    with kg.watch(model) as w:
        y = model(base * 1)  # in-place on a non-leaf
        y.sum().backward()
    t = totals(w)
    assert t["exact"] == 3 and t["samples"] == 2
    # In-place: the input is overwritten by zeros (relu(-1) = 0), yet only the three
    # true zeros count; the upstream gradient is 1 everywhere.
    assert t["effective"] == 3


def test_subnormal_nonfinite_and_negative_zero(path):
    tiny32 = torch.finfo(torch.float32).tiny
    x = torch.tensor([-0.0, 1e-40, -1e-42, tiny32, math.nan, math.inf, -math.inf, 2.0])
    with kg.watch(nn.Identity()) as w:
        torch.relu(x)
    r = only(w)
    assert r["module"] == "(outside)"
    assert r["exact"] == 1  # -0.0; NaN is never on a kink
    assert r["subnormal"] == 2  # 1e-40 and -1e-42; tiny itself is normal
    assert r["nonfinite"] == 3
    # Magnitude 2 (the largest finite input): tol = 4 * eps * 2 ~ 1e-6 catches the
    # subnormals and tiny, not 2.
    assert r["near"] == 4
    assert r["samples"] == 1  # 1-d input: every element is its own row


@pytest.mark.parametrize(
    "dtype,sub", [(torch.float16, 1e-6), (torch.bfloat16, 1e-39), (torch.float64, 1e-310)]
)
def test_subnormal_per_dtype(dtype, sub, path):
    x = torch.tensor([sub, -sub, 0.0, 1.0], dtype=dtype)
    assert x[0] != 0
    with kg.watch(nn.Identity()) as w:
        torch.abs(x)
    r = only(w)
    assert (r["dtype"], r["exact"], r["subnormal"]) == (str(dtype)[6:], 1, 2)


def test_max_pool_constant_image_ties(path):
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.MaxPool2d(2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x = torch.full((3, 1, 4, 6), 2.5)  # constant image: every 2x2 window is a 4-way tie
    with kg.watch(model) as w:
        model(x).sum().backward()
    r = only(w)
    assert (r["module"], r["op"]) == ("1", "max_pool2d")
    assert r["sites"] == 3 * 2 * 3 and r["exact"] == 18 and r["effective"] == 18
    assert r["samples"] == 3 and r["near"] == 18
    # Distinct values: no tie, and nothing near at this magnitude.
    x = torch.arange(3 * 24, dtype=torch.float32).reshape(3, 1, 4, 6)
    with kg.watch(model) as w:
        model(x)
    assert totals(w)["exact"] == 0 and totals(w)["near"] == 0


def test_max_pool_near_ties_and_nan(path):
    x = torch.tensor([[[[1.0, 1.001, 5.0, 4.0], [0.0, 0.5, 3.0, math.nan]]]])
    with kg.watch(nn.Identity(), near=0.01) as w:
        F.max_pool2d(x, 2)
    r = only(w)
    assert r["sites"] == 2 and r["exact"] == 0 and r["near"] == 1 and r["nonfinite"] == 1


def test_sort_along_dim0_marks_the_right_slots(path):
    # Column 0 holds a tie (1, 1); column 1 none. Only slot (1, 0) gets a gradient.
    x = torch.tensor([[1.0, 5.0], [1.0, 6.0], [2.0, 7.0]], requires_grad=True)
    g = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    with kg.watch(nn.Identity()) as w:
        (torch.sort(x, 0).values * g).sum().backward()
    r = only(w)
    assert r["exact"] == 2 and r["effective"] == 1 and r["sites"] == 6


def test_full_reduction_and_binary_ties(path):
    a = torch.tensor([[3.0, 1.0], [3.0, 2.0]], requires_grad=True)
    b = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    with kg.watch(nn.Identity()) as w:
        (torch.max(a) + torch.maximum(a, b).sum()).backward()
    recs = {r["op"]: r for r in w.records()}
    assert recs["max"]["exact"] == 1 and recs["max"]["sites"] == 1
    assert recs["max"]["effective"] == 1
    assert recs["maximum"]["exact"] == 2 and recs["maximum"]["samples"] == 2


def test_clamp_tensor_bounds_and_jumps(path):
    x = torch.tensor([0.0, 1.0, 2.5, -1.0, 3.0])
    lo = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    with kg.watch(nn.Identity()) as w:
        torch.clamp(x, min=lo)
        torch.round(x)
        torch.floor(x)
        F.hardshrink(x, 1.0)
    recs = {r["op"]: r for r in w.records()}
    assert recs["clamp"]["exact"] == 1
    assert recs["round"]["exact"] == 1  # 2.5
    assert recs["floor"]["exact"] == 4  # every finite integer
    assert recs["hardshrink"]["exact"] == 2  # |x| == 1


# --------------------------------------------------------------------------------------
# Near hits
# --------------------------------------------------------------------------------------


def test_near_default_scales_with_magnitude(path):
    eps = torch.finfo(torch.float32).eps
    x = torch.tensor([0.0, 1e-7, -2e-7, 1e-3, 1.0])  # tol = 4 * eps * 1 = 4.8e-7

    def counts(fn, t):
        with kg.watch(nn.Identity()) as w:
            fn(t)
        r = only(w)
        return r["exact"], r["near"]

    assert counts(torch.relu, x) == (1, 3)
    assert counts(torch.relu, x * 1000) == (1, 3)  # same relative position: same count
    assert counts(F.relu6, torch.tensor([6.0, 6.0 + 8 * eps, 5.0])) == (1, 2)  # 4 eps * 6


def test_near_absolute(path):
    x = torch.tensor([0.0, 1e-7, -2e-7, 1e-3, 1.0])
    with kg.watch(nn.Identity(), near=1e-2) as w:
        torch.relu(x)
    assert only(w)["near"] == 4
    with kg.watch(nn.Identity(), near=0) as w:
        torch.relu(x)
    assert only(w)["near"] == 1


def test_near_ties_selection(path):
    x = torch.tensor([[1.0, 1.05, 0.0], [2.0, 2.0, 0.0], [3.0, 0.0, -1.0]])
    with kg.watch(nn.Identity(), near=0.1) as w:
        torch.amax(x, 1)
    r = only(w)
    assert (r["exact"], r["near"]) == (1, 2)


# --------------------------------------------------------------------------------------
# Every catalog op: the watcher's count = the catalog's hits = an independent count
# --------------------------------------------------------------------------------------

SPECIAL = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 1.5, 2.0, 2.5, -3.0, 3.0, 6.0, 1e-40, math.nan]
values = st.one_of(st.sampled_from(SPECIAL), st.sampled_from([math.inf, -math.inf, 0.6, -4.0]))


class CatalogCount:
    """A minimal watcher: counts `OpSpec.hits` directly, and keeps each tie op's input,
    parameters and values for the independent reference."""

    def __init__(self):
        self.exact: dict[str, int] = {}
        self.ties: list[tuple] = []

    def before(self, spec, call):
        if spec.kind != "tie":
            n = int(spec.hits(call).sum())
            self.exact[spec.name] = self.exact.get(spec.name, 0) + n

    def after(self, spec, call, out):
        if spec.kind == "tie":
            n = int(spec.hits(call, out).sum())
            self.exact[spec.name] = self.exact.get(spec.name, 0) + n
            values = out[0] if isinstance(out, tuple) else out
            self.ties.append((spec, call.inputs[0].detach(), dict(call.params), values.detach()))


def _within(d: float, tol: float) -> bool:
    return not math.isnan(d) and d <= tol


def ref_elementwise(name: str, i: int, x: list[float], tol: float) -> tuple[int, int]:
    pts = [p for p, _, _ in kink_points(name, i)]
    exact = sum(any(v == p for p in pts) for v in x)
    near = sum(any(_within(abs(v - p), tol) for p in pts) for v in x)
    return exact, near


def ref_jump(name: str, x: list[float], tol: float) -> tuple[int, int]:
    def dist(v: float) -> float:
        if math.isnan(v) or math.isinf(v):
            return math.inf
        if name in ("sign", "heaviside"):
            return abs(v)
        if name in ("floor", "ceil"):
            return abs(v - round(v))
        if name == "trunc":
            return min(abs(v - k) for k in (math.floor(v), math.ceil(v), -1, 1) if k != 0)
        if name == "round":
            return abs(v - (math.floor(v) + 0.5))
        if name == "hardshrink":
            return abs(abs(v) - 0.5)
        return abs(v - 1.0)  # threshold at 1

    return sum(dist(v) == 0 for v in x), sum(dist(v) <= tol for v in x)


def _tie(group: list[float], v: float, tol: float) -> bool:
    """Another element of the group equals (is within tol of) the selected value v."""
    return not math.isnan(v) and sum(e == v or _within(abs(e - v), tol) for e in group) > 1


def ref_selection(name, x, params, values, tol) -> tuple[int, int, list[float]]:
    """Rows of the reduced dims, one list of output slots each, by plain indexing."""
    dim = params.get("dim")
    if dim is None and name in ("sort", "topk", "kthvalue"):
        dim = -1
    if dim is None or dim == () or x.dim() == 0:
        rows, slots = [x.flatten().tolist()], [values.flatten().tolist()]
    else:
        dims = sorted(d % x.dim() for d in ([dim] if isinstance(dim, int) else dim))
        last = list(range(x.dim() - len(dims), x.dim()))
        X = x.movedim(dims, last).reshape(-1, math.prod(x.shape[d] for d in dims))
        if name in ("sort", "topk"):
            V = values.movedim(dims[0], -1).reshape(X.shape[0], -1)
        else:
            V = values.reshape(X.shape[0], -1)
        rows, slots = X.tolist(), V.tolist()
    pairs = [(r, v) for r, vs in zip(rows, slots, strict=True) for v in vs]
    exact = sum(_tie(r, v, 0.0) for r, v in pairs)
    near = sum(_tie(r, v, tol) for r, v in pairs)
    return exact, near, [e for r in rows for e in r]


def _windows(n: int, spec) -> list[list[int]]:
    kind, a, b, c = spec
    if kind == "adaptive":
        return [list(range(j * n // a, -(-(j + 1) * n // a))) for j in range(a)]
    k, s, p = a, b, c
    outs = (n + 2 * p - k) // s + 1
    return [[q for q in range(j * s - p, j * s - p + k) if 0 <= q < n] for j in range(outs)]


def ref_pool(spec, x, params, tol) -> tuple[int, int]:
    """Windows enumerated by plain indexing from the call's parameters."""
    nd = spec.family.nd
    tup = lambda v, d: (v,) * nd if isinstance(v, int) else tuple(v) if v else d
    if spec.family.adaptive:
        geo = [("adaptive", o, 0, 0) for o in tup(params["output_size"], None)]
    else:
        assert tup(params.get("dilation", 1), (1,) * nd) == (1,) * nd
        assert not params.get("ceil_mode")
        k = tup(params["kernel_size"], None)
        s = tup(params.get("stride"), k)
        p = tup(params.get("padding", 0), (0,) * nd)
        geo = [("window", k[d], s[d], p[d]) for d in range(nd)]
    spatial = x.shape[-nd:]
    per_dim = [_windows(n, g) for n, g in zip(spatial, geo, strict=True)]
    exact = near = 0
    for plane in x.reshape(-1, *spatial):
        for combo in itertools.product(*per_dim):
            win = [float(plane[idx]) for idx in itertools.product(*combo)]
            m = math.nan if any(math.isnan(e) for e in win) else max(win)
            exact += _tie(win, m, 0.0)
            near += _tie(win, m, tol)
    return exact, near


def _cases():
    for name in sorted(ALL_NAMES):
        for group, kind in (
            (ELEMENTWISE, "elementwise"),
            (BINARY, "binary"),
            (SELECTION, "selection"),
            (POOL, "pool"),
            (JUMP, "jump"),
        ):
            for i, fn in enumerate(group.get(name, [])):
                yield pytest.param(name, kind, i, fn, id=f"{name}-{kind}-{i}")


def _shape(kind: str, name: str, i: int) -> tuple[int, ...]:
    if kind == "pool":
        return {"max_pool1d": (6,), "adaptive_max_pool1d": (7,)}.get(name, (4, 4))
    if kind == "selection":
        return (3, 4)
    return (2, 5)


def test_every_catalog_op_is_covered():
    assert {s.name for s in catalog()} <= ALL_NAMES | {"max_pool1d"}


_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
_DTYPES = st.sampled_from([torch.float32, torch.float64])


@pytest.mark.parametrize("name,kind,i,fn", list(_cases()))
@settings(max_examples=8, deadline=None, suppress_health_check=_HEALTH)
@given(data=st.data(), dtype=_DTYPES)
def test_counts_match_catalog_and_reference(name, kind, i, fn, data, dtype, path):
    _check_counts(name, kind, i, fn, data, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("name,kind,i,fn", list(_cases()))
@settings(max_examples=200, deadline=None, suppress_health_check=_HEALTH)
@given(data=st.data(), dtype=_DTYPES)
def test_counts_match_catalog_and_reference_long(name, kind, i, fn, data, dtype, path):
    _check_counts(name, kind, i, fn, data, dtype)


def _check_counts(name, kind, i, fn, data, dtype):
    shape = _shape(kind, name, i)
    n = math.prod(shape)
    x = torch.tensor(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=dtype)
    x = x.reshape(shape)
    y = torch.tensor(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=dtype)
    y = y.reshape(shape)
    tol = 0.3  # no two values (or value and kink) lie exactly 0.3 apart: no boundary case
    ref_counter = CatalogCount()
    model = Fn((lambda a, b: fn(a, b)) if kind in ("elementwise", "binary") else fn)
    args = (x, y) if kind in ("elementwise", "binary") else (x,)
    with kg.watch(model, near=tol) as w:
        STATE.watchers.append(ref_counter)
        try:
            model(*args)
        finally:
            STATE.watchers.remove(ref_counter)
    t = totals(w)
    assert t["exact"] == ref_counter.exact.get(name, 0), (x, t)
    flat = x.flatten().tolist() + (y.flatten().tolist() if kind == "binary" else [])
    if kind == "elementwise":
        exact, near = ref_elementwise(name, i, x.flatten().tolist(), tol)
    elif kind == "binary":
        exact = int((x == y).sum())
        near = int(((x - y).abs() <= tol).sum())
    elif kind == "jump":
        exact, near = ref_jump(name, x.flatten().tolist(), tol)
    else:
        ((spec, inp, params, vals),) = ref_counter.ties
        flat = inp.flatten().tolist()
        if kind == "selection":
            exact, near, flat = ref_selection(name, inp, params, vals, tol)
        else:
            exact, near = ref_pool(spec, inp, params, tol)
    assert (t["exact"], t["near"]) == (exact, near), (x.tolist(), t)
    tiny = torch.finfo(dtype).tiny
    assert t["nonfinite"] == sum(not math.isfinite(v) for v in flat)
    assert t["subnormal"] == sum(v != 0 and abs(v) < tiny for v in flat)


def test_catalog_ties_next_to_nan():
    x = torch.tensor([[0.0, 0.0, math.nan, math.nan]])
    counter = CatalogCount()
    with kg.watch(nn.Identity()) as w:
        STATE.watchers.append(counter)
        try:
            torch.kthvalue(x, 2, 1)
        finally:
            STATE.watchers.remove(counter)
    assert totals(w)["exact"] == 1  # the watcher: 0 is the 2nd smallest and occurs twice
    assert counter.exact["kthvalue"] == 1  # the catalog says 0


# --------------------------------------------------------------------------------------
# Steps and module paths
# --------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.features(x)
        h = torch.clamp(h, min=0.0)  # functional, in the root's own forward
        return self.head(h)


def _zero_net() -> Net:
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    return net


def test_module_paths_and_steps(path):
    net = _zero_net()
    x = torch.ones(5, 3)
    with kg.watch(net) as w:
        for _ in range(3):
            out = net(x)
            torch.relu(out).sum().backward()  # outside any forward of net: "(outside)"
    recs = w.records()
    assert [(r["step"], r["module"], r["op"]) for r in recs] == [
        (s, m, op)
        for s in range(3)
        for m, op in (("(root)", "clamp"), ("features.1", "relu"), ("(outside)", "relu"))
    ]
    assert all(r["exact"] == r["sites"] for r in recs)  # all-zero weights: all on kinks
    s = w.summary()
    assert [(r["module"], r["steps"], r["calls"]) for r in s.rows] == [
        ("(root)", 3, 3),
        ("features.1", 3, 3),
        ("(outside)", 3, 3),
    ]
    assert s.total["exact"] == 3 * (20 + 20 + 10) and s.steps == 3


def test_manual_steps():
    net = _zero_net()
    x = torch.ones(2, 3)
    with kg.watch(net) as w:
        net(x)
        net(x)  # auto: step 1
        assert w.step() == 2  # from here on, manual
        net(x)
        net(x)
        w.step()
        net(x)
    assert sorted({r["step"] for r in w.records()}) == [0, 1, 2, 3]
    assert [r["calls"] for r in w.records() if r["op"] == "relu"] == [1, 1, 2, 1]
    with kg.watch(net, step="manual") as w:
        net(x)
        net(x)
    assert {r["step"] for r in w.records()} == {0}


def test_effective_counted_when_backward_runs_later():
    x = torch.zeros(4, 3, requires_grad=True)
    with kg.watch(nn.Identity()) as w:
        y = torch.relu(x)
    assert totals(w)["effective"] == 0
    y.sum().backward()
    assert totals(w)["effective"] == 12


def test_reentry_accumulates_and_many_calls_fold(path):
    x = torch.zeros(3)
    w = kg.watch(nn.Identity())
    for _ in range(2):
        with w:
            for _ in range(200):  # > one fold block of 256
                torch.relu(x)
    assert totals(w)["calls"] == 400 and totals(w)["exact"] == 1200
    with w, pytest.raises(RuntimeError, match="already active"):
        w.__enter__()


def test_exception_inside_block_cleans_up():
    depth = _DEPTH.count
    with pytest.raises(ZeroDivisionError), kg.watch(nn.ReLU()):
        torch.relu(torch.zeros(2))
        raise ZeroDivisionError
    assert STATE.watchers == [] and _DEPTH.count == depth
    m = nn.ReLU()
    assert m(torch.zeros(1)).shape == (1,)  # no hooks left behind


# --------------------------------------------------------------------------------------
# The watcher never changes values or gradients
# --------------------------------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h = self.pool(self.act(self.conv(x)))
        h = torch.clamp(h, max=0.5) + torch.abs(h).sort(dim=1).values
        return self.fc(F.hardtanh(h.flatten(1)))


def _grads(policy: dict | None, watched: bool, x: torch.Tensor):
    torch.manual_seed(0)
    model = Mixed().to(x.device)
    with torch.no_grad():
        model.conv.weight[0].zero_()  # channel 0 sits on kinks and ties
    ctx = kg.policy(**policy) if policy else contextlib.nullcontext()
    if watched:
        with kg.watch(model), ctx:
            out = model(x)
            loss = out.square().sum()
        loss.backward()
    else:
        with ctx:
            out = model(x)
            loss = out.square().sum()
        loss.backward()
    return [out.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    "policy", [None, {"relu": 1.0}, {"relu": 1.0, "max_pool2d": "split", "clamp": 0.5}]
)
def test_bit_for_bit(policy, path):
    x = torch.randn(4, 1, 8, 8)
    x[:, :, :2] = 0.0
    plain = _grads(policy, False, x)
    watched = _grads(policy, True, x)
    for a, b in zip(plain, watched, strict=True):
        assert torch.equal(a, b)


def test_watch_with_policy_counts_the_same():
    x = torch.zeros(3, 4, requires_grad=True)
    with kg.watch(nn.Identity()) as w1:
        torch.relu(x).sum().backward()
    with kg.watch(nn.Identity()) as w2, kg.policy(relu=1.0):
        torch.relu(x).sum().backward()
    assert totals(w1) == totals(w2)
    assert x.grad.sum() == 12  # the policy still applied: relu'(0) = 1


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


def _watched_net():
    net = _zero_net()
    with kg.watch(net) as w:
        for _ in range(4):
            net(torch.ones(5, 3)).sum().backward()
    return w


def test_save_load_roundtrip(tmp_path):
    from kinkgrad.watch_report import load

    w = _watched_net()
    for suffix in (".jsonl", ".csv"):
        p = w.save(tmp_path / f"sub/run{suffix}")
        assert load(p) == w.records()
    assert sorted(os.listdir(tmp_path / "sub")) == ["run.csv", "run.jsonl"]  # no temp files
    line = (tmp_path / "sub/run.jsonl").read_text().splitlines()[0]
    assert list(json.loads(line))[:4] == ["step", "module", "op", "dtype"]
    with pytest.raises(ValueError, match="suffix"):
        w.save(tmp_path / "run.txt")


def test_table_print_and_cli(tmp_path, capsys):
    from kinkgrad.cli import main

    w = _watched_net()
    text = str(w)
    assert "features.1" in text and "relu" in text and "total" in text
    p = w.save(tmp_path / "run.jsonl")
    assert main(["watch-summary", str(p), "--steps"]) == 0
    out = capsys.readouterr().out
    assert "features.1" in out and "clamp" in out and "per step" in out
    assert main(["watch-summary", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_plot(tmp_path):
    w = _watched_net()
    p = w.plot(tmp_path / "hits.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = kg.watch(nn.Linear(1, 1)).plot(tmp_path / "empty.png")
    assert empty.stat().st_size > 0


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["model", torch.zeros(2), lambda x: x, None])
def test_not_a_module(bad):
    with pytest.raises(TypeError, match="nn.Module"):
        kg.watch(bad)


@pytest.mark.parametrize("near", [-1.0, math.nan, math.inf, -1e-30])
def test_bad_near(near):
    with pytest.raises(ValueError, match="near"):
        kg.watch(nn.ReLU(), near=near)


def test_bad_near_type_and_step():
    with pytest.raises(TypeError, match="near"):
        kg.watch(nn.ReLU(), near="small")
    with pytest.raises(ValueError, match="step"):
        kg.watch(nn.ReLU(), step="epoch")


def test_empty_summary():
    w = kg.watch(nn.Linear(2, 2))
    with w:
        nn.Linear(2, 2)(torch.ones(1, 2))  # no catalog op
    s = w.summary()
    assert s.rows == [] and not s and s.empty and s.steps == 0
    assert s.total["exact"] == 0 and s.total["calls"] == 0
    assert w.records() == []
    assert "no catalog op calls recorded" in str(w)


def test_a_failing_count_warns_and_training_goes_on(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("synthetic")

    monkeypatch.setattr(watch_count, "elementwise", boom)
    x = torch.zeros(3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="could not count"), kg.watch(nn.Identity()) as w:
        y = torch.relu(x)
        torch.relu(x)
    assert w.errors == {"relu": 2}
    assert torch.equal(y, torch.zeros(3))


# --------------------------------------------------------------------------------------
# Accelerators (skipped without CUDA): no host synchronisation per op, same counts
# --------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_run(device: str, sync_check: bool) -> tuple[list, list]:
    torch.manual_seed(0)
    model = Mixed().to(device)
    with torch.no_grad():
        model.conv.weight[0].zero_()
    x = torch.randn(4, 1, 8, 8)
    x[:, :, :2] = 0.0
    x = x.to(device)
    with kg.watch(model) as w:
        for _ in range(3):
            if sync_check:
                torch.cuda.set_sync_debug_mode("error")
            try:
                loss = model(x).square().sum()
                torch.clamp(loss, max=1e9).backward()
            finally:
                if sync_check:
                    torch.cuda.set_sync_debug_mode("default")
    return w.records(), [p.grad.cpu() for p in model.parameters()]


@cuda
def test_cuda_counts_without_host_sync():
    on_gpu, _ = _cuda_run("cuda", sync_check=True)
    on_cpu, _ = _cuda_run("cpu", sync_check=False)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "near"} for r in recs]
    assert on_gpu and strip(on_gpu) == strip(on_cpu)  # near depends on rounding
    assert sum(r["exact"] for r in on_gpu) > 0 and sum(r["effective"] for r in on_gpu) > 0


@cuda
def test_cuda_bit_for_bit():
    torch.backends.cudnn.deterministic = True
    x = torch.randn(4, 1, 8, 8, device="cuda")
    x[:, :, :2] = 0.0
    for policy in (None, {"relu": 1.0, "max_pool2d": "split"}):
        plain = _grads(policy, False, x)
        watched = _grads(policy, True, x)
        for a, b in zip(plain, watched, strict=True):
            assert torch.equal(a, b)


def test_certified_replays_are_not_new_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].bias.zero_()
    x = torch.zeros(4, 2)  # every hidden pre-activation sits on the kink: a tangent pass runs
    with kg.watch(model) as w:
        for _ in range(3):
            kg.certified_backward(lambda m, b: m(b).sum(), model, x, seed=0)
    assert w.current_step == 2  # three forwards: steps 0, 1, 2


# --------------------------------------------------------------------------------------
# Optimizer steps inside the watched block
# --------------------------------------------------------------------------------------


class _ClampingSGD(torch.optim.SGD):
    """An optimizer whose step calls a catalog op (as Adam's amsgrad calls maximum)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for g in self.param_groups:
            for p in g["params"]:
                p.clamp_(-10.0, 10.0)
        return loss


def _calls_through_mode(fn) -> int:
    """How many torch calls reach kinkgrad's interception mode while `fn` runs."""
    from kinkgrad import intercept

    seen = []
    original = intercept._KinkMode.__torch_function__

    def spy(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return original(self, func, types, args, kwargs)

    intercept._KinkMode.__torch_function__ = spy
    try:
        fn()
    finally:
        intercept._KinkMode.__torch_function__ = original
    return len(seen)


def test_optimizer_step_is_not_intercepted_nor_counted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    opt = _ClampingSGD(model.parameters(), lr=0.1)
    with kg.watch(model) as w:
        model(torch.randn(2, 3)).sum().backward()
        # Only the profiler's record_function around the hooks (enter, exit) is left.
        assert _calls_through_mode(opt.step) == 2
        z = torch.zeros(1)
        assert _calls_through_mode(lambda: torch.relu(z)) == 1  # resumed after the step
    assert {r["op"] for r in w.records()} == {"relu"}  # no clamp from the optimizer


def test_zero_grad_is_not_intercepted_while_watching():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch_zero_grad = torch.optim.Optimizer.zero_grad
    module_zero_grad = torch.nn.Module.zero_grad

    def backward_then_zero_grad():
        model(torch.randn(2, 3)).sum().backward()
        return _calls_through_mode(opt.zero_grad)

    with kg.policy(relu="torch"):  # interception without a watcher: p.grad reads, writes
        assert backward_then_zero_grad() > 4
    with kg.watch(model), kg.watch(model):
        assert backward_then_zero_grad() == 0
        assert all(p.grad is None for p in model.parameters())
        model(torch.randn(2, 3)).sum().backward()
        assert _calls_through_mode(lambda: model.zero_grad(set_to_none=False)) == 0
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
        z = torch.zeros(1)
        assert _calls_through_mode(lambda: torch.relu(z)) == 1  # resumed after it
    assert torch.optim.Optimizer.zero_grad is torch_zero_grad  # unwrapped with the last
    assert torch.nn.Module.zero_grad is module_zero_grad


def test_optimizer_with_closure_or_differentiable_stays_intercepted():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU())
    with torch.no_grad():
        model[0].weight.zero_()  # every ReLU input is exactly 0
    x = torch.ones(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    grads = []

    def closure():
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        grads.append(model[0].weight.grad.clone())
        return loss

    with kg.policy(relu=1.0), kg.watch(model) as w:
        opt.step(closure)  # the closure's forward and backward run inside step()
    assert torch.equal(grads[0], torch.full((2, 2), 3.0))  # the policy applied: 1 * 3 rows
    assert w.summary().total["exact"] == 6
    from kinkgrad import watch_optimizer

    diff = torch.optim.SGD(model.parameters(), lr=0.1, differentiable=True)
    assert not watch_optimizer._plain(diff, (diff,), {})  # recorded by autograd: intercept
    assert watch_optimizer._plain(opt, (opt,), {}) and not watch_optimizer._plain(
        opt, (opt, closure), {}
    )


def test_an_optimizer_step_that_raises_does_not_leave_interception_off():
    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("synthetic")

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    opt = Broken(model.parameters(), lr=0.1)
    x = torch.zeros(1, 2, requires_grad=True)
    with kg.watch(model) as w:
        with pytest.raises(RuntimeError, match="synthetic"):
            opt.step()
        model(torch.ones(1, 2))  # a forward resumes interception
        with kg.policy(relu=1.0):
            torch.relu(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(1, 2))
    assert sum(r["calls"] for r in w.records()) == 2
    with pytest.raises(RuntimeError, match="synthetic"), kg.watch(model):
        opt.step()
    assert torch._C._is_torch_function_enabled()  # the block's exit resumed it
    x.grad = None
    with kg.policy(relu=1.0):
        torch.relu(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(1, 2))


def test_near_hits_counted_on_host_and_device_add_up():
    """The CPU pre-check counts near hits on the host; calls that take the general path
    count them in the device tensor. Both land in the same row, and `step=` sees both."""
    tiny = 1e-9  # within 4 eps * 1.0 of 0: near, not exact
    m = nn.ReLU()
    with kg.watch(m, step="manual") as w:
        m(torch.tensor([tiny, 1.0, -1.0]))  # pre-check: near only, on the host
        m(torch.tensor([0.0, tiny, 1.0]))  # an exact hit: the general path
        m(torch.tensor([tiny, -tiny, 1.0]))  # host again
    r = only(w)
    assert (r["calls"], r["exact"], r["near"]) == (3, 1, 5)
    assert w.records(step=0)[0]["near"] == 5 and w.records(step=1) == []
    assert w.summary().total["near"] == 5


def test_optimizer_hooks_put_back_under_the_same_ids():
    from torch.optim import optimizer as optim_module

    from kinkgrad import watch_optimizer

    def ours():
        return {
            i
            for hooks in (
                optim_module._global_optimizer_pre_hooks,
                optim_module._global_optimizer_post_hooks,
            )
            for i, h in hooks.items()
            if h in (watch_optimizer._pre, watch_optimizer._post)
        }

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = kg.watch(model)
    seen = []
    for _ in range(3):
        with w:
            seen.append(ours())
            model(torch.ones(1, 2)).sum().backward()
            assert _calls_through_mode(opt.step) == 2  # suspended every time
        assert ours() == set()
    assert len(seen[0]) == 2 and seen[0] == seen[1] == seen[2]
    with w, kg.watch(model):  # nested watchers share one pair of hooks
        assert ours() == seen[0]
    assert ours() == set()
