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
