"""The study's models: a ReLU MLP and a small ReLU CNN with max-pooling.

Both use plain `torch.nn.ReLU` / `F.max_pool*d`: the kink policy reaches them through
kinkgrad's interception, unmodified. Two switches change the numerics, not the maths:

- `bias="fused"` adds the bias inside the op (`F.linear`, `F.conv*d`: one rounding of
  x @ W.T + b); `bias="separate"` rounds x @ W.T first and adds b after. In low
  precision the second lands on exact zeros far more often (x @ W.T == -b exactly).
- `batchnorm=True` puts a BatchNorm layer before every ReLU.

Weights are drawn from an explicit `torch.Generator` in float64 and then rounded to
the run's precision, so every precision of a seed starts from the same weights.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Affine(nn.Module):
    """x @ W.T + b, fused (`F.linear`) or as a matmul followed by a separate add."""

    def __init__(self, n_in: int, n_out: int, bias: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in, dtype=torch.float64))
        self.bias = nn.Parameter(torch.empty(n_out, dtype=torch.float64))
        self.mode = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fused":
            return F.linear(x, self.weight, self.bias)
        return torch.matmul(x, self.weight.t()) + self.bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, bias={self.mode}"


class Conv(nn.Module):
    """3-wide convolution with padding 1 (1d or 2d), bias fused or added after."""

    def __init__(self, n_in: int, n_out: int, nd: int, bias: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in, *([3] * nd), dtype=torch.float64))
        self.bias = nn.Parameter(torch.empty(n_out, dtype=torch.float64))
        self.nd = nd
        self.mode = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d if self.nd == 2 else F.conv1d
        if self.mode == "fused":
            return conv(x, self.weight, self.bias, padding=1)
        return conv(x, self.weight, None, padding=1) + self.bias.view(-1, *([1] * self.nd))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, {self.nd}d, bias={self.mode}"


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class MaxPool(nn.Module):
    """2-wide max-pooling, 1d or 2d (the tie rule comes from the active policy)."""

    def __init__(self, nd: int) -> None:
        super().__init__()
        self.nd = nd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if self.nd == 2 else F.max_pool1d(x, 2)


def _bn(n: int, nd: int) -> nn.Module:
    return (nn.BatchNorm2d if nd == 2 else nn.BatchNorm1d)(n, dtype=torch.float64)


def mlp(shape: tuple[int, ...], classes: int, width: int, bias: str, batchnorm: bool):
    """Two hidden ReLU layers of `width` units."""
    n_in = math.prod(shape)
    layers: list[tuple[str, nn.Module]] = [("flat", Flatten())]
    for i, (a, b) in enumerate(((n_in, width), (width, width)), start=1):
        layers.append((f"fc{i}", Affine(a, b, bias)))
        if batchnorm:
            layers.append((f"bn{i}", _bn(b, 0)))
        layers.append((f"relu{i}", nn.ReLU()))
    layers.append(("out", Affine(width, classes, bias)))
    return nn.Sequential(OrderedDict(layers))


def cnn(shape: tuple[int, ...], classes: int, channels: int, bias: str, batchnorm: bool):
    """conv-ReLU-maxpool twice (`channels`, then 2 x `channels`), then a linear layer.
    2d for images (digits: 8x8 -> 4x4 -> 2x2), 1d for signals (MNIST-1D: 40 -> 10)."""
    nd = len(shape) - 1
    layers: list[tuple[str, nn.Module]] = []
    c_in, spatial = shape[0], list(shape[1:])
    for i, c_out in enumerate((channels, 2 * channels), start=1):
        layers.append((f"conv{i}", Conv(c_in, c_out, nd, bias)))
        if batchnorm:
            layers.append((f"bn{i}", _bn(c_out, nd)))
        layers.append((f"relu{i}", nn.ReLU()))
        layers.append((f"pool{i}", MaxPool(nd)))
        c_in, spatial = c_out, [s // 2 for s in spatial]
    layers.append(("flat", Flatten()))
    layers.append(("out", Affine(c_in * math.prod(spatial), classes, bias)))
    return nn.Sequential(OrderedDict(layers))


def build(
    kind: str,
    shape: tuple[int, ...],
    classes: int,
    *,
    width: int,
    channels: int,
    bias: str,
    batchnorm: bool,
    generator: torch.Generator,
) -> nn.Sequential:
    """A float64 model with weights drawn from `generator` (He-uniform weights,
    PyTorch-style uniform biases); cast it with `.to(dtype)`."""
    if kind == "mlp":
        model = mlp(shape, classes, width, bias, batchnorm)
    elif kind == "cnn":
        model = cnn(shape, classes, channels, bias, batchnorm)
    else:
        raise ValueError(f"unknown model {kind!r}; allowed: 'mlp', 'cnn'")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (Affine, Conv)):
                fan_in = m.weight[0].numel()
                bound = math.sqrt(6.0 / fan_in)
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
    return model


def first_layer(model: nn.Module) -> nn.Parameter:
    """The first layer's weight: what Bertoin et al.'s bifurcation test compares."""
    for m in model.modules():
        if isinstance(m, (Affine, Conv)):
            return m.weight
    raise ValueError("model has no Affine or Conv layer")


def last_layer(model: nn.Module) -> nn.Parameter:
    """The output layer's weight."""
    return [m for m in model.modules() if isinstance(m, (Affine, Conv))][-1].weight
