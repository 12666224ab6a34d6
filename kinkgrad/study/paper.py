"""The paper's bifurcation experiment (Bertoin et al., NeurIPS 2021, section 3), exactly.

For each initialisation theta of a ReLU MLP (784-n-...-n-10, PyTorch's default
`nn.Linear` init with biases, drawn in float32 and then cast to the precision), the
weights stay frozen and one pass over the data in a fixed order runs two copies: one
with ReLU'(0) = 0, one with ReLU'(0) = 1 (kinkgrad policies). Like the paper's code
(`notebooks/volume_estimation_by_architecture.ipynb` in deel-ai/relu-prime), the loss is
the mean cross-entropy, the gradients *accumulate* in `.grad` over the minibatches (the
notebook never zeroes them), and after each minibatch the first-layer weight gradients
are compared (`!=` elementwise: -0 equals +0, as in the paper's `abs().sum() != 0`).
theta is "in S" as soon as one comparison differs; the pass stops computing
gradients there.

Why it is cheap: a minibatch whose ReLU inputs hold no exact zero gives both copies the
same gradient bit for bit (the policies differ only at inputs equal to 0), so their
accumulated gradients stay equal. Per minibatch we therefore run the reference copy's
forward and backward (its accumulated gradient is needed: adding a differing minibatch
gradient to it can round the difference away), count exact zeros in the ReLU inputs of
that same forward, and run the second copy only when that count is positive.
`tests/test_study_paper.py` checks this shortcut against two full copies.

Counting: a direct `(z == 0).sum()` on each layer's pre-activation inside our own
forward. It is one comparison per element of a tensor we already hold, so it costs
nothing next to the matmul, and it counts exactly what decides the shortcut; going
through `kinkgrad.watch` would add hooks and bookkeeping for the same number.

Units of work: `run_chunk(task)` takes a plain dict (one setting, a range of
initialisations) and returns a plain dict; it is a top-level pure function, so any
executor (a process pool, Ray) can run it, and only the driver writes results.
Initialisation i of every setting is seeded from (seed, i) alone, so the four precisions
of one architecture start from the same float32 weights.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

PRECISIONS = ("float16", "bfloat16", "float32", "float64")
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
#: The paper's default architecture and batch size (784-256-256-256-10, batch 256).
DEFAULT_DEPTH, DEFAULT_WIDTH, DEFAULT_BATCH = 3, 256, 256
#: The paper's sweeps (REFERENCES.md; their CSVs in paper_results/section_3).
DEPTHS = (1, 2, 3, 5, 6)
WIDTHS = (16, 64, 256, 512, 1024)
BATCH_SIZES = (16, 64, 256, 512, 1024)


@dataclass(frozen=True)
class Setting:
    """One cell of the sweep: precision and architecture (`depth` hidden layers of
    `width` units) and batch size."""

    precision: str
    depth: int
    width: int
    batch_size: int

    @property
    def id(self) -> str:
        return f"{self.precision}-d{self.depth}-w{self.width}-b{self.batch_size}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "depth": self.depth,
            "width": self.width,
            "batch_size": self.batch_size,
        }


def init_seed(seed: int, init: int) -> int:
    """The seed of initialisation `init` of a study seeded `seed` (any setting)."""
    digest = hashlib.blake2b(f"kinkgrad-paper:{seed}:{init}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_layers(
    n_in: int, depth: int, width: int, classes: int, dtype: torch.dtype, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) per `nn.Linear` of the paper's MLP, drawn exactly as
    `nn.Linear.reset_parameters` draws them (kaiming_uniform with a = sqrt(5), bias
    uniform in +-1/sqrt(fan_in)) in float32 from `torch.Generator().manual_seed(seed)`,
    then cast to `dtype` (the paper builds in float32, then calls `.half()`/`.double()`).
    """
    g = torch.Generator().manual_seed(seed)
    sizes = [n_in] + [width] * depth + [classes]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w = torch.empty(fan_out, fan_in)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        b = torch.empty(fan_out).uniform_(
            -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=g
        )
        layers.append((w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()))
    return layers


