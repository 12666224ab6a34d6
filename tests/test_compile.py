"""kinkgrad under torch.compile: no graph break added, fullgraph works, gradients
bit-identical to eager kinkgrad for every op family with kinks present, and a policy
opened around (or inside) a compiled function applies; leaving it restores plain."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn as nn
import torch.nn.functional as F

import kinkgrad as kg

X0 = torch.tensor(
    [[0.0, 0.0, 1.0, -1.0], [1.0, 1.0, 0.0, 2.0], [-1.0, 0.0, 0.0, 0.0], [3.0, 3.0, 1.0, 1.0]]
)


def elementwise(t):
    return (
        torch.relu(t) + torch.clamp(t, -1.0, 1.0) + t.abs() + F.hardtanh(t) + F.leaky_relu(t)
    ).sum()


def binary(t):
    return torch.maximum(t, torch.zeros_like(t)).sum() + torch.minimum(t, t.flip(0)).sum()


def selections(t):
    w = torch.arange(t.numel(), dtype=t.dtype)
    return (torch.sort(t.flatten()).values * w).sum() + torch.max(t, -1).values.sum()


def pooling(t):
    return (
        F.max_pool2d(t.reshape(1, 1, 4, 4), 2)
        * torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2)
    ).sum()


def jumps(t):
    return (torch.sign(t) * t.detach()).sum() + torch.round(t).sum()


FAMILIES = {
    "elementwise": (elementwise, dict(relu=1.0, clamp=0.5, abs=0.25, hardtanh=1.0, leaky_relu=0.5)),
    "binary": (binary, dict(maximum="first", minimum="first")),
    "selections": (selections, dict(sort="split", max="split")),
    "pooling": (pooling, dict(max_pool2d="split")),
    "jumps": (jumps, dict(sign="ste", round="ste")),
}


def grad_under(fn, policy):
    x = X0.clone().requires_grad_(True)
    with kg.policy(**policy):
        fn(x).backward()
    return x.grad


def test_compile_matches_eager_no_graph_break_and_restores_plain():
    """The default-suite compile test: every family at once, aot_eager, fullgraph."""

    def all_families(t):
        return sum(fn(t) for fn, _ in FAMILIES.values())

    policy = {k: v for _, p in FAMILIES.values() for k, v in p.items()}
    dynamo.reset()
    plain_breaks = dynamo.explain(all_families)(X0.clone().requires_grad_()).graph_break_count
    with kg.policy(**policy):
        breaks = dynamo.explain(all_families)(X0.clone().requires_grad_()).graph_break_count
    assert breaks <= plain_breaks == 0
    eager = grad_under(all_families, policy)
    plain = grad_under(all_families, {})
    assert not torch.equal(eager, plain)  # the kinks matter here
    dynamo.reset()
    compiled = torch.compile(all_families, backend="aot_eager", fullgraph=True)
    assert torch.equal(grad_under(compiled, policy), eager)
    assert torch.equal(grad_under(compiled, {}), plain)  # leaving the block: plain again
    assert torch.equal(grad_under(compiled, policy), eager)  # and back


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_every_backend(backend, family):
    fn, policy = FAMILIES[family]
    eager = grad_under(fn, policy)
    assert not torch.equal(eager, grad_under(fn, {}))
    dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    got = grad_under(compiled, policy)
    assert torch.equal(got, eager) and torch.equal(got.signbit(), eager.signbit())
    assert torch.equal(grad_under(compiled, {}), grad_under(fn, {}))


@pytest.mark.slow
def test_policy_inside_a_compiled_function_and_attach():
    dynamo.reset()

    @torch.compile(backend="aot_eager")
    def inner(t):
        with kg.policy(relu=1.0):
            return torch.relu(t).sum()

    x = torch.zeros(3, requires_grad=True)
    inner(x).backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]

    dynamo.reset()
    model = kg.attach(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), relu=1.0)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    assert dynamo.explain(model)(torch.ones(2, 3)).graph_break_count == 0
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    compiled(torch.ones(2, 3)).sum().backward()
    assert model[0].bias.grad.tolist() == [2.0, 2.0, 2.0]
    kg.detach(model)


# In-place spellings bound in C (torch.relu_, torch.clamp_, F.hardtanh_, ...) are not in
# PyTorch's list of overridable functions, which dynamo consults before dispatching to a
# TorchFunctionMode: kinkgrad.dynamo_reach adds them. Each must be right (equal to eager
# kinkgrad) or loud (an error), never plain PyTorch's gradient.
_INPLACE = {
    "torch.relu_": lambda y: torch.relu_(y),
    "torch.clamp_": lambda y: torch.clamp_(y, min=0.0),
    "torch.clamp_min_": lambda y: torch.clamp_min_(y, 0.0),
    "torch.clip_": lambda y: torch.clip_(y, min=0.0),
    "torch.abs_": lambda y: torch.abs_(y),
    "F.hardtanh_": lambda y: F.hardtanh_(y),
    "F.leaky_relu_": lambda y: F.leaky_relu_(y),
    "F.relu6_inplace": lambda y: F.relu6(y, inplace=True),
}
_INPLACE_POLICY = dict(relu=1.0, clamp=0.0, abs=1.0, hardtanh=0.5, relu6=1.0, leaky_relu=0.5)


def _inplace_grad(op, compiled: bool, policy: bool = True):
    def f(x):
        return op(x * 1.0).sum()

    dynamo.reset()
    fn = torch.compile(f, backend="aot_eager") if compiled else f
    x = torch.tensor([0.0, 1.0, -1.0, 0.0, -0.0], requires_grad=True)
    with kg.policy(**(_INPLACE_POLICY if policy else {})):
        out = fn(x)
    out.backward()
    return x.grad


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=() if n in ("torch.relu_", "torch.clamp_") else pytest.mark.slow)
        for n in _INPLACE
    ],
)
def test_c_bound_inplace_spellings_are_right_or_loud_under_compile(name):
    op = _INPLACE[name]
    eager = _inplace_grad(op, compiled=False)
    assert not torch.equal(eager, _inplace_grad(op, compiled=False, policy=False))  # it shows
    try:
        got = _inplace_grad(op, compiled=True)
    except RuntimeError:
        return  # loud: PyTorch refuses the compiled in-place graph
    assert torch.equal(got, eager), (name, got.tolist(), eager.tolist())


# ---- what the compiled path costs: no second dispatch, few guards, no bool saved ----


def _node_names(out):
    seen, names, todo = set(), [], [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def test_a_graph_traced_under_the_policy_runs_without_the_mode():
    """Dynamo inlines the interception mode into the graph, but PyTorch runs the graph
    with the mode still active: the eager backend's graph would then be intercepted a
    second time (every policy node built twice), and every torch call of inductor's
    wrapper code pays a Python call. `dynamo_graphs` runs such graphs without it."""

    def f(t):
        return (torch.relu(t) * 2).relu().sum()

    x = torch.tensor([0.0, 1.0, -1.0], requires_grad=True)
    with kg.policy(relu=1.0):
        eager = _node_names(f(x))
    dynamo.reset()
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    with kg.policy(relu=1.0):
        compiled(x)  # traced
        out = compiled(x)  # run
    # (compiled, the Block and Slopes nodes are named ApplyTemplateBackward)
    assert len(_node_names(out)) == len(eager) == 9, (_node_names(out), eager)
    out.backward()
    assert x.grad.tolist() == [2.0, 2.0, 0.0]


def test_the_policy_adds_few_guards():
    """Looking a callable up in a dict keyed by callables makes dynamo guard the whole
    key set whenever the lookup misses (torch.mul here, F.linear in any model): 122
    guards, evaluated at every call of the compiled code. The lookup by name guards the
    one name."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    def f(t):
        return torch.relu(torch.mul(t, 2.0)).sum()

    dynamo.reset()
    compiled = torch.compile(f, backend="eager")
    with kg.policy(relu=1.0):
        compiled(torch.zeros(3, requires_grad=True))
    guards = str(_debug_get_cache_entry_list(f.__code__)[0].guard_manager)
    assert guards.count("EQUALS_MATCH") < 20, guards


