"""kinkgrad under torch.func: vmap, grad, vjp, jacrev, per-sample gradients
(vmap(grad(f))) and functional_call apply the policy exactly.

Expected values come from the policy's definition (as the fuzz oracle states it):
relu'(0) = a, clamp at a bound = (1 - a) D- + a D+, abs'(0) = (1 - a)(-1) + a, ties:
"first" to the first tied input, "split" equal shares.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vjp, vmap

import kinkgrad as kg

X = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 1.0], [1.0, -2.0, 0.0]])


def test_vmap_grad_per_sample_relu():
    """The default-suite vmap test: per-sample gradients of relu at its kink."""
    with kg.policy(relu=1.0):
        per_sample = vmap(grad(lambda x: torch.relu(x).sum()))(X)
        values = vmap(torch.relu)(X)
    assert torch.equal(values, torch.relu(X))
    assert torch.equal(per_sample, (X >= 0).float())


# op -> (function of one row, policy, expected gradient of fn(row).sum() per row)
CASES = {
    "relu": (torch.relu, {"relu": 0.25}, lambda x: torch.where(x == 0, 0.25, (x > 0).float())),
    "clamp": (
        lambda x: torch.clamp(x, 0.0, 1.0),
        {"clamp": 0.5},
        lambda x: torch.where((x == 0) | (x == 1), 0.5, ((x > 0) & (x < 1)).float()),
    ),
    "abs": (torch.abs, {"abs": 0.75}, lambda x: torch.where(x == 0, 0.5, x.sign())),
    "maximum": (
        lambda x: torch.maximum(x, torch.zeros_like(x)),
        {"maximum": "first"},
        lambda x: (x >= 0).float(),
    ),
    "max_pool2d": (
        lambda x: F.max_pool2d(x.reshape(1, 1, 1, 3), (1, 3)),
        {"max_pool2d": "split"},
        lambda x: (x == x.max()).float() / (x == x.max()).sum(),
    ),
    "sort": (
        lambda x: torch.sort(x).values * torch.tensor([1.0, 2.0, 3.0]),
        {"sort": "split"},
        None,  # checked against the eager policy below
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_transforms_apply_the_policy(name):
    fn, policy, expected = CASES[name]
    f = lambda x: fn(x).sum()
    with kg.policy(**policy):
        eager = []
        for row in X:
            r = row.clone().requires_grad_(True)
            f(r).backward()
            eager.append(r.grad)
        eager = torch.stack(eager)
        per_sample = vmap(grad(f))(X)
        single = torch.stack([grad(f)(row) for row in X])
        vjps = torch.stack([vjp(f, row)[1](torch.tensor(1.0))[0] for row in X])
        jac = torch.stack([jacrev(f)(row) for row in X])
        values = vmap(fn)(X)
    if expected is not None:
        assert torch.equal(eager, torch.stack([expected(row) for row in X]))
    for got in (per_sample, single, vjps, jac):
        assert torch.equal(got, eager), (name, got, eager)
    assert torch.equal(values, torch.stack([fn(row) for row in X]))


def test_functional_call_per_sample_gradients():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).sum()

    with kg.policy(relu=1.0):
        g = vmap(grad(loss), in_dims=(None, 0))(params, X)
    assert torch.equal(g["0.bias"], torch.ones(3, 2))  # every pre-activation is 0: slope 1
    assert torch.equal(g["0.weight"], X.unsqueeze(1).expand(3, 2, 3))
