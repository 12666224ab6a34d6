"""Policy scoping, attachment, call styles, autograd modes and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kinkgrad as kg


def zeros(n=3, dtype=torch.float32):
    return torch.zeros(n, dtype=dtype, requires_grad=True)


def relu_grad(fn, x=None):
    x = zeros() if x is None else x
    fn(x).sum().backward()
    return x.grad


def test_default_is_plain_pytorch():
    assert torch.equal(relu_grad(torch.relu), torch.zeros(3))


@pytest.mark.parametrize(
    "value,expected",
    [
        (1.0, 1.0),
        (0.0, 0.0),
        (0.25, 0.25),
        ("right", 1.0),
        ("left", 0.0),
        ("mid", 0.5),
        (50.0, 50.0),
        (-1.0, -1.0),
    ],
)
def test_numeric_values_and_aliases(value, expected):
    with kg.policy(relu=value):
        x = zeros()
        y = torch.relu(x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    # The upstream gradient is multiplied, never replaced by a constant.
    assert torch.equal(x.grad, expected * torch.tensor([1.0, 2.0, 3.0]))


def test_nesting_inner_wins_per_op():
    x = torch.tensor([0.0], requires_grad=True)
    with kg.policy(relu=1.0, abs="right"):
        with kg.policy(relu=0.5):
            y = torch.relu(x) + torch.abs(x)
        z = torch.relu(x)
    (y + z).sum().backward()
    assert x.grad.item() == 0.5 + 1.0 + 1.0


def test_default_applies_to_every_kink_op_but_names_win_in_the_same_frame():
    x = torch.tensor([0.0], requires_grad=True)
    with kg.policy(default=1.0, abs=0.0):
        y = torch.relu(x) + F.relu6(x) + torch.abs(x)
    y.sum().backward()
    assert x.grad.item() == 1.0 + 1.0 - 1.0


def test_policy_is_captured_at_forward_time():
    x = zeros()
    with kg.policy(relu=1.0):
        y = torch.relu(x)
    with kg.policy(relu=0.0):  # a later block does not change a recorded graph
        y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_policy_exits_on_exception():
    with pytest.raises(ZeroDivisionError), kg.policy(relu=1.0):
        raise ZeroDivisionError("inside the block")
    assert torch.equal(relu_grad(torch.relu), torch.zeros(3))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return F.relu(self.act(self.lin(x))) + torch.clamp(x, min=0.0)


def test_attach_detach_and_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].lin.weight.zero_()
        model[0].lin.bias.zero_()  # every hidden pre-activation is exactly 0
    x = torch.zeros(2, 3, requires_grad=True)
    model(x).sum().backward()
    plain_w = model[0].lin.weight.grad.clone()
    assert torch.equal(plain_w, torch.zeros(3, 3))
    kg.attach(model, relu=1.0)
    assert kg.attached(model) == {"relu": 1.0}
    model.zero_grad()
    model(x).sum().backward()
    assert model[0].lin.bias.grad.abs().sum() > 0  # ReLU'(0) = 1 lets gradient through
    kg.detach(model)
    model.zero_grad()
    model(x).sum().backward()
    assert torch.equal(model[0].lin.bias.grad, torch.zeros(3))


def test_attached_submodule_wins_inside_it():
    inner = nn.ReLU()
    outer = nn.Sequential(nn.Identity(), inner)
    kg.attach(inner, relu=0.5)
    try:
        with kg.policy(relu=1.0):
            x = zeros()
            y = outer(x) + torch.relu(x)
        y.sum().backward()
        assert torch.equal(x.grad, torch.full((3,), 1.5))
    finally:
        kg.detach(inner)


def test_every_call_style_reaches_the_policy():
    styles = {
        "torch.relu": torch.relu,
        "F.relu": F.relu,
        "Tensor.relu": lambda x: x.relu(),
        "relu_": lambda x: (x * 1).relu_(),
        "torch.relu_": lambda x: torch.relu_(x * 1),
        "F.relu inplace": lambda x: F.relu(x * 1, inplace=True),
        "nn.ReLU": nn.ReLU(),
        "nn.ReLU inplace": lambda x: nn.ReLU(inplace=True)(x * 1),
    }
    for name, fn in styles.items():
        with kg.policy(relu=1.0):
            x = zeros()
            y = fn(x)
        y.sum().backward()
        assert torch.equal(x.grad, torch.ones(3)), name
    clamps = {
        "torch.clamp": lambda x: torch.clamp(x, min=0.0),
        "Tensor.clamp": lambda x: x.clamp(0.0),
        "clamp_": lambda x: (x * 1).clamp_(min=0.0),
        "clip": lambda x: torch.clip(x, 0.0, 1.0),
        "clamp_min": lambda x: x.clamp_min(0.0),
    }
    for name, fn in clamps.items():
        op = "clamp_min" if name == "clamp_min" else "clamp"
        with kg.policy(**{op: 0.0}):  # PyTorch says 1 at the lower bound
            x = zeros()
            y = fn(x)
        y.sum().backward()
        assert torch.equal(x.grad, torch.zeros(3)), name
    for name, fn in {
        "F.hardtanh": lambda x: F.hardtanh(x - 1),
        "nn.Hardtanh": nn.Hardtanh(),
    }.items():
        with kg.policy(hardtanh=1.0):
            x = torch.tensor([-1.0, 1.0], requires_grad=True) if name == "nn.Hardtanh" else zeros()
            y = fn(x)
        y.sum().backward()
        assert bool((x.grad != 0).any()), name


def test_max_pool_with_indices_and_module():
    for fn in (lambda x: F.max_pool2d(x, 2, return_indices=True)[0], nn.MaxPool2d(2)):
        x = torch.ones(1, 1, 2, 2, requires_grad=True)
        with kg.policy(max_pool2d="split"):
            y = fn(x)
        y.sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, 0.25))


def test_relu6_module_is_relu6_not_hardtanh():
    x = torch.tensor([0.0, 6.0], requires_grad=True)
    with kg.policy(relu6=1.0, hardtanh=0.0):
        nn.ReLU6()(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0]))


def test_no_grad_records_nothing_and_autocast():
    with kg.policy(relu=1.0), torch.no_grad():
        y = torch.relu(zeros())
    assert y.grad_fn is None
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    x = torch.randn(2, 4)
    with kg.policy(relu=1.0), torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.relu(lin(x))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert torch.equal(lin.bias.grad, torch.full((4,), 2.0))


def test_double_backward_is_correct():
    # g(v) = relu'(x) * v; d/dv <g, w> = relu'(x) * w must carry the policy's value.
    x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    v = torch.ones(3, requires_grad=True)
    with kg.policy(relu=0.25):
        y = torch.relu(x)
    (g,) = torch.autograd.grad(y, x, v, create_graph=True)
    assert torch.equal(g, torch.tensor([0.0, 0.25, 1.0]))
    (gv,) = torch.autograd.grad((g * torch.tensor([1.0, 2.0, 3.0])).sum(), v)
    assert torch.equal(gv, torch.tensor([0.0, 0.5, 3.0]))
    # and through a tie op
    z = torch.tensor([[2.0, 2.0]], requires_grad=True)
    u = torch.ones(1, requires_grad=True)
    with kg.policy(max="split"):
        m = torch.max(z, 1).values
    (gz,) = torch.autograd.grad(m, z, u, create_graph=True)
    assert torch.equal(gz, torch.tensor([[0.5, 0.5]]))
    (gu,) = torch.autograd.grad(gz.sum(), u)
    assert torch.equal(gu, torch.tensor([1.0]))


def test_functional_forms_and_modules():
    x = zeros()
    kg.relu(x, kink=1.0).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    x = zeros()
    kg.nn.ReLU(kink="mid")(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 0.5))
    im = torch.ones(1, 1, 2, 2, requires_grad=True)
    kg.nn.MaxPool2d(2, ties="split")(im).sum().backward()
    assert torch.equal(im.grad, torch.full_like(im, 0.25))
    a, b = zeros(1), zeros(1)
    kg.maximum(a, b, ties="first").sum().backward()
    assert (a.grad.item(), b.grad.item()) == (1.0, 0.0)
    s = torch.tensor([0.3, -2.0], requires_grad=True)
    kg.sign(s, jump="ste").sum().backward()
    assert torch.equal(s.grad, torch.ones(2))
    h = torch.tensor([0.0, 1.0], requires_grad=True)
    kg.heaviside(h, torch.tensor(0.5), jump="zero").sum().backward()
    assert torch.equal(h.grad, torch.zeros(2))


def test_composites_depend_on_the_fixed_choice():
    # relu(x) - relu(-x) = x; with ReLU'(0) = a backprop returns a + a = 2a at 0, so
    # PyTorch's 0 (and 1, giving 2) leave the Clarke set {1}; only "mid" lands on it.
    for a in (0.0, 0.5, 1.0):
        with kg.policy(relu=a):
            x = torch.zeros((), requires_grad=True)
            y = torch.relu(x) - torch.relu(-x)
        y.backward()
        assert x.grad.item() == 2 * a


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rellu": 1.0}, "unknown op 'rellu'.*did you mean 'relu'"),
        ({"relu": "first"}, "'relu'.*'first' is not allowed"),
        ({"relu": float("nan")}, "not finite"),
        ({"relu": float("inf")}, "not finite"),
        ({"relu": [1.0]}, "got \\[1.0\\] of type list"),
        ({"relu": True}, "type bool"),
        ({"abs": 2.0}, "'abs'.*outside the catalog's range.*\\[0, 1\\]"),
        ({"max_pool2d": 0.5}, "'max_pool2d'.*only meaningful for elementwise kink ops"),
        ({"sign": "first"}, "'sign'.*allowed: 'zero', 'ste'"),
        ({"default": "banana"}, "default='banana' fits no op kind"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match), kg.policy(**kwargs):
        pass


def test_bad_input_elsewhere():
    with pytest.raises(TypeError, match="nn.Module"):
        kg.attach(lambda x: x, relu=1.0)
    with pytest.raises(ValueError, match="'banana' is not allowed"):
        kg.relu(zeros(), kink="banana")
    with pytest.raises(ValueError, match="did you mean"):
        kg.attach(nn.ReLU(), reluu=1.0)


def test_directional_needs_certification():
    with pytest.raises(RuntimeError, match="certified"), kg.policy(relu="directional"):
        torch.relu(zeros())


def test_policy_block_is_a_reusable_context_manager_and_decorator():
    """`policy(...)` validates when called, yields the read-only frame, nests with itself,
    and decorates functions (as the generator-based version did)."""
    with pytest.raises(ValueError, match="relu"):
        kg.policy(relu="sideways")  # refused before any block is entered
    block = kg.policy(relu=1.0)
    x = torch.zeros(2, requires_grad=True)
    with block as frame:
        assert frame["relu"] == 1.0
        with pytest.raises(TypeError):
            frame["relu"] = 0.0  # type: ignore[index]
        with block:  # the same block again, nested
            y = torch.relu(x).sum()
        z = torch.relu(x).sum()  # still inside the outer use
    (y + z).backward()
    assert x.grad.tolist() == [2.0, 2.0]

    @kg.policy(relu=1.0)
    def decorated(t):
        return torch.relu(t).sum()

    x.grad = None
    decorated(x).backward()
    assert x.grad.tolist() == [1.0, 1.0]
    x.grad = None
    torch.relu(x).sum().backward()  # outside: plain again
    assert x.grad.tolist() == [0.0, 0.0]
