"""The first-order check: passes on smooth functions (property test), tells kinks from
differentiable points, catches backprop leaving the generalized gradient, exact
linearization radii, the CLI, bad input."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kinkgrad as kg
from kinkgrad.check_cli import cli

D = torch.float64


def x64(*values):
    return torch.tensor(values, dtype=D, requires_grad=True)


def identity_at_zero(x):
    return (torch.relu(x) - torch.relu(-x)).sum()


# --------------------------------------------------------------------------------------
# smooth functions pass (property test)
# --------------------------------------------------------------------------------------

UNARY = [
    torch.sin,
    torch.tanh,
    torch.sigmoid,
    F.softplus,
    lambda v: torch.exp(0.5 * v),
    lambda v: torch.log1p(v * v),
    lambda v: v**3 - 2 * v,
    lambda v: torch.cos(3 * v) * v,
    F.silu,
    F.gelu,
]


def _smooth(ops: list[int], mix: int):
    def f(x, y):
        h = x
        for k in ops:
            h = UNARY[k](h) + 0.5 * h
        z = {0: h * y, 1: h @ y.flip(0), 2: torch.atan2(h, 1.5 + y * y), 3: h / (1 + y.exp())}[mix]
        return z.sum() + (h * h).mean()

    return f


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.integers(0, len(UNARY) - 1), min_size=1, max_size=4),
    mix=st.integers(0, 3),
    xs=st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=3, max_size=3),
    ys=st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_smooth_functions_pass(ops, mix, xs, ys, seed):
    f = _smooth(ops, mix)
    rep = kg.check(f, x64(*xs), x64(*ys), directions=8, seed=seed)
    assert rep.differentiable, str(rep)
    assert rep.passed, str(rep)
    assert all(math.isinf(d.radius) for d in rep.directions)  # no kink op: linear model
    assert rep.kinks_hit == 0


def test_smooth_float32_function_with_a_float32_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(4, requires_grad=True)
    rep = kg.check(lambda x: model(x).sum(), x, seed=0)
    assert rep.passed and rep.differentiable
    assert rep.fd_dtype == "float64 (promoted)"  # the model refused float64 inputs


# --------------------------------------------------------------------------------------
# kinks
# --------------------------------------------------------------------------------------


def test_relu_identity_fails_under_the_default_policy_and_says_why():
    rep = kg.check(identity_at_zero, x64(0.0), seed=0)
    assert not rep.passed
    assert rep.differentiable  # relu(x) - relu(-x) is x
    assert rep.clarke_distance == pytest.approx(1.0)
    text = " ".join(rep.reasons)
    assert rep.verdict == "failed" and rep.decided_by == "differentiability"
    assert "differentiable" in text and "not the gradient" in text
    assert all(
        d.forward == pytest.approx(d.predicted + (1 if d.forward > 0 else -1))
        for d in rep.directions
    )
    out = str(rep)
    assert "FAILED" in out and "f'(x; d)" in out and "<g, d>" in out
    assert "decided by: differentiability" in out


def test_relu_identity_passes_with_relu_prime_one_half():
    with kg.policy(relu=0.5):  # d/dx = a + a = 1: the right value, by luck of symmetry
        rep = kg.check(identity_at_zero, x64(0.0, 0.0), seed=0)
    assert rep.passed and rep.differentiable


def test_abs_at_zero_is_a_kink_and_zero_is_a_subgradient():
    rep = kg.check(lambda x: x.abs().sum(), x64(0.0, 0.0, 0.0), seed=1)
    assert not rep.differentiable and rep.kink
    assert rep.passed and rep.clarke_distance < 1e-9
    assert "kink" in " ".join(rep.reasons) and "PASSED" in str(rep)


def test_kink_with_a_gradient_outside_the_clarke_set_fails():
    # relu(x) + relu(x) - x at 0 with the "policy" relu=... : d/dx = 2a - 1; the Clarke
    # set is [-1, 1] for every a in [0, 1]; make backprop leave it with a composite:
    # f = |x| + (maximum(x, 0) - relu(x)): Clarke [-1, 1], plain backprop 0 + 0.5 = 0.5
    # (inside). Leave it through a non-Clarke value instead: leaky_relu slope outside.
    f = lambda x: (x.abs() + 4 * (torch.maximum(x, torch.zeros_like(x)) - torch.relu(x))).sum()
    rep = kg.check(f, x64(0.0), seed=2)
    assert rep.kink and rep.verdict == "failed"  # plain gives 0 + 4 * 0.5 = 2; Clarke [-1, 1]
    assert rep.decided_by == "one variable"
    assert rep.clarke_distance == pytest.approx(1.0, abs=1e-6)
    assert "outside the Clarke set [-1, 1]" in rep.reason


def test_maximum_minus_relu_fails():
    f = lambda x: (torch.maximum(x, torch.zeros_like(x)) - torch.relu(x)).sum()
    rep = kg.check(f, x64(0.0, 1.0), seed=0)
    assert rep.differentiable and not rep.passed


def test_certified_gradient_would_pass_where_plain_fails():
    """The same point through certified_grad: its gradient satisfies the model."""
    x = x64(0.0)
    g = kg.certified_grad(identity_at_zero, x, seed=0).grad
    assert g.item() == 1.0  # = f'(x; d) / d for every direction of the check


def test_piecewise_linear_radius_is_exact():
    c = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    f = lambda x: (torch.relu(x - c) * torch.tensor([1.0, 2.0, 3.0], dtype=D)).sum()
    x = torch.zeros(3, dtype=D, requires_grad=True)
    rep = kg.check(f, x, directions=6, seed=3)
    assert rep.differentiable and rep.passed
    gen = torch.Generator().manual_seed(3)
    for d in rep.directions:
        # the check's own directions: recompute them the way it draws them
        u = torch.randn(3, generator=gen, dtype=D)
        u = u / u.norm()
        t = (c - 0.0) / u
        expect = min([v for v in t.tolist() if v > 0], default=math.inf)
        back = min([v for v in (-t).tolist() if v > 0], default=math.inf)
        assert d.radius == pytest.approx(expect) and d.radius_back == pytest.approx(back)
        # f is linear along d up to the radius: the quotient at the radius is exact
        r = min(d.radius, 10.0)
        q = (f(x.detach() + r * u) - f(x.detach())) / r
        assert float(q) == pytest.approx(d.predicted, abs=1e-12)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_errors():
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        kg.check(torch.relu, x)
    with pytest.raises(ValueError, match="does not require grad"):
        kg.check(lambda x: x.sum(), torch.zeros(2))
    with pytest.raises(TypeError, match="floating"):
        kg.check(lambda x: x.sum(), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        kg.check(lambda x: x.sum(), torch.tensor([float("nan")], requires_grad=True))
    with pytest.raises(ValueError, match="directions"):
        kg.check(lambda x: x.sum(), x, directions=0)
    with pytest.raises(ValueError, match="rtol"):
        kg.check(lambda x: x.sum(), x, rtol=2.0)
    with pytest.raises(ValueError, match=r"f\(x\) = -inf"):
        kg.check(lambda x: torch.log(x.abs()).sum(), x)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


@pytest.fixture
def cases(tmp_path):
    path = tmp_path / "cases.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch

            def identity():
                x = torch.zeros(2, dtype=torch.float64)
                return (lambda x: (torch.relu(x) - torch.relu(-x)).sum()), (x,)

            def smooth():
                return (lambda x: torch.sin(x).sum()), torch.tensor([0.3, 1.0])

            def f(x):
                return (torch.relu(x) - torch.relu(-x)).sum()

            def not_a_case():
                return 3
            """
        )
    )
    return path


