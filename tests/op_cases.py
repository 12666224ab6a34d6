"""Test-side description of every catalog op: how to call it, and (independently of the
catalog) where its kinks are and what a policy must give there.

A catalog op without an entry here fails `test_every_catalog_op_has_cases`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# name -> list of callables (x, y) -> output, using every call style worth covering.
# x, y are float tensors of the same shape; in-place styles work on a copy.
ELEMENTWISE = {
    "relu": [
        lambda x, y: torch.relu(x),
        lambda x, y: F.relu(x),
        lambda x, y: x.relu(),
        lambda x, y: (x * 1).relu_(),
        lambda x, y: F.relu(x * 1, inplace=True),
        lambda x, y: torch.nn.ReLU()(x),
        lambda x, y: torch.nn.ReLU(inplace=True)(x * 1),
    ],
    "relu6": [lambda x, y: F.relu6(x), lambda x, y: torch.nn.ReLU6()(x)],
    "leaky_relu": [lambda x, y: F.leaky_relu(x), lambda x, y: F.leaky_relu(x, 0.25)],
    "hardtanh": [lambda x, y: F.hardtanh(x), lambda x, y: torch.nn.Hardtanh(-2.0, 3.0)(x)],
    "clamp": [
        lambda x, y: torch.clamp(x, -1.0, 1.0),
        lambda x, y: x.clamp(min=0.0),
        lambda x, y: x.clip(max=0.5),
        lambda x, y: (x * 1).clamp_(-1.0, 2.0),
    ],
    "clamp_min": [lambda x, y: torch.clamp_min(x, 0.0)],
    "clamp_max": [lambda x, y: x.clamp_max(1.0)],
    "abs": [lambda x, y: torch.abs(x), lambda x, y: x.abs(), lambda x, y: abs(x)],
    "hardsigmoid": [lambda x, y: F.hardsigmoid(x)],
    "hardswish": [lambda x, y: F.hardswish(x)],
    "softshrink": [lambda x, y: F.softshrink(x), lambda x, y: F.softshrink(x, 1.0)],
}

# Tensor-bound clamps and binary ties have a second differentiable input.
BINARY = {
    "clamp": [lambda x, y: torch.clamp(x, min=y), lambda x, y: torch.clamp(x, max=y)],
    "maximum": [lambda x, y: torch.maximum(x, y), lambda x, y: torch.max(x, y)],
    "minimum": [lambda x, y: torch.minimum(x, y), lambda x, y: x.min(y)],
    "fmax": [lambda x, y: torch.fmax(x, y)],
    "fmin": [lambda x, y: torch.fmin(x, y)],
}


def kink_points(name: str, call_index: int) -> list[tuple[float, float, float]]:
    """(point, D-, D+) of ELEMENTWISE[name][call_index], stated independently."""
    table = {
        "relu": [(0.0, 0.0, 1.0)],
        "relu6": [(0.0, 0.0, 1.0), (6.0, 1.0, 0.0)],
        "leaky_relu": [(0.0, (0.01, 0.25)[min(call_index, 1)], 1.0)],
        "hardtanh": [
            [(-1.0, 0.0, 1.0), (1.0, 1.0, 0.0)],
            [(-2.0, 0.0, 1.0), (3.0, 1.0, 0.0)],
        ][min(call_index, 1)],
        "clamp": [
            [(-1.0, 0.0, 1.0), (1.0, 1.0, 0.0)],
            [(0.0, 0.0, 1.0)],
            [(0.5, 1.0, 0.0)],
            [(-1.0, 0.0, 1.0), (2.0, 1.0, 0.0)],
        ][min(call_index, 3)],
        "clamp_min": [(0.0, 0.0, 1.0)],
        "clamp_max": [(1.0, 1.0, 0.0)],
        "abs": [(0.0, -1.0, 1.0)],
        "hardsigmoid": [(-3.0, 0.0, 1 / 6), (3.0, 1 / 6, 0.0)],
        "hardswish": [(-3.0, 0.0, -0.5), (3.0, 1.5, 1.0)],
        "softshrink": [
            [(-0.5, 1.0, 0.0), (0.5, 0.0, 1.0)],
            [(-1.0, 1.0, 0.0), (1.0, 0.0, 1.0)],
        ][min(call_index, 1)],
    }
    return table[name]


def binary_coefs(name: str, call_index: int, rule_or_a) -> tuple:
    """At x == y: (d/dx, d/dy) of BINARY[name][call_index] under a policy value."""
    if name == "clamp":  # clamp(x, min=y): below y -> (0, 1), above -> (1, 0)
        a = rule_or_a
        if call_index == 0:
            return ((1 - a) * 0 + a * 1, (1 - a) * 1 + a * 0)
        return ((1 - a) * 1 + a * 0, (1 - a) * 0 + a * 1)  # clamp(x, max=y)
    return {"first": (1.0, 0.0), "split": (0.5, 0.5)}[rule_or_a]


# Selections: (callable, reference rows) builders over a 2-D input x, reducing dim 1.
SELECTION = {
    "max": [lambda x: torch.max(x, 1).values, lambda x: torch.max(x[0])],
    "min": [lambda x: x.min(dim=1, keepdim=True).values],
    "amax": [lambda x: torch.amax(x, 1)],
    "amin": [lambda x: torch.amin(x, dim=1, keepdim=True)],
    "sort": [lambda x: torch.sort(x, 1).values, lambda x: x.sort(dim=1, descending=True)[0]],
    "topk": [lambda x: torch.topk(x, 2, dim=1).values],
    "kthvalue": [lambda x: torch.kthvalue(x, 2, 1).values],
    "median": [lambda x: torch.median(x, 1).values, lambda x: torch.median(x[0])],
}

POOL = {
    "max_pool1d": [lambda x: F.max_pool1d(x.reshape(1, 1, -1), 2)],
    "max_pool2d": [
        lambda x: F.max_pool2d(x.unsqueeze(0), 2),
        lambda x: torch.nn.MaxPool2d(3, stride=1, padding=1)(x.unsqueeze(0)),
        lambda x: F.max_pool2d(x.unsqueeze(0), 2, return_indices=True)[0],
    ],
    "max_pool3d": [lambda x: F.max_pool3d(x.reshape(1, 1, *x.shape), (1, 2, 2))],
    "adaptive_max_pool1d": [lambda x: F.adaptive_max_pool1d(x.reshape(1, 1, -1), 3)],
    "adaptive_max_pool2d": [lambda x: torch.nn.AdaptiveMaxPool2d(2)(x.unsqueeze(0))],
    "adaptive_max_pool3d": [lambda x: F.adaptive_max_pool3d(x.reshape(1, 1, *x.shape), (1, 2, 2))],
}

JUMP = {
    "sign": [lambda x: torch.sign(x)],
    "heaviside": [lambda x: torch.heaviside(x, torch.full_like(x, 0.5))],
    "round": [lambda x: torch.round(x)],
    "floor": [lambda x: x.floor()],
    "ceil": [lambda x: torch.ceil(x)],
    "trunc": [lambda x: torch.trunc(x)],
    "hardshrink": [lambda x: F.hardshrink(x)],
    "threshold": [lambda x: F.threshold(x, 1.0, -2.0)],
}

ALL_NAMES = set(ELEMENTWISE) | set(BINARY) | set(SELECTION) | set(POOL) | set(JUMP)
