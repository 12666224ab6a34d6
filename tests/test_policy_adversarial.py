"""Adversarial cases from an independent review of issue 8: each once gave a silently
wrong gradient (or is a guard against one). Expected values are written by hand."""

from __future__ import annotations

import pytest
import torch

import kinkgrad as kg
from kinkgrad.at_kinks import force_lazy


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().contiguous().view(ints[t.element_size()])


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("op", [torch.maximum, torch.fmax])
def test_integer_first_argument_of_maximum_gets_the_policy(lazy, op):
    # maximum(int, float) computes in float; at the tie a == b the rule "first" gives the
    # whole gradient to a (an integer: nothing), so b's gradient is 0 there, not 0.5.
    a = torch.tensor([1, 2, 3])
    b = torch.tensor([1.0, 5.0, 0.0], requires_grad=True)
    with force_lazy(lazy), kg.policy(maximum="first", fmax="first"):
        y = op(a, b)
    assert torch.equal(_bits(y), _bits(op(a, b.detach())))
    y.sum().backward()
    assert b.grad.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("lazy", [False, True])
def test_integer_second_argument_of_minimum_gets_the_policy(lazy):
    a = torch.tensor([1.0, 5.0, 0.0], requires_grad=True)
    b = torch.tensor([1, 2, 3], dtype=torch.int32)
    with force_lazy(lazy), kg.policy(minimum="first"):
        y = torch.minimum(a, b)
    assert y.dtype == torch.float32 and torch.equal(y, torch.minimum(a.detach(), b))
    y.sum().backward()
    assert a.grad.tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("a,expected", [(0.0, [1.0, 1.0, 0.0]), (1.0, [1.0, 0.0, 0.0])])
def test_clamp_of_an_integer_tensor_by_a_learned_bound(lazy, a, expected):
    # clamp(x, min=m) with x integer: at x == m the left piece (a = 0) is m, the right x.
    x = torch.tensor([0, 1, 2])
    m = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    with force_lazy(lazy), kg.policy(clamp=a):
        y = torch.clamp(x, min=m)
    assert torch.equal(y, torch.clamp(x, min=m.detach()))
    y.sum().backward()
    assert m.grad.tolist() == expected


def test_integer_promotion_follows_pytorch_for_zero_dim_bounds():
    x = torch.tensor([0, 1, 2])
    m = torch.tensor(1.0, dtype=torch.float16, requires_grad=True)
    with kg.policy(clamp=0.0):
        y = torch.clamp(x, min=m)
    assert y.dtype == torch.clamp(x, min=m.detach()).dtype == torch.float16
    y.sum().backward()
    assert m.grad.item() == 2.0


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
def test_softshrink_kink_is_where_its_forward_has_it_in_low_precision(lazy, a):
    # softshrink compares float16/bfloat16 inputs with float32(lambd). float16(0.1) is
    # below 0.1 (dead zone: slope 0), bfloat16(0.1) above (forward x - 0.1 != 0): neither
    # is a kink, so no policy value may change PyTorch's gradient there.
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.tensor([0.1, -0.1, 0.5, -0.5], dtype=dtype, requires_grad=True)
        with force_lazy(lazy), kg.policy(softshrink=a):
            y = torch.nn.functional.softshrink(x, 0.1)
        y.sum().backward()
        ref = x.detach().clone().requires_grad_(True)
        torch.nn.functional.softshrink(ref, 0.1).sum().backward()
        assert torch.equal(x.grad, ref.grad), dtype
    # 0.5 is exact in every dtype: a kink, where the policy applies.
    x = torch.tensor([0.5, -0.5], dtype=torch.bfloat16, requires_grad=True)
    with force_lazy(lazy), kg.policy(softshrink=a):
        torch.nn.functional.softshrink(x, 0.5).sum().backward()
    assert x.grad.tolist() == [a, 1.0 - a]


def test_threshold_jump_is_where_its_forward_has_it_in_low_precision():
    # float16(0.1) < float32(0.1): threshold returns `value` there, a flat piece, so the
    # straight-through surrogate (slope 1 only at the jump) must not apply.
    x = torch.tensor([0.1, 0.5], dtype=torch.float16, requires_grad=True)
    with kg.policy(threshold="ste"):
        y = torch.nn.functional.threshold(x, 0.1, -1.0)
    assert y.tolist() == [-1.0, 0.5]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0]
    x = torch.tensor([0.1], dtype=torch.float32, requires_grad=True)  # on the jump
    with kg.policy(threshold="ste"):
        torch.nn.functional.threshold(x, 0.1, -1.0).sum().backward()
    assert x.grad.tolist() == [1.0]


