"""Immaterial kinks: ties (and elementwise kinks) that a random direction leaves
undecided because the tied inputs' tangents agree. On the piece the direction enters
their gradients are then equal (with probability one), so every choice gives the same
gradient: the result is certified. Shown here against the limit gradient computed
independently (plain backprop at x + t d, t tiny, float64, and under another tie
rule), and measured on torchvision-style ResNet / VGG blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kinkgrad as kg

D = torch.float64


def plain_grad_at(f, xs, ds, t):
    """grad f(x + t d) by plain backprop (PyTorch's choices at any tie left)."""
    q = [(x.detach() + t * d).requires_grad_() for x, d in zip(xs, ds, strict=True)]
    return torch.autograd.grad(f(*q), q)


def _blank_cnn(seed: int):
    """conv -> relu -> max-pool on images that are blank (zero) except a square:
    windows over the background tie at relu's 0 with equal (zero) tangents."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 1, 3, 3, generator=g, dtype=D)
    b = torch.tensor([-0.5, 0.0, 0.3], dtype=D)  # channel 0: relu(-0.5) = 0 on blanks
    x = torch.zeros(2, 1, 10, 10, dtype=D)
    x[:, :, 3:6, 4:8] = torch.rand(2, 1, 3, 4, generator=g, dtype=D)
    c = torch.randn(2, 3, 4, 4, generator=g, dtype=D)

    def f(w, b):
        h = F.relu(F.conv2d(x, w, b))  # [2, 3, 8, 8]
        return (c * F.max_pool2d(h, 2)).sum()

    return f, [w.requires_grad_(), b.requires_grad_()]


def test_blank_windows_are_immaterial_and_the_gradient_is_the_limit_gradient():
    for seed in range(4):
        f, params = _blank_cnn(seed)
        r = kg.certified_grad(f, *params, seed=seed)
        assert r.immaterial > 0 and r.unresolved == 0 and r.certified
        assert r.directions_used == 2  # the lexicographic second direction separates none
        # x + t d keeps the blank windows tied (their inputs do not move): plain
        # backprop there picks the first element, the "split" rule shares equally;
        # both equal the certified gradient, because the tied inputs' gradients agree
        ds = r.directions[0]
        ref = plain_grad_at(f, params, ds, 1e-9)
        with kg.policy(max_pool2d="split"):
            split = plain_grad_at(f, params, ds, 1e-9)
        for a, b, s in zip(r.grads, ref, split, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(a, s, rtol=1e-6, atol=1e-9)


def test_duplicated_inputs_tie_immaterially():
    """max over (x, x): the two tied copies have the same gradient."""
    x = torch.tensor([0.5, -1.0, 2.0], dtype=D, requires_grad=True)
    f = lambda x: (F.max_pool1d(torch.stack([x, x], -1).reshape(1, 1, 6), 2) * 3).sum()
    r = kg.certified_grad(f, x, seed=0)
    assert r.immaterial == 3 and r.certified
    assert torch.equal(r.grad, torch.full((3,), 3.0, dtype=D))


def test_ties_with_different_gradients_are_decided_not_immaterial():
    """max(x0, x1) at x0 = x1: the tangents differ along a random direction, so the
    direction decides; the result is the gradient at x + t d, where the tie is broken."""
    for seed in range(6):
        x = torch.zeros(2, dtype=D, requires_grad=True)
        f = lambda x: torch.max(x * torch.tensor([1.0, 2.0], dtype=D))
        r = kg.certified_grad(f, x, seed=seed)
        assert r.immaterial == 0 and r.kinks_hit == 1 and r.certified
        (ref,) = plain_grad_at(f, [x], r.directions[0], 1e-9)
        assert torch.equal(r.grad, ref)


def test_an_elementwise_kink_whose_input_does_not_move_is_immaterial():
    """relu(z) with z = 0 constant along every direction (z = w * 0): any relu'(0)
    times dz = 0 gives 0; certified, and equal to plain backprop under either value."""
    w = torch.tensor([1.5, -2.0], dtype=D, requires_grad=True)
    f = lambda w: (torch.relu(w * 0.0) * 4 + w).sum()
    r = kg.certified_grad(f, w, seed=0)
    assert r.immaterial == 2 and r.unresolved == 0 and r.certified  # z has a zero tangent
    for v in (0.0, 1.0):
        with kg.policy(relu=v):
            (g,) = torch.autograd.grad(f(w), w)
        assert torch.equal(r.grad, g)


# --------------------------------------------------------------------------------------
# torchvision-style blocks, built by hand
# --------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock (stride 1, no downsample)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


def resnet_stem(c: int = 4, classes: int = 10) -> nn.Module:
    # torchvision's stem (conv, BN, ReLU(inplace), max-pool 3/2/1), one BasicBlock, head
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
        BasicBlock(c),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, classes),
    )


def vgg_block(c: int = 4, classes: int = 10) -> nn.Module:
    # torchvision's VGG features: conv3x3 + ReLU(inplace), max-pool 2/2
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(c, 2 * c, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(2 * c * 16, classes),
    )


def digit_like(batch: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 images blank except a random stroke area (a digit's blank background)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(batch, 1, 16, 16)
    x[:, :, 4:12, 5:11] = torch.rand(batch, 1, 8, 6, generator=g)
    x = x * (torch.rand(x.shape, generator=g) > 0.4)
    return x.to(dtype), torch.randint(0, 10, (batch,), generator=g)


def certified_shares(make, dtype: torch.dtype, steps: int = 3) -> tuple[float, float, int]:
    """(share certified now, share with no immaterial kink (= the old criterion),
    immaterial kinks) over `steps` SGD steps of certified training."""
    torch.manual_seed(0)
    model = make().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = lambda m, x, y: F.cross_entropy(m(x), y)
    now = old = immaterial = 0
    for step in range(steps):
        x, y = digit_like(16, step, dtype)
        opt.zero_grad()
        res = kg.certified_backward(loss, model, x, y, seed=step)
        opt.step()
        now += res.certified
        old += res.certified and res.immaterial == 0
        immaterial += res.immaterial
    return now / steps, old / steps, immaterial


def test_resnet_and_vgg_blocks_certify_every_step():
    for make in (resnet_stem, vgg_block):
        for dtype in (D, torch.float32):
            now, old, immaterial = certified_shares(make, dtype)
            assert now == 1.0, (make.__name__, dtype)
            # the blank background ties in the max-pools: immaterial; under the old
            # criterion (every kink decided by a direction) no step was certified
            assert immaterial > 0 and old == 0.0, (make.__name__, dtype, old)


@pytest.mark.parametrize("make", [vgg_block, resnet_stem])
def test_block_certified_gradient_is_the_limit_gradient(make):
    """float64 blocks: the certified step's gradient equals plain backprop at
    params + t d (t -> 0 from t = 1e-9 and 2e-9), where decided ties are broken and
    immaterial ones stay."""
    torch.manual_seed(1)
    model = make().to(D)
    x, y = digit_like(8, 0, D)
    names = [n for n, _ in model.named_parameters()]
    res = kg.certified_backward(lambda m, x, y: F.cross_entropy(m(x), y), model, x, y, seed=3)
    assert res.certified and res.immaterial > 0
    grads = [p.grad.clone() for p in model.parameters()]
    d = res.direction
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(*ps):
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))
        return F.cross_entropy(out, y)

    ps, ds = [params[n] for n in names], [d[n] for n in names]
    # linear extrapolation to t = 0 from t and 2t removes the O(t) term of the smooth parts
    g1, g2 = plain_grad_at(f, ps, ds, 1e-9), plain_grad_at(f, ps, ds, 2e-9)
    ref = [2 * a - b for a, b in zip(g1, g2, strict=True)]
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
