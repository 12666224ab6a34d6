"""Certified generalized gradients: exact values where plain backprop leaves the Clarke
set, agreement with grad f(x + t d) on networks built to sit on kinks, bit-identity off
the kinks, every catalog op and call style, the training entry point, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import nnls

import kinkgrad as kg

from .op_cases import BINARY, ELEMENTWISE, JUMP, POOL, SELECTION, kink_points

D = torch.float64


def t64(*values):
    return torch.tensor(values, dtype=D, requires_grad=True)


def plain_grads(f, *xs):
    out = f(*xs)
    gs = torch.autograd.grad(out, xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, xs, strict=True)]


def grad_along(f, xs, ds, t=1e-8):
    """grad f(x + t d) by plain PyTorch, no kinkgrad: the independent reference."""
    pts = [(x.detach() + t * d).requires_grad_() for x, d in zip(xs, ds, strict=True)]
    return plain_grads(f, *pts)


def as_tuple(d):
    return d if isinstance(d, tuple) else (d,)


def hull_distance(g, samples):
    # piecewise-constant gradients repeat: keep one of each (a smaller, better-posed NNLS)
    G = torch.unique(torch.stack([s.reshape(-1) for s in samples]), dim=0).T.numpy()
    b = g.reshape(-1).numpy()
    w = 1e3 * (1 + np.abs(G).max())
    lam, _ = nnls(np.vstack([G, w * np.ones((1, G.shape[1]))]), np.concatenate([b, [w]]))
    lam = lam / lam.sum()
    return float(np.linalg.norm(G @ lam - b))


# --------------------------------------------------------------------------------------
# (a) composites where plain backprop leaves the Clarke set: exact values
# --------------------------------------------------------------------------------------

Z = torch.zeros_like

COMPOSITES = [
    # name, f, point, plain PyTorch gradient, certified gradient (f is identically
    # linear near the point, so the generalized gradient is unique)
    (
        "relu(x) - relu(-x) = x",
        lambda x: (torch.relu(x) - torch.relu(-x)).sum(),
        [0.0],
        [0.0],
        [1.0],
    ),
    (
        "maximum(x, 0) - relu(x) = 0",
        lambda x: (torch.maximum(x, Z(x)) - torch.relu(x)).sum(),
        [0.0],
        [0.5],
        [0.0],
    ),
    (
        "clamp(x, min=0) - relu(x) = 0",
        lambda x: (torch.clamp(x, min=0.0) - F.relu(x)).sum(),
        [0.0],
        [1.0],
        [0.0],
    ),
    (
        "hardtanh(x) - clamp(x, -1, 1) = 0",
        lambda x: (F.hardtanh(x) - x.clamp(-1.0, 1.0)).sum(),
        [1.0, -1.0],
        [-1.0, -1.0],
        [0.0, 0.0],
    ),
    (
        "relu(x) - (x + |x|) / 2 = 0",
        lambda x: (torch.relu(x) - (x + x.abs()) / 2).sum(),
        [0.0],
        [-0.5],
        [0.0],
    ),
    (
        "2 relu(x) - x - |x| = 0",
        lambda x: (2 * torch.relu(x) - x - x.abs()).sum(),
        [0.0],
        [-1.0],
        [0.0],
    ),
    (
        "relu6(x) - clamp(x, 0, 6) = 0",
        lambda x: (F.relu6(x) - x.clamp(0.0, 6.0)).sum(),
        [0.0, 6.0],
        [-1.0, -1.0],
        [0.0, 0.0],
    ),
    (
        "max_pool1d(x, 2) - max(x) = 0 (constant)",
        lambda x: F.max_pool1d(x.view(1, 1, 2), 2).sum() - x.max(),
        [1.0, 1.0],
        [0.5, -0.5],
        [0.0, 0.0],
    ),
    (
        "max_pool2d over a constant 4x4 image - window amax = 0",
        lambda x: (
            F.max_pool2d(x.view(1, 1, 4, 4), 2).sum()
            - x.view(2, 2, 2, 2).transpose(1, 2).reshape(4, 4).amax(1).sum()
        ),
        [3.0] * 16,
        [0.75, -0.25, 0.75, -0.25, -0.25, -0.25, -0.25, -0.25] * 2,
        [0.0] * 16,
    ),
    (
        "sort(x)[-1] - max(x) = 0 (ties)",
        lambda x: torch.sort(x).values[-1] - x.max(),
        [2.0, 2.0, 2.0],
        [-1 / 3, -1 / 3, 2 / 3],
        [0.0] * 3,
    ),
    (
        "topk(x, 1) - amax(x) = 0 (ties)",
        lambda x: torch.topk(x, 1).values.sum() - x.amax(),
        [2.0, 2.0, 1.0],
        [0.5, -0.5, 0.0],
        [0.0] * 3,
    ),
    (
        "kthvalue(x, 2) - median(x) = 0 (ties)",
        lambda x: torch.kthvalue(x, 2).values - x.median(),
        [1.0, 1.0, 1.0],
        [2 / 3, -1 / 3, -1 / 3],
        [0.0] * 3,
    ),
    (
        "sort(x).sum() - x.sum() = 0",
        lambda x: torch.sort(x).values.sum() - x.sum(),
        [1.0, 1.0],
        [0.0, 0.0],
        [0.0, 0.0],
    ),
    (
        "min(x) + max(-x) = 0 (ties)",
        lambda x: x.min() + (-x).max(),
        [0.0, 0.0],
        [0.0, 0.0],
        [0.0, 0.0],
    ),
]


@pytest.mark.parametrize("name,f,point,plain,certified", COMPOSITES, ids=[c[0] for c in COMPOSITES])
def test_composites_exact(name, f, point, plain, certified):
    x = t64(*point)
    assert plain_grads(f, x)[0].tolist() == pytest.approx(plain, abs=1e-12)
    r = kg.certified_grad(f, x, seed=0)
    assert r.grad.tolist() == pytest.approx(certified, abs=1e-12)
    assert r.kinks_hit >= 1
    assert r.certified and r.unresolved == 0 and r.jumps_hit == 0


@pytest.mark.parametrize("seed", range(6))
def test_direction_dependent_composites(seed):
    """Where the Clarke set is an interval, the certified gradient is the one-sided
    piece entered along the direction the result reports."""
    x = t64(0.0)
    cases = [
        (
            lambda x: torch.relu(torch.relu(x) - torch.relu(-x)).sum(),
            lambda d: 1.0 if d > 0 else 0.0,
        ),
        (lambda x: x.abs().sum(), lambda d: 1.0 if d > 0 else -1.0),
        (lambda x: (x.clamp(0.0, 1.0) + torch.relu(-x)).sum(), lambda d: 1.0 if d > 0 else -1.0),
        (lambda x: F.leaky_relu(x, 0.25).sum(), lambda d: 1.0 if d > 0 else 0.25),
        (lambda x: F.hardswish(x + 3.0).sum(), lambda d: 1.0 if d > 0 else 1.5),
        (lambda x: (torch.minimum(x, -x) * 2).sum(), lambda d: -2.0 if d > 0 else 2.0),
    ]
    for f, expected in cases:
        r = kg.certified_grad(f, x, seed=seed)
        d = float(r.direction)
        assert r.grad.item() == pytest.approx(expected(d), abs=1e-12)
        assert r.grad.item() == pytest.approx(grad_along(f, [x], [r.direction])[0].item(), abs=1e-6)


def test_sort_with_ties_follows_the_direction():
    w = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    f = lambda x: (torch.sort(x).values * w).sum()
    x = t64(1.0, 1.0, 1.0)
    r = kg.certified_grad(f, x, seed=0)
    order = torch.argsort(r.direction)  # x + t d is sorted as d is
    expected = torch.empty(3, dtype=D)
    expected[order] = w
    assert torch.equal(r.grad, expected)


def test_same_seed_same_result_and_directions_reported():
    f = lambda x: (torch.relu(x) * torch.arange(1.0, 6.0, dtype=D)).sum()
    x = torch.zeros(5, dtype=D, requires_grad=True)
    a, b = kg.certified_grad(f, x, seed=7), kg.certified_grad(f, x, seed=7)
    assert torch.equal(a.grad, b.grad) and torch.equal(a.direction, b.direction)
    assert a.seed == 7 and a.directions_used == 1
    assert torch.equal(a.grad, (a.direction > 0).to(D) * torch.arange(1.0, 6.0, dtype=D))
    c = kg.certified_grad(f, x)  # a fresh seed, reported
    assert isinstance(c.seed, int)
    assert torch.equal(kg.certified_grad(f, x, seed=c.seed).grad, c.grad)


# --------------------------------------------------------------------------------------
# (b) random ReLU / max-pool networks built to sit exactly on kinks (float64)
# --------------------------------------------------------------------------------------


def dyadic(gen, *shape, den=8):
    """Small multiples of 1/den: every product and sum below is exact in float64."""
    return torch.randint(-8, 9, shape, generator=gen).to(D) / den


class KinkyNet(nn.Module):
    """x -> Linear -> max_pool1d(2) -> ReLU -> Linear -> ReLU -> Linear, with biases set
    so that chosen units of chosen samples sit exactly on the ReLU kink and chosen
    pooling windows hold exact ties."""

    def __init__(self, seed: int, x: torch.Tensor, width: int = 8, hidden: int = 6) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        n_in = x.shape[1]
        self.l1 = nn.Linear(n_in, width).to(D)
        self.l2 = nn.Linear(width // 2, hidden).to(D)
        self.l3 = nn.Linear(hidden, 1).to(D)
        with torch.no_grad():
            for lin in (self.l1, self.l2, self.l3):
                lin.weight.copy_(dyadic(gen, *lin.weight.shape))
                lin.bias.copy_(dyadic(gen, *lin.bias.shape))
            # ties: in window (2j, 2j+1) make both units equal for sample j % batch
            for j in range(width // 2):
                s = j % x.shape[0]
                a, b = 2 * j, 2 * j + 1
                self.l1.bias[b] = self.l1.bias[a] + (self.l1.weight[a] - self.l1.weight[b]) @ x[s]
            # kinks: pooled unit 0 sits at 0 for sample 0 (after the tie above)
            z = x[0] @ self.l1.weight[0:2].T + self.l1.bias[0:2]
            shift = z.max()
            self.l1.bias[0:2] -= shift
            # kinks in layer 2: unit k of sample k % batch sits at 0
            h = torch.relu(F.max_pool1d(self.l1(x).unsqueeze(1), 2).squeeze(1))
            for k in range(0, hidden, 2):
                s = k % x.shape[0]
                self.l2.bias[k] = -(self.l2.weight[k] @ h[s])

    def forward(self, x):
        z = F.max_pool1d(self.l1(x).unsqueeze(1), 2).squeeze(1)
        return self.l3(torch.relu(self.l2(torch.relu(z))))


def kinky(seed, batch=3, n_in=5):
    gen = torch.Generator().manual_seed(1000 + seed)
    x = dyadic(gen, batch, n_in, den=4)
    return KinkyNet(seed, x), x


def exact_hits(net, x):
    """Exact zeros at the ReLU inputs and exact ties in the pooling windows."""
    z1 = net.l1(x)
    p = F.max_pool1d(z1.unsqueeze(1), 2).squeeze(1)
    z2 = net.l2(torch.relu(p))
    ties = int((z1[:, 0::2] == z1[:, 1::2]).sum())
    return int((p == 0).sum()) + int((z2 == 0).sum()), ties


@pytest.mark.parametrize("seed", range(8))
def test_kinky_network_input_gradient(seed):
    net, x = kinky(seed)
    zeros, ties = exact_hits(net, x.detach())
    assert zeros >= 2 and ties >= 2  # the construction really sits on kinks
    xr = x.clone().requires_grad_()
    f = lambda x: net(x).sum()
    r = kg.certified_grad(f, xr, seed=seed)
    assert r.kinks_hit >= zeros + ties - 1
    ref = grad_along(f, [xr], [r.direction], t=1e-9)[0]
    torch.testing.assert_close(r.grad, ref, rtol=0, atol=1e-9)
    # ... and it lies in the convex hull of gradients sampled nearby (piecewise constant:
    # each sample is the gradient of one piece touching x)
    gen = torch.Generator().manual_seed(seed)
    samples = [
        grad_along(f, [xr], [torch.randn(x.shape, generator=gen, dtype=D)], 1e-7)[0]
        for _ in range(256)
    ]
    assert hull_distance(r.grad, samples) < 1e-8
    if r.unresolved == 0:
        assert r.certified


@pytest.mark.parametrize("seed", range(6))
def test_kinky_network_parameter_gradient(seed):
    net, x = kinky(seed)
    loss_fn = lambda m, x: m(x).pow(2).sum()
    net.zero_grad()
    step = kg.certified_backward(loss_fn, net, x, seed=seed)
    assert step.kinks_hit >= 2
    names = [n for n, _ in net.named_parameters()]
    got = [p.grad.clone() for p in net.parameters()]
    d = step.direction
    params = {n: p.detach() for n, p in net.named_parameters()}

    def grad_at(t, direction):
        q = {n: (params[n] + t * direction[n]).requires_grad_() for n in names}
        loss = loss_fn(lambda x: torch.func.functional_call(net, q, (x,)), x)
        return torch.autograd.grad(loss, [q[n] for n in names])

    ref = grad_at(1e-9, d)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(256):
        u = {n: torch.randn(params[n].shape, generator=gen, dtype=D) for n in names}
        samples.append(torch.cat([g.reshape(-1) for g in grad_at(1e-8, u)]))
    flat = torch.cat([g.reshape(-1) for g in got])
    assert hull_distance(flat, samples) < 1e-5


def test_kinky_network_plain_backprop_differs():
    """The construction matters: plain backprop leaves the piece on some network."""
    differs = 0
    for seed in range(8):
        net, x = kinky(seed)
        xr = x.clone().requires_grad_()
        f = lambda x, net=net: net(x).sum()
        r = kg.certified_grad(f, xr, seed=seed)
        differs += not torch.equal(plain_grads(f, xr)[0], r.grad)
    assert differs >= 4


# --------------------------------------------------------------------------------------
# every catalog op, every call style (cases shared with the policy tests)
# --------------------------------------------------------------------------------------


def _point_on_kinks(points, n=6):
    vals = [p for p, _, _ in points] + [0.37, -1.3]
    return torch.tensor((vals * n)[:n], dtype=D)


ELEM_CASES = [(n, i) for n, fs in ELEMENTWISE.items() for i in range(len(fs))]


@pytest.mark.parametrize("name,i", ELEM_CASES, ids=[f"{n}-{i}" for n, i in ELEM_CASES])
def test_every_elementwise_op_and_call_style(name, i):
    fn = ELEMENTWISE[name][i]
    x = _point_on_kinks(kink_points(name, i)).requires_grad_()
    w = torch.linspace(0.5, 2.0, x.numel(), dtype=D)
    f = lambda x: (fn(x, x) * w).sum()
    r = kg.certified_grad(f, x, seed=3)
    n_kinks = sum(int((x.detach() == p).sum()) for p, _, _ in kink_points(name, i))
    assert r.kinks_hit == n_kinks and r.certified
    torch.testing.assert_close(r.grad, grad_along(f, [x], [r.direction])[0], rtol=0, atol=1e-7)


BIN_CASES = [(n, i) for n, fs in BINARY.items() for i in range(len(fs))]


@pytest.mark.parametrize("name,i", BIN_CASES, ids=[f"{n}-{i}" for n, i in BIN_CASES])
def test_every_binary_tie(name, i):
    fn = BINARY[name][i]
    x = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=D, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 3.0, 0.5], dtype=D, requires_grad=True)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)
    f = lambda x, y: (fn(x, y) * w).sum()
    r = kg.certified_grad(f, x, y, seed=5)
    assert r.kinks_hit == 3 and r.certified
    ref = grad_along(f, [x, y], list(r.direction))
    for a, b in zip(r.grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


TIE_CASES = [("sel", n, i) for n, fs in SELECTION.items() for i in range(len(fs))] + [
    ("pool", n, i) for n, fs in POOL.items() for i in range(len(fs))
]


@pytest.mark.parametrize("kind,name,i", TIE_CASES, ids=[f"{n}-{i}" for _, n, i in TIE_CASES])
def test_every_tie_op(kind, name, i):
    fn = (SELECTION if kind == "sel" else POOL)[name][i]
    gen = torch.Generator().manual_seed(11)
    x = (torch.randint(0, 2, (4, 6), generator=gen).to(D)).requires_grad_()  # many ties
    w = torch.randn(200, generator=gen, dtype=D)

    def f(x):
        out = fn(x)
        return (out.reshape(-1) * w[: out.numel()]).sum()

    r = kg.certified_grad(f, x, seed=2)
    assert r.kinks_hit > 0 and r.certified
    torch.testing.assert_close(r.grad, grad_along(f, [x], [r.direction])[0], rtol=0, atol=1e-7)


JUMP_CASES = [(n, i) for n, fs in JUMP.items() for i in range(len(fs))]
ON_JUMP = {"sign": 0.0, "heaviside": 0.0, "round": 0.5, "floor": 1.0, "ceil": 1.0, "trunc": 1.0}
ON_JUMP |= {"hardshrink": 0.5, "threshold": 1.0}


@pytest.mark.parametrize("name,i", JUMP_CASES, ids=[f"{n}-{i}" for n, i in JUMP_CASES])
def test_jump_ops_are_never_certified_on_the_jump(name, i):
    fn = JUMP[name][i]
    on = torch.tensor([ON_JUMP[name], 0.3], dtype=D, requires_grad=True)
    r = kg.certified_grad(lambda x: fn(x).sum() + x.sum(), on, seed=0)
    assert not r.certified and r.jumps_hit == 1 and "jump" in str(r)
    off = torch.tensor([0.3, 2.7], dtype=D, requires_grad=True)
    r = kg.certified_grad(lambda x: fn(x).sum() + x.sum(), off, seed=0)
    assert r.certified and r.jumps_hit == 0


# --------------------------------------------------------------------------------------
# (c) off the kinks: bit-identical to plain backprop
# --------------------------------------------------------------------------------------


def test_off_kinks_bit_identical_functions():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    conv = nn.Conv2d(1, 3, 3)
    lin = nn.Linear(27, 5)

    def f(x):
        # (max-pooling *after* a ReLU would tie the zeros of dead windows: kinks)
        h = torch.relu(F.max_pool2d(conv(x), 2))
        z = lin(torch.sort(h.flatten(1), dim=1).values)
        return torch.clamp(z, -0.5, 0.5).abs().sum() + z.amax() + F.hardswish(z).mean()

    r = kg.certified_grad(f, x, seed=0)
    assert r.kinks_hit == 0 and r.directions_used == 0 and r.certified
    assert torch.equal(r.grad, plain_grads(f, x)[0])
    assert torch.equal(r.value, f(x).detach())


def test_off_kinks_bit_identical_training_step():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU6(), nn.Linear(32, 3)
    )
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)
    loss_fn(model, x, y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    step = kg.certified_backward(loss_fn, model, x, y, seed=0)
    assert step.kinks_hit == 0 and step.certified
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, model.parameters(), strict=True))
    assert torch.equal(step.loss, loss_fn(model, x, y).detach())


def test_forward_values_unchanged_at_kinks():
    x = torch.tensor([0.0, -1.0, 2.0], dtype=D, requires_grad=True)
    f = lambda x: (torch.relu(x) * 3 - x.abs() + torch.sort(x.round()).values).sum()
    assert torch.equal(kg.certified_grad(f, x, seed=0).value, f(x).detach())


# --------------------------------------------------------------------------------------
# unresolved kinks, the lexicographic rule, jumps
# --------------------------------------------------------------------------------------


def test_zero_tangent_is_resolved_by_a_further_direction():
    """d1 = (1, 1) leaves relu(x - y) undecided at x = y; the second direction decides,
    as lexicographic differentiation would."""
    x, y = t64(0.0), t64(0.0)
    f = lambda x, y: torch.relu(x - y).sum()
    one = torch.ones(1, dtype=D)
    r = kg.certified_grad(f, x, y, seed=4, direction=(one, one))
    assert r.directions_used == 2 and r.unresolved == 0 and r.certified
    d2 = r.directions[1]
    up = float(d2[0] - d2[1]) > 0
    assert r.grad[0].item() == (1.0 if up else 0.0) and r.grad[1].item() == (-1.0 if up else 0.0)
    # what x + t d1 + t^2 d2 sees
    ref = grad_along(f, [x, y], [one + 1e-3 * d2[0], one + 1e-3 * d2[1]])
    assert [g.item() for g in r.grads] == [g.item() for g in ref]


def test_structurally_undecided_kinks_are_immaterial():
    """relu(x - x) and maximum(x, x): the tangents agree along every direction, so every
    choice gives the same gradient; counted as immaterial, certified."""
    x = t64(0.0, 1.0)
    r = kg.certified_grad(lambda x: torch.relu(x - x).sum() + torch.maximum(x, x).sum(), x, seed=0)
    assert r.immaterial == 4 and r.unresolved == 0 and r.kinks_hit == 4 and r.certified
    assert r.directions_used == kg.certify.MAX_DIRECTIONS  # the second one separates none
    assert "immaterial" in str(r)
    assert r.by_op["maximum"] == {"hits": 2, "unresolved": 0, "immaterial": 2}
    assert torch.equal(r.grad, torch.ones(2, dtype=D))  # either piece gives the same


def test_a_given_direction_proves_nothing_about_immaterial_kinks():
    """With a given first direction (not random) a random one follows; with
    max_directions=1 what the given direction leaves undecided is unresolved."""
    x = t64(0.0, 1.0)
    one = torch.ones(2, dtype=D)
    f = lambda x: torch.relu(x - x).sum()
    r = kg.certified_grad(f, x, seed=0, direction=one)
    assert r.directions_used == 2 and r.immaterial == 2 and r.certified
    r1 = kg.certified_grad(f, x, seed=0, direction=one, max_directions=1)
    assert r1.directions_used == 1 and r1.unresolved == 2 and r1.immaterial == 0
    assert not r1.certified and "undecided" in str(r1)


def test_nan_tangents_leave_kinks_unresolved():
    """A kink whose input tangent is NaN proves nothing: unresolved, not certified."""
    x = t64(0.0, 1.0)
    # sqrt(x)'s tangent at 0 is inf; times 0 gives NaN on relu's input at the kink
    f = lambda x: torch.relu(torch.sqrt(x) * 0.0).sum()
    r = kg.certified_grad(f, x, seed=0)
    assert r.unresolved >= 1 and not r.certified


# --------------------------------------------------------------------------------------
# call styles, policies, attached modules: certification overrides all of them
# --------------------------------------------------------------------------------------


def test_overrides_policies_attached_modules_and_kink_keywords():
    x = torch.zeros(3, requires_grad=True)
    model = kg.attach(nn.Sequential(nn.ReLU()), relu=0.0)
    styles = [
        lambda x: kg.relu(x, kink=0.0) - kg.relu(-x, kink=0.0),
        lambda x: kg.nn.ReLU(kink=0.0)(x) - F.relu(-x),
        lambda x: model(x) - model(-x),
        lambda x: F.relu(x * 1, inplace=True) - (-x).relu_(),
        lambda x: nn.ReLU(inplace=True)(x * 1) - torch.relu(-x),
    ]
    for style in styles:
        with kg.policy(relu=0.0):
            r = kg.certified_grad(lambda x, s=style: s(x).sum(), x, seed=1)
        assert torch.equal(r.grad, torch.ones(3)) and r.kinks_hit == 6
    kg.detach(model)
    with kg.policy(relu=0.0):  # the outer policy is back afterwards
        (torch.relu(x) - torch.relu(-x)).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3))


def test_one_pass_inside_forward_ad():
    """The policy "directional" also works in a user's own forward-AD context."""
    x = torch.zeros(2, requires_grad=True)
    with kg.policy(default="directional"), fwAD.dual_level():
        xd = fwAD.make_dual(x, torch.tensor([1.0, -1.0]))
        y = (torch.relu(xd) - torch.relu(-xd) + torch.relu(xd)).sum()
        assert fwAD.unpack_dual(y).tangent.item() == pytest.approx(1.0)  # 2*1 + (1 - 1) - 0
        y.backward()
    assert x.grad.tolist() == [2.0, 1.0]


