"""Where the paper protocol's exact zeros come from: one measurement on the first layer.

The first layer's pre-activations z = x W^T + b of the paper's network over the 5,000
MNIST images, computed four ways from the same float16 (or float32) inputs and weights:

- `kernel`: this machine's `F.linear` in that precision (CPU float16: products and sums
  in float32, one rounding at the end);
- `rounded once`: the float64 value rounded once to the precision. It is 0 only where
  the true value underflows (|z| < half the smallest subnormal): the zeros a perfectly
  accurate kernel would give;
- `float16 accumulate` (float16 only): an emulation of a kernel that accumulates in
  float16, as GPU half-precision kernels may: products added one input at a time in
  input order, each partial sum rounded to float16 (one rounding per step, like an FMA),
  the bias added last.
- the float64 value itself (`exact`): 0 only if the sum cancels exactly.

Run: `python -m kinkgrad.study.paper_zeros --out DIR [--inits N] [--emulate M]`; writes
`DIR/paper_zeros.json`, which the paper report shows when present.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._files import atomic_write
from . import paper

FILE = "paper_zeros.json"


def _fp16_accumulate(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ w.T + b with a float16 running sum (x, w, b float16; result float16)."""
    x64, w64 = x.double(), w.double()
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for k in range(x.shape[1]):
        col = x64[:, k]
        if not bool(col.any()):  # a blank pixel adds exact zeros: the sum stays put
            continue
        acc = (acc + torch.outer(col, w64[:, k])).to(torch.float16).double()
    return (acc + b.double()).to(torch.float16)


def measure(
    precision: str, inits: int, emulate: int, samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Zero counts of the first layer's pre-activations, summed over initialisations."""
    dtype = paper.DTYPES[precision]
    x32, _ = paper._pass_data("mnist", 0)
    x = x32.to(dtype)
    counts = {"kernel": 0, "rounded_once": 0, "exact": 0, "evaluations": 0}
    emu = {"float16_accumulate": 0, "kernel": 0, "evaluations": 0}
    for i in range(inits):
        (w, b), *_ = paper.init_layers(
            784, 1, paper.DEFAULT_WIDTH, 10, dtype, paper.init_seed(seed, i)
        )
        w, b = w.detach(), b.detach()
        with torch.no_grad():
            kernel = F.linear(x, w, b)
            true = F.linear(x.double(), w.double(), b.double())
        counts["kernel"] += int((kernel == 0).sum())
        counts["rounded_once"] += int((true.to(dtype) == 0).sum())
        counts["exact"] += int((true == 0).sum())
        counts["evaluations"] += kernel.numel()
        if precision == "float16" and i < emulate:  # slow: on the first `samples` images
            emu["float16_accumulate"] += int((_fp16_accumulate(x[:samples], w, b) == 0).sum())
            emu["kernel"] += int((kernel[:samples] == 0).sum())
            emu["evaluations"] += kernel[:samples].numel()
    out = {"precision": precision, "inits": inits, "layer": 1, **counts}
    if precision == "float16":
        out["emulated"] = {"inits": min(emulate, inits), "samples": samples, **emu}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kinkgrad.study.paper_zeros")
    p.add_argument("--out", required=True, help="run directory (writes paper_zeros.json)")
    p.add_argument("--inits", type=int, default=100)
    p.add_argument("--emulate", type=int, default=3, help="initialisations emulated (slow)")
    p.add_argument("--samples", type=int, default=1000, help="images per emulated init")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = [
        measure(prec, args.inits, args.emulate, args.samples) for prec in ("float16", "float32")
    ]
    doc = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.out) / FILE, json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
