"""An oracle for the differential fuzz, written independently of kinkgrad's catalog and
families: its own table of kink points and one-sided derivatives, its own tie rules
(brute force over Python lists), its own pooling windows.

What it states: forward values are plain PyTorch's, bit for bit; gradients are plain
PyTorch's except at elements exactly on a kink (ties: inputs of a tied, selected group or
window), where they are `g * ((1 - a) * D- + a * D+)` (ties: the rule's share of g).
Nothing here imports kinkgrad.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------
# Elementwise kink ops: name -> (call, in-place call or None, [(point, D-, D+), ...]).
# The in-place call takes the tensor to modify.
# --------------------------------------------------------------------------------------

ELEMENTWISE: dict[str, tuple] = {
    "relu": (torch.relu, torch.relu_, [(0.0, 0.0, 1.0)]),
    "relu/F": (F.relu, lambda z: F.relu(z, inplace=True), [(0.0, 0.0, 1.0)]),
    "relu/module": (torch.nn.ReLU(), torch.nn.ReLU(inplace=True), [(0.0, 0.0, 1.0)]),
    "relu6": (F.relu6, lambda z: F.relu6(z, inplace=True), [(0.0, 0.0, 1.0), (6.0, 1.0, 0.0)]),
    "leaky_relu": (
        lambda x: F.leaky_relu(x, 0.25),
        lambda z: F.leaky_relu_(z, 0.25),
        [(0.0, 0.25, 1.0)],
    ),
    "hardtanh": (
        lambda x: F.hardtanh(x, -2.0, 3.0),
        lambda z: F.hardtanh_(z, -2.0, 3.0),
        [(-2.0, 0.0, 1.0), (3.0, 1.0, 0.0)],
    ),
    "clamp": (
        lambda x: torch.clamp(x, -1.0, 2.0),
        lambda z: z.clamp_(-1.0, 2.0),
        [(-1.0, 0.0, 1.0), (2.0, 1.0, 0.0)],
    ),
    "clamp/min": (
        lambda x: torch.clamp_min(x, 0.5),
        lambda z: z.clamp_min_(0.5),
        [(0.5, 0.0, 1.0)],
    ),
    "clamp/clip": (
        lambda x: x.clip(max=1.5),
        lambda z: z.clip_(max=1.5),
        [(1.5, 1.0, 0.0)],
    ),
    "abs": (torch.abs, torch.abs_, [(0.0, -1.0, 1.0)]),
    "hardsigmoid": (
        F.hardsigmoid,
        lambda z: F.hardsigmoid(z, inplace=True),
        [(-3.0, 0.0, 1 / 6), (3.0, 1 / 6, 0.0)],
    ),
    "hardswish": (
        F.hardswish,
        lambda z: F.hardswish(z, inplace=True),
        [(-3.0, 0.0, -0.5), (3.0, 1.5, 1.0)],
    ),
    "softshrink": (lambda x: F.softshrink(x, 1.0), None, [(-1.0, 1.0, 0.0), (1.0, 0.0, 1.0)]),
}

#: The policy keyword a user writes for each entry (spellings reach the general name).
POLICY_NAME = {
    "relu/F": "relu",
    "relu/module": "relu",
    "clamp/min": "clamp",
    "clamp/clip": "clamp",
}

#: Values that put elements on every kink above, in every dtype.
POINTS = [0.0, -0.0, 0.25, 0.5, 1.0, -1.0, 1.5, 2.0, -2.0, 3.0, -3.0, 6.0]


def elementwise_coef(name: str, x: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(on_kink mask, coefficient per element) of ELEMENTWISE[name] at x under value a."""
    on = torch.zeros(x.shape, dtype=torch.bool)
    coef = torch.zeros(x.shape, dtype=torch.float64)
    xd = x.detach().to(torch.float64)
    for point, dm, dp in ELEMENTWISE[name][2]:
        hit = xd == point
        on = on | hit
        coef = torch.where(hit, (1 - a) * dm + a * dp, coef)
    return on, coef