def test_directional_policy_without_tangents_is_an_error():
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-mode tangent"):
        with kg.policy(relu="directional"):
            torch.relu(x)
    with kg.policy(relu="directional"):  # no kink: nothing to decide
        torch.relu(x + 1).sum().backward()


# --------------------------------------------------------------------------------------
# training: certified_backward
# --------------------------------------------------------------------------------------


def _net_with_kink(dropout=0.5):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(3, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Dropout(dropout), nn.Linear(6, 2)
    )
    with torch.no_grad():
        m[0].bias.zero_()
    x = torch.randn(5, 3)
    x[0] = 0.0  # sample 0 puts every first-layer unit exactly at 0
    return m, x, torch.tensor([0, 1, 0, 1, 1])


def test_training_step_with_dropout_and_batchnorm():
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)
    m, x, y = _net_with_kink()
    torch.manual_seed(5)
    plain_loss = loss_fn(m, x, y).detach()
    after_plain, stats_plain = torch.rand(3), m[2].running_mean.clone()

    m, x, y = _net_with_kink()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    torch.manual_seed(5)
    step = kg.certified_backward(loss_fn, m, x, y, seed=1)
    assert torch.equal(torch.rand(3), after_plain)  # the RNG stream is undisturbed
    assert torch.equal(m[2].running_mean, stats_plain)  # statistics updated once
    assert torch.equal(step.loss, plain_loss)
    assert step.kinks_hit == 6 and step.certified and step.directions_used == 1
    assert set(step.direction) == {n for n, _ in m.named_parameters()}
    before = m[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, m[0].weight)