@pytest.mark.parametrize(
    "name,fn,x,expected",
    [
        ("sign", torch.sign, [[0.0, 1.0], [2.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]),
        (
            "hardshrink",
            lambda t: torch.nn.functional.hardshrink(t, 0.5),
            [[0.5, 1.0], [0.2, -0.5]],
            [[1.0, 1.0], [0.0, 1.0]],
        ),
        (
            "threshold",
            lambda t: torch.nn.functional.threshold(t, 0.5, -1.0),
            [[0.5, 1.0], [0.2, -0.5]],
            [[1.0, 1.0], [0.0, 0.0]],
        ),
    ],
)
def test_jump_surrogates_under_torch_func(name, fn, x, expected):
    # Once an old-style autograd.Function: torch.func refused it (not kinkgrad's error).
    x = torch.tensor(x)
    with kg.policy(**{name: "ste"}):
        per_row = torch.func.vmap(torch.func.grad(lambda r: fn(r).sum()))(x)
        whole = torch.func.grad(lambda t: fn(t).sum())(x)
    assert per_row.tolist() == expected
    assert whole.tolist() == expected


@pytest.mark.parametrize("lazy", [False, True])
def test_in_place_on_a_view_gives_equal_gradients_up_to_the_sign_of_zero(lazy):
    # Documented in at_kinks.py: with the nodes inserted, an in-place op on a view turns
    # -0.0 gradient elements of the base into +0.0. Values must still equal PyTorch's
    # off the kink, and the policy's on it; out of place, the bits are PyTorch's.
    x = torch.tensor([-1.0, 2.0, -3.0, 0.0, 5.0, -2.0])
    g = torch.tensor([-0.0, -0.0, -0.0, 1.0, -0.0, 2.0])

    def grad(fn, policy):
        t = x.clone().requires_grad_(True)
        with force_lazy(lazy), kg.policy(**policy):
            y = fn(t)
        (y * g).sum().backward()
        return t.grad

    def on_view(t):
        y = t * 1.0
        y[1:].relu_()
        return y

    ours, plain = grad(on_view, {"relu": 1.0}), grad(on_view, {})
    assert torch.equal(ours[[0, 1, 2, 4, 5]], plain[[0, 1, 2, 4, 5]])  # == : -0.0 == 0.0
    assert ours[3].item() == 1.0 and plain[3].item() == 0.0
    assert torch.signbit(plain[0]) and not torch.signbit(ours[0])  # the documented case
    ours, plain = grad(torch.relu, {"relu": 1.0}), grad(torch.relu, {})
    keep = torch.tensor([True, True, True, False, True, True])
    assert torch.equal(_bits(ours[keep]), _bits(plain[keep]))


@pytest.mark.parametrize(
    "name,fn,value",
    [
        ("relu", torch.relu, 1.0),
        ("clamp", lambda t: torch.clamp(t, min=0.0), 0.0),
        ("sort", lambda t: torch.sort(t).values, "split"),
        ("max_pool1d", lambda t: torch.nn.functional.max_pool1d(t[None], 2)[0], "split"),
        ("sign", torch.sign, "ste"),
    ],
)
@pytest.mark.parametrize("mode", ["jvp", "jacfwd", "dual"])
def test_forward_mode_is_refused_loudly(name, fn, value, mode):
    # Policies are reverse-mode nodes: a tangent would silently get PyTorch's derivative
    # at the kink (jvp of relu at 0 gave 0 under relu=1.0).
    x, t = torch.tensor([0.0, 0.0, 1.0, -1.0]), torch.ones(4)
    with kg.policy(**{name: value}), pytest.raises(RuntimeError, match="kinkgrad: .*forward-mode"):
        if mode == "jvp":
            torch.func.jvp(fn, (x,), (t,))
        elif mode == "jacfwd":
            torch.func.jacfwd(fn)(x)
        else:
            import torch.autograd.forward_ad as fwAD

            with fwAD.dual_level():
                fn(fwAD.make_dual(x, t))


def test_forward_mode_still_runs_where_the_policy_is_pytorchs():
    x, t = torch.tensor([0.0, 1.0]), torch.ones(2)
    with kg.policy(relu="torch", sign="zero"):
        assert torch.func.jvp(torch.relu, (x,), (t,))[1].tolist() == [0.0, 1.0]
        assert torch.func.jvp(torch.sign, (x,), (t,))[1].tolist() == [0.0, 0.0]
    # reverse mode under the same policy that forward mode refuses
    with kg.policy(relu=1.0):
        assert torch.func.jacrev(torch.relu)(x).diagonal().tolist() == [1.0, 1.0]


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("msort", [torch.msort, torch.Tensor.msort])
def test_msort_is_a_spelling_of_sort(lazy, msort):
    # msort(x) == sort(x, dim=0).values; it ran as plain PyTorch under sort="split".
    x = torch.tensor([[1.0, 2.0], [1.0, 0.0], [3.0, 0.0]], requires_grad=True)
    with force_lazy(lazy), kg.policy(sort="split"):
        y = msort(x)
    assert torch.equal(y, torch.sort(x.detach(), dim=0).values)
    (y * torch.tensor([[1.0], [2.0], [4.0]])).sum().backward()
    assert x.grad.tolist() == [[1.5, 4.0], [1.5, 1.5], [4.0, 1.5]]


@pytest.mark.parametrize("lazy", [False, True])
def test_adaptive_max_pool3d_gets_the_policy(lazy):
    # Not in the catalog before: it ran as plain PyTorch under any policy.
    torch.manual_seed(0)
    x = torch.randint(0, 2, (2, 3, 4, 5, 6)).float()
    g = torch.randn(2, 3, 2, 3, 4)
    ref = x.clone().requires_grad_(True)
    (torch.nn.functional.adaptive_max_pool3d(ref, (2, 3, 4)) * g).sum().backward()
    for rule in ("first", "split"):
        t = x.clone().requires_grad_(True)
        with force_lazy(lazy), kg.policy(adaptive_max_pool3d=rule):
            y = torch.nn.AdaptiveMaxPool3d((2, 3, 4))(t)
        assert torch.equal(y, torch.nn.functional.adaptive_max_pool3d(x, (2, 3, 4)))
        (y * g).sum().backward()
        if rule == "first":  # PyTorch's own rule: first tied element in scan order
            assert torch.equal(_bits(t.grad), _bits(ref.grad))
        else:  # a window of 0/1 values, all tied: each gets an equal share
            assert not torch.equal(t.grad, ref.grad)
            assert torch.allclose(t.grad.sum(), g.sum())


class _Block(torch.nn.Module):
    """ResNet BasicBlock: conv-bn-relu-conv-bn, `out += identity`, relu (one module)."""

    def __init__(self, relu: torch.nn.Module) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(4)
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(4)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        out += x
        return self.relu(out)


class _HandReLU(torch.nn.Module):
    """relu with derivative `a` at 0, written out: the independent computation."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        on = (z == 0).to(z.dtype)
        return torch.where(z > 0, z, torch.zeros_like(z)) + self.a * (z - z.detach()) * on


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
def test_resnet_block_with_in_place_relu_matches_a_hand_written_policy(lazy, a):
    torch.manual_seed(1)
    net = _Block(torch.nn.ReLU(inplace=True))
    with torch.no_grad():  # exact zeros at both ReLUs: dead channels, identity residual
        net.c1.weight[:2] = 0
        net.c2.weight.zero_()
        net.c2.weight[0, 0, 1, 1] = 1.0
    hand = _Block(_HandReLU(a))
    hand.load_state_dict(net.state_dict())
    x = (torch.randn(2, 4, 5, 5) * 2).round() / 2
    g = torch.randn(2, 4, 5, 5)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with force_lazy(lazy), kg.policy(relu=a):
        y1 = net(x1)
    y2 = hand(x2)
    assert torch.equal(_bits(y1), _bits(y2))
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    for p, q in zip(net.parameters(), hand.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    assert int((x == 0).sum()) > 0  # the second ReLU sits on its kink


@pytest.mark.parametrize("lazy", [False, True])
def test_gradient_penalty_through_a_policy(lazy):
    # f(w) = || d/dx sum(relu(w * x)) ||^2 with kinks at x = 0: d/dx = w * relu'(w x).
    x = torch.tensor([0.0, 1.0, -1.0, 0.0], requires_grad=True)
    w = torch.tensor([2.0, 3.0, 1.0, -1.0], requires_grad=True)
    with force_lazy(lazy), kg.policy(relu=1.0):
        y = torch.relu(w * x).sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    (gx**2).sum().backward()
    assert gx.tolist() == [2.0, 3.0, 0.0, -1.0]
    assert w.grad.tolist() == [4.0, 6.0, 0.0, -2.0]


@pytest.mark.parametrize("lazy", [False, True])
def test_tie_policy_survives_retain_graph_and_a_second_backward(lazy):
    x = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]], requires_grad=True)
    with force_lazy(lazy), kg.policy(max="split"):
        v = torch.max(x, dim=1).values
    loss = (v * torch.tensor([1.0, 3.0])).sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert first.tolist() == [[0.5, 0.5, 0.0], [1.0, 1.0, 1.0]]
    assert torch.equal(x.grad, 2 * first)
