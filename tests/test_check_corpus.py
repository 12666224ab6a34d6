"""`kinkgrad.check` on a corpus of functions whose truth is known: the exact verdict (and
the test that decided it), for several random seeds (the verdict must not depend on the
seed). Each case says why its verdict is the right one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import kinkgrad as kg

D = torch.float64


def x64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=D, requires_grad=True)


def zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=D, requires_grad=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class Case:
    name: str
    category: str
    make: Callable[[], tuple]  # () -> (f, inputs...)
    verdict: str
    decided_by: str | None = None  # None: any test of that verdict
    policy: dict | None = None


def _grad_nudge(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Zero in value, gradient v: shifts backprop's g by v without changing f."""
    return (v * (x - x.detach())).sum()


def _convex_pool():
    # sum_w c_w maxpool(x)_w with c >= 0 is convex; windows with tied maxima
    x = torch.zeros(1, 2, 4, 4, dtype=D)
    x[0, 0, :2, :3] = 1.0  # a tied window of ones, one half-tied, windows of zeros
    c = torch.rand(1, 2, 2, 2, generator=gen(5), dtype=D)
    return (lambda x: (c * F.max_pool2d(x, 2)).sum()), x.requires_grad_()


def _convex_pool_overlapping():
    x = torch.zeros(1, 1, 7, 7, dtype=D)
    x[0, 0, 2:5, 2:5] = 2.0
    c = torch.rand(1, 1, 3, 3, generator=gen(6), dtype=D)
    return (lambda x: (c * F.max_pool2d(x, 3, stride=2)).sum()), x.requires_grad_()


def _convex_relu_layer():
    # sum_i c_i relu(a_i . x + b_i), c >= 0, half of the units exactly on their kink
    A = torch.randn(40, 30, generator=gen(1), dtype=D)
    b = torch.randn(40, generator=gen(2), dtype=D)
    b[::2] = 0.0
    c = torch.rand(40, generator=gen(3), dtype=D)
    return (lambda x: (c * torch.relu(A @ x + b)).sum()), zeros(30)


def _smooth_mlp():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(5, generator=gen(4), dtype=torch.float32)
    return (lambda x: m(x).sum()), x.requires_grad_()


def _softplus_quadratic():
    A = torch.randn(6, 6, generator=gen(7), dtype=D)
    x = torch.randn(6, generator=gen(8), dtype=D)
    return (lambda x: F.softplus(x @ A @ x) + torch.logsumexp(x, 0)), x.requires_grad_()


def _branch_min():
    # min(2 s, 3 s), s = sum(x), written as a Python branch: concave, continuous
    return (lambda x: 2 * x.sum() if x.sum() > 0 else 3 * x.sum()), zeros(3)


def _branch_detached():
    # the value is s everywhere (f is linear), but the branch taken at 0 detaches it
    return (lambda x: x.sum() if x.sum() > 0 else x.sum().detach() + 0 * x.sum()), zeros(3)


def _branch_jump():
    return (lambda x: x.sum() if x.sum() > 0 else x.sum() + 1), zeros(2)