def test_training_gradient_matches_the_piece_and_accumulates():
    m, x, y = _net_with_kink(dropout=0.0)
    m.eval()  # batch-norm with running statistics: a function of the parameters alone
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)
    step = kg.certified_backward(loss_fn, m, x, y, seed=3)
    first = [p.grad.clone() for p in m.parameters()]
    names = [n for n, _ in m.named_parameters()]
    q = {
        n: (p.detach() + 1e-7 * step.direction[n]).requires_grad_() for n, p in m.named_parameters()
    }
    out = F.cross_entropy(torch.func.functional_call(m, q, (x,)), y)
    ref = torch.autograd.grad(out, [q[n] for n in names])
    for a, b in zip(first, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    kg.certified_backward(loss_fn, m, x, y, seed=3)  # accumulates like loss.backward()
    for a, p in zip(first, m.parameters(), strict=True):
        torch.testing.assert_close(p.grad, 2 * a)


def test_regulariser_reading_parameters_is_certified():
    """An L1 penalty on weights that sit at 0: the penalty's kink is decided too."""
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    loss_fn = lambda m, x: m(x).sum() + sum(p.abs().sum() for p in m.parameters())
    step = kg.certified_backward(loss_fn, lin, torch.ones(3, 2), seed=0)
    assert step.kinks_hit == 2 and step.certified
    expected = 3.0 + torch.sign(step.direction["weight"])
    assert torch.equal(lin.weight.grad, expected)


def test_nondeterministic_function_is_detected():
    calls = []

    def f(x):
        calls.append(1)
        return torch.relu(x - (len(calls) - 1)).sum()  # a different kink on each call

    with pytest.raises(RuntimeError, match="same values"):
        kg.certified_grad(f, torch.zeros(2, requires_grad=True), seed=0)


def test_replay_is_invisible_to_watchers():
    m, x, y = _net_with_kink(dropout=0.0)
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)
    with kg.watch(m) as w:
        step = kg.certified_backward(loss_fn, m, x, y, seed=0)
        m(x)
    assert step.directions_used == 1  # the forward was replayed once
    records = w.records()
    assert sum(r["exact"] for r in records) == 12  # 6 per counted forward, not 18
    # Steps are counted by module hooks, which also see the replay; kinkgrad.ops.REPLAY
    # tells them it is one (the watcher does not read it yet).