# --------------------------------------------------------------------------------------
# Ties, by brute force over Python lists
# --------------------------------------------------------------------------------------


def _row_rule(xs: list[float], slots: list[tuple[float, float]], rule: str):
    """One row: inputs xs, output slots (value, upstream). Returns (grad, touched):
    touched marks inputs of tied groups that some slot selected."""
    n = len(xs)
    grad = [0.0] * n
    touched = [False] * n
    taken: dict[float, int] = {}
    for value, g in slots:
        if math.isnan(value):
            continue
        group = [i for i in range(n) if xs[i] == value]
        if not group:
            continue
        if len(group) > 1:
            for i in group:
                touched[i] = True
        if rule == "first":
            k = taken.get(value, 0)
            taken[value] = k + 1
            grad[group[min(k, len(group) - 1)]] += g
        else:
            for i in group:
                grad[i] += g / len(group)
    return grad, touched


def selection_expected(x: torch.Tensor, values: torch.Tensor, g: torch.Tensor, dim, rule: str):
    """Rule gradient and touched mask for an op selecting `values` from x along `dim`
    (dim None: over all elements; values/g then hold one slot each)."""
    xd = x.detach().to(torch.float64)
    vd = values.detach().to(torch.float64)
    gd = g.detach().to(torch.float64)
    if dim is None:
        slots = list(zip(vd.reshape(-1).tolist(), gd.reshape(-1).tolist(), strict=True))
        grad, touched = _row_rule(xd.reshape(-1).tolist(), slots, rule)
        return torch.tensor(grad).reshape(x.shape), torch.tensor(touched).reshape(x.shape)
    xm = xd.movedim(dim, -1)
    vm = vd.movedim(dim, -1)
    gm = gd.movedim(dim, -1)
    rows_x = xm.reshape(-1, xm.shape[-1]).tolist()
    rows_v = vm.reshape(-1, vm.shape[-1]).tolist()
    rows_g = gm.reshape(-1, gm.shape[-1]).tolist()
    grads, touched = [], []
    for rx, rv, rg in zip(rows_x, rows_v, rows_g, strict=True):
        gr, t = _row_rule(rx, list(zip(rv, rg, strict=True)), rule)
        grads.append(gr)
        touched.append(t)
    shape = xm.shape
    grad = torch.tensor(grads, dtype=torch.float64).reshape(shape).movedim(-1, dim)
    mask = torch.tensor(touched, dtype=torch.bool).reshape(shape).movedim(-1, dim)
    return grad, mask


def pool2d_expected(
    x: torch.Tensor,
    out: torch.Tensor,
    g: torch.Tensor,
    k: int,
    s: int,
    p: int,
    rule: str,
    kh: int | None = None,
):
    """max_pool2d(x [N, C, H, W], (kh, k), s, p): rule gradient and touched mask, brute
    force (kh defaults to k; kh=1 on [N, C, 1, L] is max_pool1d)."""
    kh = k if kh is None else kh
    xd = x.detach().to(torch.float64)
    N, C, H, W = xd.shape
    OH, OW = out.shape[-2:]
    grad = torch.zeros(xd.shape, dtype=torch.float64)
    touched = torch.zeros(xd.shape, dtype=torch.bool)
    vals = out.detach().to(torch.float64)
    gd = g.detach().to(torch.float64)
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    v = vals[n, c, oh, ow].item()
                    if math.isnan(v):
                        continue
                    members = [
                        (h, w)
                        for h in range(oh * s - p, oh * s - p + kh)
                        for w in range(ow * s - p, ow * s - p + k)
                        if 0 <= h < H and 0 <= w < W and xd[n, c, h, w].item() == v
                    ]
                    gv = gd[n, c, oh, ow].item()
                    if len(members) > 1:
                        for h, w in members:
                            touched[n, c, h, w] = True
                    if rule == "first":
                        h, w = members[0]
                        grad[n, c, h, w] += gv
                    else:
                        for h, w in members:
                            grad[n, c, h, w] += gv / len(members)
    return grad, touched