def test_cli_exit_status_says_the_verdict(cases, tmp_path, capsys):
    """0 passed, 1 failed, 3 inconclusive; the table names the deciding test."""
    path = tmp_path / "verdicts.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch

            def jump(x):
                return torch.sign(x).sum()

            def unprovable(x):  # g = 2 per coordinate, Clarke set [0, 1]^n: undecidable
                z = torch.zeros_like(x)
                return (torch.relu(x) + 4 * (torch.maximum(x, z) - torch.relu(x))).sum()
            """
        )
    )
    assert cli([f"{path}:jump", "--at", "[0.0]", "--seed", "0"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "decided by: discontinuity" in out and "jump of about 1" in out
    assert cli([f"{path}:unprovable", "--at", "[0, 0, 0, 0]", "--seed", "0"]) == 3
    out = capsys.readouterr().out
    assert "INCONCLUSIVE" in out and "distance" in out


@pytest.fixture
def broken(tmp_path):
    (tmp_path / "syntax_err.py").write_text("def f(x):\n    return (x\n")
    (tmp_path / "import_err.py").write_text("import no_such_module_kg_xyz\n")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "fns.py").write_text(
        textwrap.dedent(
            """
            import torch

            def raises(x):
                raise ZeroDivisionError("user bug")

            def heaviside(x):
                return torch.heaviside(x, torch.tensor(0.5, dtype=x.dtype)).sum() + x.sum()

            def case_raises():
                raise KeyError("missing")

            def f(x):
                return x.sum()
            """
        )
    )
    return tmp_path


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["{d}/fns.py:raises", "--at", "[0.0]"], "ZeroDivisionError: user bug"),
        (["{d}/fns.py:case_raises"], "KeyError"),
        (["{d}/syntax_err.py:f", "--at", "[0.0]"], "syntax error"),
        (["{d}/import_err.py:f", "--at", "[0.0]"], "ModuleNotFoundError"),
        (["{d}/raises_on_import.py:f", "--at", "[0.0]"], "boom at import"),
        (["{d}/fns.py:f", "--at", '"abc"'], "--at"),
        (["{d}/fns.py:f", "--at", "[nan]"], "--at"),
        (["{d}/fns.py:f", "--at", "[NaN]"], "finite"),
        (["{d}/fns.py:f", "--at", "[[1, 2], [3]]"], "rectangular"),
        (["{d}/fns.py:f", "--at", "[true]"], "--at"),
        (["{d}/fns.py:f", "--shape", "-1"], "--shape"),
        (["{d}/fns.py:f", "--shape", "100000,100000"], "at most"),
        (["{d}/fns.py:f", "--shape", "a,b"], "--shape"),
        (["{d}/fns.py:f", "--at", "[0.0]", "--directions", "0"], "--directions"),
        (["{d}/fns.py:heaviside", "--at", "[0.0, 1.0]"], "heaviside"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(broken, capsys, args, words):
    assert cli([a.format(d=broken) for a in args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kinkgrad check: ") and "Traceback" not in err
    assert words in err


def test_cli_case_function(cases, capsys):
    assert cli([f"{cases}:identity", "--seed", "0"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "differentiable" in out
    assert cli([f"{cases}:smooth", "--seed", "0"]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_cli_point_flags_and_policy(cases, capsys):
    assert cli([f"{cases}:f", "--at", "[0, 0]", "--seed", "1"]) == 1
    assert cli([f"{cases}:f", "--at", "[0, 0]", "--policy", "relu=0.5"]) == 0
    assert cli([f"{cases}:f", "--shape", "3", "--seed", "2"]) == 0  # off the kink
    capsys.readouterr()


def test_cli_bad_arguments(cases, capsys):
    assert cli([f"{cases}:not_a_case"]) == 2
    assert cli([f"{cases}:missing"]) == 2
    assert cli(["no_such_module_kg:f"]) == 2
    assert cli(["nocolon"]) == 2
    assert cli([f"{cases}:f", "--policy", "relu"]) == 2
    assert cli([f"{cases}:f", "--at", "[0"]) == 2
    err = capsys.readouterr().err
    assert "kinkgrad check:" in err


def test_cli_entry_point(cases, capsys):
    from kinkgrad.cli import main

    assert main(["check", f"{cases}:smooth", "--directions", "2"]) == 0
    assert "PASSED" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# soundness: valid gradients never fail, continuous functions never "jump"
# --------------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), kinks=st.integers(1, 4), relu_prime=st.sampled_from([0.0, 1.0]))
def test_a_valid_generalized_gradient_never_fails(seed, kinks, relu_prime):
    """w . relu(W x + b) at x = 0 with `kinks` zero biases (<= the input dimension,
    W generic): every sign pattern of the kink units is a piece touching 0, so the
    Clarke set is {sum_i w_i s_i W_i : s_i in [0, 1] at the kinks} + the rest, and
    backprop's g (s_i = relu'(0) in {0, 1}) is in it. Any verdict but "failed"."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 5, generator=g, dtype=D)
    b = torch.randn(6, generator=g, dtype=D)
    b[:kinks] = 0.0
    w = torch.randn(6, generator=g, dtype=D)
    with kg.policy(relu=relu_prime):
        rep = kg.check(lambda x: (w * torch.relu(W @ x + b)).sum(), x64(*[0.0] * 5), seed=seed)
    assert rep.verdict != "failed", str(rep)
    assert rep.kink