CASES = [
    # --- jumps: failed, discontinuity
    Case(
        "sign at 0",
        "jump",
        lambda: (lambda x: torch.sign(x).sum(), x64(0.0)),
        "failed",
        "discontinuity",
    ),
    Case(
        "step (x > 0)",
        "jump",
        lambda: (lambda x: (x > 0).to(D).sum() + 0 * x.sum(), x64(0.0)),
        "failed",
        "discontinuity",
    ),
    Case(
        "floor(x) + x at 1",
        "jump",
        lambda: (lambda x: (torch.floor(x) + x).sum(), x64(1.0)),
        "failed",
        "discontinuity",
    ),
    Case(
        "round at 0.5",
        "jump",
        lambda: (lambda x: torch.round(x).sum() + x.sum(), x64(0.5, 0.2)),
        "failed",
        "discontinuity",
    ),
    Case(
        "threshold at its threshold",
        "jump",
        lambda: (lambda x: F.threshold(x, 0.5, -1.0).sum(), x64(0.5)),
        "failed",
        "discontinuity",
    ),
    Case("branch with a jump", "jump", _branch_jump, "failed", "discontinuity"),
    Case(
        "sign in 50 dims",
        "jump",
        lambda: (lambda x: torch.sign(x).sum(), zeros(50)),
        "failed",
        "discontinuity",
    ),
    # --- kinks with a Clarke element: passed
    Case("relu sum n=8, g=0", "kink", lambda: (lambda x: torch.relu(x).sum(), zeros(8)), "passed"),
    Case(
        "relu sum n=1000, g=0",
        "kink",
        lambda: (lambda x: torch.relu(x).sum(), zeros(1000)),
        "passed",
    ),
    Case(
        "relu sum n=1000, g=1",
        "kink",
        lambda: (lambda x: torch.relu(x).sum(), zeros(1000)),
        "passed",
        policy={"relu": 1.0},
    ),
    Case(
        "relu sum n=1000, g=1/2",
        "kink",
        lambda: (lambda x: torch.relu(x).sum(), zeros(1000)),
        "passed",
        policy={"relu": 0.5},
    ),
    Case("-abs sum at 0, g=0", "kink", lambda: (lambda x: -x.abs().sum(), zeros(5)), "passed"),
    Case("abs sum at 0", "kink", lambda: (lambda x: x.abs().sum(), zeros(200)), "passed"),
    Case("convex max-pool sum, ties", "tie", _convex_pool, "passed"),
    Case("convex overlapping max-pool, ties", "tie", _convex_pool_overlapping, "passed"),
    Case("max of a tied vector", "tie", lambda: (lambda x: x.max(), zeros(20)), "passed"),
    Case("min of a tied vector", "tie", lambda: (lambda x: x.min(), zeros(20)), "passed"),
    Case(
        "leaky_relu at 0",
        "kink",
        lambda: (lambda x: F.leaky_relu(x, 0.1).sum(), zeros(4)),
        "passed",
    ),
    Case(
        "clamp at both ends",
        "kink",
        lambda: (lambda x: x.clamp(-1, 1).sum(), x64(-1.0, 1.0, 0.5)),
        "passed",
    ),
    Case("convex relu layer, 40 units", "kink", _convex_relu_layer, "passed"),
    Case(
        "where(x > 0, x^2, -x) at 0",
        "branch",
        lambda: (lambda x: torch.where(x > 0, x * x, -x).sum(), x64(0.0)),
        "passed",
    ),
    Case("branch min(2s, 3s)", "branch", _branch_min, "passed"),
    Case(
        "relu(relu(x) - 1): flat at 0",
        "kink",
        lambda: (lambda x: torch.relu(torch.relu(x) - 1).sum(), zeros(6)),
        "passed",
        "differentiability",
    ),
    Case(
        "relu^2 at 0",
        "kink",
        lambda: (lambda x: (torch.relu(x) ** 2).sum(), zeros(6)),
        "passed",
        "differentiability",
    ),
    Case(
        "identity via relu, relu'(0)=1/2",
        "composite",
        lambda: (lambda x: (torch.relu(x) - torch.relu(-x)).sum(), zeros(3)),
        "passed",
        "differentiability",
        {"relu": 0.5},
    ),
    # --- composites that leave the Clarke set: failed, with a certificate
    Case(
        "relu(x) - relu(-x) at 0, g=0",
        "composite",
        lambda: (lambda x: (torch.relu(x) - torch.relu(-x)).sum(), x64(0.0)),
        "failed",
        "differentiability",
    ),
    Case(
        "relu(x) - relu(-x) in 200 dims",
        "composite",
        lambda: (lambda x: (torch.relu(x) - torch.relu(-x)).sum(), zeros(200)),
        "failed",
        "differentiability",
    ),
    Case(
        "maximum(x, 0) - relu(x), g=1/2",
        "composite",
        lambda: (
            lambda x: (torch.maximum(x, torch.zeros_like(x)) - torch.relu(x)).sum(),
            x64(0.0, 1.0),
        ),
        "failed",
        "differentiability",
    ),
    Case(
        "2 relu(x) - |x| = x at 0",
        "composite",
        lambda: (lambda x: (2 * torch.relu(x) - x.abs()).sum(), zeros(4)),
        "failed",
        "differentiability",
    ),
    Case(
        "|x| + 4 (maximum - relu), one variable",
        "composite",
        lambda: (
            lambda x: (x.abs() + 4 * (torch.maximum(x, torch.zeros_like(x)) - torch.relu(x))).sum(),
            x64(0.0),
        ),
        "failed",
        "one variable",
    ),
    Case(
        "relu at 0 with g = -0.01, one variable",
        "composite",
        lambda: (
            lambda x: torch.relu(x).sum() + _grad_nudge(x, torch.tensor([-0.01], dtype=D)),
            x64(0.0),
        ),
        "failed",
        "one variable",
    ),
    Case("branch that detaches (f = s)", "branch", _branch_detached, "failed", "differentiability"),
    Case(
        "sqrt at 0: g = inf",
        "composite",
        lambda: (lambda x: torch.sqrt(x).sum(), zeros(2)),
        "failed",
        "non-finite g",
    ),
    # --- not provable either way: inconclusive
    Case(
        "relu sum, g = -0.01 e1, 50 dims",
        "undecidable",
        lambda: (
            lambda x: torch.relu(x).sum() + _grad_nudge(x, -0.01 * torch.eye(50, dtype=D)[0]),
            zeros(50),
        ),
        "inconclusive",
    ),
    Case(
        "relu + 4 (maximum - relu), 30 dims: g = 2",
        "undecidable",
        lambda: (
            lambda x: (
                torch.relu(x) + 4 * (torch.maximum(x, torch.zeros_like(x)) - torch.relu(x))
            ).sum(),
            zeros(30),
        ),
        "inconclusive",
    ),
    # --- smooth functions: passed, differentiability
    Case(
        "sin(10 x)",
        "smooth",
        lambda: (lambda x: torch.sin(10 * x).sum(), x64(0.3, 1.0)),
        "passed",
        "differentiability",
    ),
    Case(
        "softplus quadratic + logsumexp",
        "smooth",
        _softplus_quadratic,
        "passed",
        "differentiability",
    ),
    Case("float32 tanh MLP (promoted)", "smooth", _smooth_mlp, "passed", "differentiability"),
    Case(
        "exp of a sum, 300 dims",
        "smooth",
        lambda: (lambda x: torch.exp(0.01 * x.sum()), zeros(300)),
        "passed",
        "differentiability",
    ),
    Case(
        "steep but continuous tanh(1e4 x)",
        "smooth",
        lambda: (lambda x: torch.tanh(1e4 * x).sum(), x64(0.0)),
        "passed",
    ),
    Case(
        "relu off its kink",
        "smooth",
        lambda: (lambda x: torch.relu(x).sum(), x64(-1.0, 2.0, 0.5)),
        "passed",
        "differentiability",
    ),
]

SEEDS = (0, 1, 2)


def _run(case: Case, seed: int) -> kg.CheckReport:
    f, *inputs = case.make()
    if case.policy:
        with kg.policy(**case.policy):
            return kg.check(f, *inputs, seed=seed, directions=12)
    return kg.check(f, *inputs, seed=seed, directions=12)


def test_the_corpus_is_large_and_covers_every_category():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    cats = Counter(c.category for c in CASES)
    assert set(cats) >= {"jump", "kink", "tie", "composite", "smooth", "branch", "undecidable"}
    assert {c.verdict for c in CASES} == {"passed", "failed", "inconclusive"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_exact_verdict_for_every_seed(case: Case):
    for seed in SEEDS:
        rep = _run(case, seed)
        assert rep.verdict == case.verdict, f"seed {seed}: {rep}"
        assert rep.passed == (case.verdict == "passed")
        if case.decided_by is not None:
            assert rep.decided_by == case.decided_by, f"seed {seed}: {rep}"
        assert rep.reason and "\n" not in rep.reason


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_exact_verdict_for_more_seeds(case: Case):
    for seed in range(3, 13):
        rep = _run(case, seed)
        assert rep.verdict == case.verdict, f"seed {seed}: {rep}"