# --------------------------------------------------------------------------------------
# linearization radius and kink crossings
# --------------------------------------------------------------------------------------


def test_linearization_radius_is_exact_for_piecewise_linear_f():
    f = lambda x: (torch.relu(x - 1.0) + (x + 0.5).abs() + torch.maximum(x, -x - 3.0)).sum()
    x = torch.zeros(3, dtype=D)
    d = torch.tensor([0.5, -2.0, 1.0], dtype=D)
    lin = kg.linearization(f, x, direction=d)
    # relu: x_0 = 1 at t = 2, x_2 at t = 1; abs: x_1 = -0.5 at t = 0.25;
    # maximum: x = -x - 3 at x = -1.5: x_1 at t = 0.75
    assert lin.radius == pytest.approx(0.25)
    assert lin.crossings == 3  # within step 1: t = 0.25, 0.75, 1.0
    assert kg.linearization(f, x, direction=d, step=0.5).crossings == 1
    # f is affine in t below the radius
    vals = [float(f(x + t * d)) for t in (0.0, 0.1, 0.2, 0.25)]
    slopes = np.diff(vals) / np.diff([0.0, 0.1, 0.2, 0.25])
    assert np.allclose(slopes, slopes[0])


def test_kink_crossings_of_a_training_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(32, 4)
    loss_fn = lambda m, x: m(x).pow(2).mean()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn(model, x).backward()
    opt.step()
    update = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    now = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # back to the point before the step
        for n, p in model.named_parameters():
            p.copy_(before[n])
    cross = kg.kink_crossings(loss_fn, model, x, direction=update)
    # count independently: sign changes of the first-layer pre-activations over the step
    changed = int(((model[0](x) > 0) != (F.linear(x, now["0.weight"], now["0.bias"]) > 0)).sum())
    assert cross.crossings == changed  # the first layer is affine in its parameters
    assert 0 < cross.radius < 1


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_errors():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        kg.certified_grad(lambda x: torch.relu(x), x)
    with pytest.raises(TypeError, match="tensor"):
        kg.certified_grad(lambda x: 1.0, x)
    with pytest.raises(ValueError, match="does not require grad"):
        kg.certified_grad(lambda x: x.sum(), torch.zeros(3))
    with pytest.raises(TypeError, match="floating"):
        kg.certified_grad(lambda x: x.sum(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        kg.certified_grad(lambda x: x.sum(), torch.tensor([0.0, float("nan")], requires_grad=True))
    with pytest.raises(ValueError, match="inf"):
        kg.certified_grad(lambda x: x.sum(), torch.tensor([float("inf")], requires_grad=True))
    with pytest.raises(TypeError, match="at least one"):
        kg.certified_grad(lambda: torch.zeros(()))
    with pytest.raises(TypeError, match="torch.Tensor"):
        kg.certified_grad(lambda x: x, 1.0)
    with pytest.raises(ValueError, match="shape"):
        kg.certified_grad(lambda x: x.sum(), x, direction=torch.zeros(2))
    with pytest.raises(TypeError, match="nn.Module"):
        kg.certified_backward(lambda m: m, lambda x: x)
    lin = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        kg.certified_backward(lambda m, x: m(x).sum(), lin, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="scalar"):
        kg.certified_backward(lambda m, x: m(x), nn.Linear(2, 2), torch.zeros(3, 2))


# --------------------------------------------------------------------------------------
# accelerators (run where CUDA is available)
# --------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("name,f,point,plain,certified", COMPOSITES, ids=[c[0] for c in COMPOSITES])
def test_cuda_composites(name, f, point, plain, certified):
    x = torch.tensor(point, dtype=D, device="cuda", requires_grad=True)
    r = kg.certified_grad(f, x, seed=0)
    assert r.grad.cpu().tolist() == pytest.approx(certified, abs=1e-12)
    assert r.certified and r.kinks_hit >= 1


@cuda
def test_cuda_directions_and_networks_match_the_cpu():
    net, x = kinky(3)
    f = lambda x, net=net: net(x).sum()
    cpu = kg.certified_grad(f, x.clone().requires_grad_(), seed=3)
    net_cuda = kinky(3)[0].cuda()
    g = kg.certified_grad(lambda x: net_cuda(x).sum(), x.cuda().requires_grad_(), seed=3)
    assert torch.equal(g.direction.cpu(), cpu.direction)
    torch.testing.assert_close(g.grad.cpu(), cpu.grad, rtol=0, atol=1e-12)
    assert g.kinks_hit == cpu.kinks_hit and g.unresolved == cpu.unresolved


@cuda
def test_cuda_training_step():
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)
    m, x, y = _net_with_kink()
    m, x, y = m.cuda(), x.cuda(), y.cuda()
    torch.manual_seed(5)
    plain_loss = loss_fn(m, x, y).detach()
    after = torch.rand(3, device="cuda")
    m, x, y = _net_with_kink()
    m, x, y = m.cuda(), x.cuda(), y.cuda()
    torch.manual_seed(5)
    step = kg.certified_backward(loss_fn, m, x, y, seed=1)
    assert torch.equal(torch.rand(3, device="cuda"), after)
    assert torch.equal(step.loss, plain_loss)
    assert step.kinks_hit == 6 and step.certified
    m.zero_grad()
    x2 = torch.randn(5, 3, device="cuda")
    off = kg.certified_backward(loss_fn, m, x2, y, seed=1)  # no kink: no tangent pass
    assert off.kinks_hit == 0 and off.directions_used == 0