def test_steep_continuous_functions_are_not_called_discontinuous():
    for k in (1e3, 1e6, 1e8):
        rep = kg.check(
            lambda x, k=k: torch.tanh(k * x).sum() + torch.relu(k * x).sum(), x64(0.0), seed=0
        )
        assert rep.decided_by != "discontinuity", (k, str(rep))
        assert all(d.jump is None for d in rep.directions)


def test_too_few_directions_never_fail_on_differentiability():
    """max(0, min(x1, x2)) at 0 has Clarke set conv{0, e1, e2}; with relu'(0) = 1
    backprop gives (1/2, 1/2), inside it. A direction with opposite-signed components
    sees derivative 0 both ways and gradient 0 on both sides: one direction must not
    "certify" differentiability and fail g."""
    f = lambda x: torch.relu(torch.minimum(x[0], x[1]))
    for seed in range(8):
        with kg.policy(relu=1.0):
            rep = kg.check(f, x64(0.0, 0.0), directions=1, seed=seed)
        assert rep.verdict != "failed", str(rep)


@pytest.mark.parametrize("n", [6, 12, 100])
@pytest.mark.parametrize("relu_prime", [0.0, 1.0])
def test_relu_sum_passes_at_the_vertices_of_its_clarke_cube(n, relu_prime):
    """relu(x).sum() at 0: Clarke set [0, 1]^n; g = 0 and g = 1 are vertices that a few
    dozen nearby gradients almost never span (the old check failed them)."""
    for seed in range(3):
        with kg.policy(relu=relu_prime):
            rep = kg.check(
                lambda x: torch.relu(x).sum(),
                torch.zeros(n, dtype=D, requires_grad=True),
                seed=seed,
            )
        assert rep.verdict == "passed", str(rep)