@pytest.mark.slow
def test_compiled_gradients_exact_with_nonfinite_upstream_gradients():
    """The uint8 masks saved under compile (`at_kinks.compact`) are turned back into a
    condition with an op that reads the upstream gradient; NaN, inf and -0.0 there, on
    kinks and off them, must give eager kinkgrad's gradient bit for bit (the sign of
    zero included: inductor merges the constants 0.0 and -0.0 of a kernel, so the -0.0
    the backward nodes fill with is computed, `at_kinks.minus_zero`)."""
    nan, inf = float("nan"), float("inf")
    g = torch.tensor([nan, inf, -inf, 1.0, nan, 2.0, -0.0, -0.0, -0.0, 0.0])
    x0 = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.5, -1.0, 0.0])

    def f(t):
        return (
            (torch.relu(t) * g).sum() + (torch.clamp(t, 0.0, 1.0) * g).sum() + (t.abs() * g).sum()
        )

    def grad(fn):
        x = x0.clone().requires_grad_(True)
        with kg.policy(relu=0.5, clamp=0.25, abs=1.0):
            fn(x).backward()
        return x.grad

    eager = grad(f)
    dynamo.reset()
    got = grad(torch.compile(f, backend="inductor", fullgraph=True))
    assert torch.equal(got.isnan(), eager.isnan())
    assert torch.equal(got.nan_to_num(), eager.nan_to_num())
    assert torch.equal(torch.signbit(got), torch.signbit(eager))
