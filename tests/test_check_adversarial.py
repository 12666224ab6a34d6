"""Hostile cases for `kinkgrad.check`: each is a function with a known truth on which an
earlier version gave a wrong "passed" or "failed" (the argument for the fix is in each
docstring). A wrong verdict is a defect; "inconclusive" is always allowed where the
truth is not established."""

from __future__ import annotations

import pytest
import torch

import kinkgrad as kg

D = torch.float64


def _nudge_at(x: torch.Tensor, x0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Zero in value; gradient v at exactly x0 and 0 elsewhere: shifts backprop's g at
    the point checked and nowhere else (the gradients sampled near x stay right)."""
    if bool((x.detach() == x0).all()):
        return (v * (x - x.detach())).sum()
    return (0 * x).sum()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_frechet_inequalities_along_finitely_many_directions_do_not_pass_g(sign):
    """f = sign * sum |x_i| at 0 in 100 variables, g = 1.05 e_1 (sign 1; -1.05 e_1 for
    sign -1): the Clarke set is [-1, 1]^100, g is at distance 0.05 outside. g violates
    <g, d> <= f'(x; d) = |d|_1 only for d within ~0.05 of e_1, a cone that neither
    random nor (Gilbert-style) adversarial directions reach in a few dozen tries; the
    old check called g a "regular subgradient" (resp. supergradient) from the
    directions tried and PASSED it. In n >= 2 the inequalities along finitely many
    directions are no certificate, so the verdict may only be inconclusive (g is
    Clarke-valid at no point of the check's reach, and no failure certificate
    applies at a kink)."""
    n = 100
    v = torch.zeros(n, dtype=D)
    v[0] = sign * 1.05  # abs'(0) = 0 in PyTorch: g = v
    x0 = torch.zeros(n, dtype=D)
    f = lambda x: sign * x.abs().sum() + _nudge_at(x, x0, v)  # noqa: E731
    for seed in range(3):
        rep = kg.check(f, x0.clone().requires_grad_(), seed=seed)
        assert abs(float(rep.clarke_distance)) > 0.04, str(rep)
        assert rep.verdict == "inconclusive", str(rep)


@pytest.mark.parametrize("n", [1000])
@pytest.mark.parametrize("relu_prime", [0.0, 1.0])
def test_relu_sum_vertices_still_pass_in_high_dimension_through_the_hull(n, relu_prime):
    """Without the finite-direction Fréchet pass, the vertices 0 and 1 of [0, 1]^n must
    be reached by the hull (Gilbert's steps along d = g - p find them)."""
    with kg.policy(relu=relu_prime):
        rep = kg.check(
            lambda x: torch.relu(x).sum(), torch.zeros(n, dtype=D, requires_grad=True), seed=0
        )
    assert rep.verdict == "passed" and rep.decided_by == "Clarke hull", str(rep)


def x64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=D, requires_grad=True)


@pytest.mark.parametrize(
    "name, f, at",
    [
        ("1e-9 jump on slope 1", lambda x: (x + 1e-9 * (x > 0)).sum(), 0.0),
        ("1e-3 jump on 1e6 x", lambda x: (1e6 * x + 1e-3 * (x > 0)).sum(), 0.0),
        ("1e-3 jump at x = 1e6", lambda x: (x + 1e-3 * (x > 1e6)).sum(), 1e6),
    ],
)
def test_small_jumps_under_a_slope_fail(name, f, at):
    """The old jump test compared raw increments f(x + t d) - f(x) at t = 1e-6, 1e-8,
    1e-10: a jump J below the slope's share s t there went unseen, and its noise floor
    (1e6 x 16 ulps of f) hid 1e-3 on a function of size 1e6; all three PASSED as
    "differentiable". Now the linear part is removed from pairs of steps ((a inc(b) -
    b inc(a)) / (a - b) = J + O(ab)), which is constant only for a jump."""
    for seed in range(3):
        rep = kg.check(f, x64(at), seed=seed)
        assert rep.verdict == "failed" and rep.decided_by == "discontinuity", (name, str(rep))


@pytest.mark.parametrize(
    "name, f",
    [
        ("tanh(1e12 x)", lambda x: torch.tanh(1e12 * x).sum()),
        ("tanh(1e6 x)", lambda x: torch.tanh(1e6 * x).sum()),
        ("clamp(1e12 x)", lambda x: torch.clamp(1e12 * x, -1, 1).sum()),
        # a steep rise just beyond x; g = 0 is its gradient at x
        ("clamp(1e12 (x - 1e-11), 0, 1)", lambda x: torch.clamp(1e12 * (x - 1e-11), 0, 1).sum()),
        ("relu(x - 1e-11)", lambda x: torch.relu(x - 1e-11).sum()),
    ],
)
def test_steep_continuous_functions_with_their_gradient_never_fail(name, f):
    """Smooth or continuous functions, steeper than the smallest step sees, with
    backprop's (right) gradient: the old check FAILED tanh(1e12 x) ("discontinuous"),
    tanh(1e6 x) ("one variable": differences at h >= 5e-7 "converged" to 2000 with an
    error estimate of 1000) and the steep rise at 1e-11 ("discontinuous"). Now: a jump
    is no certificate when g's own slope could carry f across it within t_min, or when
    it fades at a smaller step (then it is beyond x); a difference estimate must agree
    with the extrapolate at its smallest steps."""
    for seed in range(3):
        rep = kg.check(f, x64(0.0), seed=seed)
        assert rep.verdict != "failed", (name, str(rep))


@pytest.mark.parametrize("k", [1e5, 1e6])
def test_a_gradient_a_little_off_on_a_steep_smooth_function_never_passes(k):
    """tanh(k x) summed over 3 inputs at 0 (gradient k per input), g off by 0.1%:
    gradients sampled at 1e-6 had moved by up to 58%, and their first-order correction,
    used as tolerance, let g PASS as "the gradient". Sampled gradients are now refined
    until two extrapolations agree, and none that never converges carries a pass."""
    v = 1e-3 * k * torch.ones(3, dtype=D)
    x0 = torch.zeros(3, dtype=D)
    f = lambda x: torch.tanh(k * x).sum() + _nudge_at(x, x0, v)  # noqa: E731
    for seed in range(3):
        rep = kg.check(f, x0.clone().requires_grad_(), seed=seed)
        assert rep.verdict != "passed", str(rep)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_the_verdict_does_not_depend_on_the_scale_of_f(scale):
    """scale * relu(x).sum() at 0: the hull projection weighted its sum-to-one row
    by 1e3 (1 + max |G|), so gradients of size 1e-30 were fitted to no digit and the
    vertex g = 0 came out at distance 1e-30: "inconclusive" for one seed in six.
    Entries are now in units of the largest before the least squares."""
    for seed in range(6):
        rep = kg.check(
            lambda x: scale * torch.relu(x).sum(),
            torch.zeros(5, dtype=D, requires_grad=True),
            seed=seed,
        )
        assert rep.verdict == "passed", str(rep)


@pytest.mark.parametrize(
    "source, target, args",
    [
        ("import sys\nsys.exit(0)\n", "m.py:f", ["--at", "[0.0]"]),
        ("import sys\ndef f(x):\n    sys.exit(0)\n", "m.py:f", ["--at", "[0.0]"]),
        ("def case():\n    raise SystemExit\n", "m.py:case", []),
        (
            "import torch\ndef f(x):\n    return x.sum()\n",
            "m.py:f",
            ["--at", "[0]", "--directions", "1000000000"],
        ),
    ],
)
def test_cli_sys_exit_or_absurd_directions_is_a_user_error(
    tmp_path, capsys, monkeypatch, source, target, args
):
    """sys.exit(0) in the user's module, f or case function went straight through the
    CLI: exit status 0, read as "passed", with no output. --directions 1e9 ran for hours.
    Both are user errors now: exit 2, one line."""
    from kinkgrad.check_cli import cli

    (tmp_path / "m.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    rc = cli([target, *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kinkgrad check:"), err


@pytest.mark.parametrize(
    "f, n",
    [
        (lambda x: torch.relu(x[0] - 10 * x[1].abs()), 2),
        (lambda x: torch.relu(x[0] - 30 * x[1].abs()), 2),
        (lambda x: torch.relu(x[0] - 2 * x[1:].abs().sum()), 5),
    ],
)
def test_a_narrow_cone_of_another_piece_does_not_fail_a_valid_g(f, n):
    """relu(x1 - w |x2|) at 0 with relu'(0) = 1: g = (1, 0) = the mean of the pieces'
    gradients (1, +-w), a Clarke element. The second piece is entered only inside a cone
    of 6% (w = 10) or 2% (w = 30) of the directions; 16 random directions missed it
    for 15 of 30 seeds (w = 10), 23 of 30 (w = 30) and 10 of 10 (5 variables), saw f
    "differentiable" with gradient 0 and FAILED g. The certificate now has to hold
    along directions near g - a too, and there the cone is."""
    for seed in range(10):
        with kg.policy(relu=1.0):
            rep = kg.check(f, torch.zeros(n, dtype=D, requires_grad=True), seed=seed)
        assert rep.verdict != "failed", str(rep)


A3 = torch.ones(3, dtype=D)
B3 = torch.tensor([2.0, -1.0, 0.5], dtype=D)


def _bump(x: torch.Tensor) -> torch.Tensor:
    """C^1, gradient B3 at 0 and A3 beyond |x| = 1e-9 (a smooth bump made with where,
    which no catalog op reports)."""
    s = (x * x).sum() / 1e-18
    psi = torch.where(s < 1, (1 - s) ** 2, torch.zeros((), dtype=D))
    return (A3 * x).sum() + ((B3 - A3) * x).sum() * psi


def test_a_feature_below_the_difference_steps_decides_nothing():
    """The bump is invisible to the differences (steps >= 5e-7) and to the gradients
    sampled at >= 1e-7: both see the gradient A3. The old check FAILED backprop's
    right g = B3 ("differentiable with gradient A3") and PASSED a wrong g = A3. The
    quotient (f(x + t d) - f(x)) / t at t = 1e-8 and 1e-10, extrapolated to 0, must now
    agree with the differences, else the direction decides nothing."""
    x0 = torch.zeros(3, dtype=D)
    wrong = lambda x: _bump(x) + _nudge_at(x, x0, A3 - B3)  # noqa: E731
    branch = lambda x: torch.where(x.sum() < 1e-9, 5 * x.sum(), x.sum() + 4e-9)  # noqa: E731
    for seed in range(3):
        right = kg.check(_bump, x0.clone().requires_grad_(), seed=seed)
        assert right.verdict != "failed", str(right)
        bad = kg.check(wrong, x0.clone().requires_grad_(), seed=seed)
        assert bad.verdict != "passed", str(bad)
        # f = 5 sum(x) near 0 (g = 5): a Python branch 1e-9 away
        rep = kg.check(branch, x0.clone().requires_grad_(), seed=seed)
        assert rep.verdict != "failed", str(rep)


def test_a_kink_far_from_zero_is_not_a_jump():
    """relu(x - 1e6).sum() at x = 1e6 (5 inputs on the kink), g = 0: x + t d rounds to
    ulp(1e6) = 1.2e-10 per coordinate at every small t, a constant error in the
    increments that the jump test took for a jump of 1e-10 (and then for a steep rise
    beyond x): "inconclusive" for one seed in three. The rounding of the step now
    counts as noise."""
    for seed in range(3):
        rep = kg.check(
            lambda x: torch.relu(x - 1e6).sum(),
            torch.full((5,), 1e6, dtype=D, requires_grad=True),
            seed=seed,
        )
        assert rep.verdict == "passed", str(rep)
        assert not any(d.steep or d.jump for d in rep.directions), str(rep)