def forward(layers, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Logits and the number of ReLU inputs exactly 0 (`nn.Linear` is `F.linear`)."""
    h, zeros = x, 0
    for w, b in layers[:-1]:
        z = F.linear(h, w, b)
        zeros += int(torch.count_nonzero(z == 0))
        h = torch.relu(z)
    w, b = layers[-1]
    return F.linear(h, w, b), zeros


@functools.cache
def _policies():
    from .policies import kink_policy

    return kink_policy(0.0, "first"), kink_policy(1.0, "first")


def _first_layer_grad(layers, x, y, policy) -> tuple[torch.Tensor, int]:
    with policy.context():
        logits, zeros = forward(layers, x)
        loss = F.cross_entropy(logits, y)
    (g,) = torch.autograd.grad(loss, layers[0][0])
    return g, zeros


def bifurcation(layers, batches) -> dict[str, Any]:
    """One initialisation: the fast protocol (see the module docstring).

    Returns in_s, the minibatch index where S was entered (or None), the samples seen
    by then, exact zeros and ReLU evaluations over the whole pass, and the number of
    minibatches holding an exact zero.
    """
    ref, alt = _policies()
    acc = None  # the reference copy's accumulated first-layer gradient
    entered = None
    samples = zeros = evals = zero_batches = seen = 0
    width_sum = sum(w.shape[0] for w, _ in layers[:-1])
    for i, (x, y) in enumerate(batches):
        seen += len(y)
        evals += len(y) * width_sum
        if entered is not None:  # in S already: the rest of the pass only counts zeros
            with torch.no_grad():
                n = forward(layers, x)[1]
        else:
            g0, n = _first_layer_grad(layers, x, y, ref)
            if n:
                g1, _ = _first_layer_grad(layers, x, y, alt)
                a0, a1 = (g0, g1) if acc is None else (acc + g0, acc + g1)
                if not torch.equal(a0, a1):
                    entered, samples = i, seen
                acc = a0
            else:
                acc = g0 if acc is None else acc.add_(g0)
        zeros += n
        zero_batches += n > 0
    return {
        "in_s": entered is not None,
        "entered_batch": entered,
        "entered_at": samples if entered is not None else None,
        "zeros": zeros,
        "relu_evals": evals,
        "zero_batches": zero_batches,
    }


@functools.cache
def _pass_data(data: str, train_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pass's samples, flattened, in float32 exactly as `ToTensor()` gives them."""
    if data == "mnist":
        from .data import mnist_pass

        x, y = mnist_pass()
    else:
        from .data import load

        ds = load(data)
        x, y = ds.x_train, ds.y_train
    if train_size:
        x, y = x[:train_size], y[:train_size]
    # float64 x/255 rounded once to float32 is ToTensor's float32 x/255 (division is
    # correctly rounded and 53 >= 2*24 + 2 bits); other precisions cast from float32,
    # as the paper's `.half()` / `.double()` do.
    return x.reshape(len(x), -1).to(torch.float32), y


def run_chunk(task: dict[str, Any]) -> dict[str, Any]:
    """Run initialisations [start, stop) of one setting; return a plain dict.

    `task`: {"setting": Setting.as_dict(), "start", "stop", "seed", "data",
    "train_size"}. The result carries the task's fields, per-initialisation results
    and the seconds spent.
    """
    # One thread: the result must not depend on how a machine splits a matmul.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_chunk(task)
    finally:
        torch.set_num_threads(threads)


def _run_chunk(task: dict[str, Any]) -> dict[str, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    s = Setting(**task["setting"])
    dtype = DTYPES[s.precision]
    x32, y = _pass_data(task["data"], task.get("train_size", 0))
    x = x32.to(dtype)
    batches = [
        (x[i : i + s.batch_size], y[i : i + s.batch_size]) for i in range(0, len(y), s.batch_size)
    ]
    classes = int(y.max()) + 1 if task["data"] != "mnist" else 10
    inits = []
    for i in range(task["start"], task["stop"]):
        layers = init_layers(
            x.shape[1], s.depth, s.width, classes, dtype, init_seed(task["seed"], i)
        )
        inits.append({"init": i, **bifurcation(layers, batches)})
    return {
        **{k: task[k] for k in ("setting", "start", "stop", "seed", "data")},
        "train_size": task.get("train_size", 0),
        "samples_per_pass": len(y),
        "inits": inits,
        "seconds": round(time.perf_counter() - t0, 3),
        # CPU time of this process: the per-unit cost, less sensitive to a shared machine
        "cpu_seconds": round(time.process_time() - c0, 3),
    }
