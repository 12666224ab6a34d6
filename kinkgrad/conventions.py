"""`kinkgrad conventions`: what installed frameworks return at every kink, measured live.

Nothing here is typed in: each catalog probe is evaluated with the installed torch (and
JAX, when importable) and the gradients are compared with the catalog's Clarke set.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .catalog import OpSpec, Probe, catalog


@dataclass
class Row:
    op: str
    kind: str
    at: str
    clarke: str
    torch: str
    torch_in_clarke: bool | None
    jax: str | None
    jax_in_clarke: bool | None
    kinkgrad_default: str


def _fmt(grads: list[list[float]]) -> str:
    def num(v: float) -> str:
        return f"{v:.6g}" if math.isfinite(v) else str(v)

    parts = [num(g[0]) if len(g) == 1 else "(" + ", ".join(num(v) for v in g) + ")" for g in grads]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def measure_torch(probe: Probe) -> list[list[float]] | str:
    """Gradients of probe.fn at its point with plain PyTorch, or the error it raises."""
    xs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in probe.inputs]
    try:
        probe.fn(*xs).sum().backward()
    except (RuntimeError, NotImplementedError) as err:
        return f"error: {str(err).splitlines()[0][:60]}"
    return [x.grad.reshape(-1).tolist() if x.grad is not None else [0.0] * x.numel() for x in xs]


def _jax() -> Any:
    try:
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        jax.config.update("jax_enable_x64", True)
        return jax, jnp
    except Exception:  # noqa: BLE001  (any import failure means: no JAX column)
        return None


def measure_jax(probe: Probe, jx: Any) -> list[list[float]] | str | None:
    if jx is None or probe.jax is None:
        return None
    jax, jnp = jx
    xs = [jnp.asarray(v, dtype=jnp.float64) for v in probe.inputs]
    try:
        grads = jax.grad(lambda *a: probe.jax(jnp, jax, *a), argnums=tuple(range(len(xs))))(*xs)
    except Exception as err:  # noqa: BLE001
        return f"error: {str(err).splitlines()[0][:60]}"
    return [[float(v) for v in g.reshape(-1)] for g in grads]


def _judge(spec: OpSpec, probe: Probe, grads: Any) -> bool | None:
    if isinstance(grads, str) or grads is None or probe.in_clarke is None:
        return None
    return bool(probe.in_clarke(grads))


def rows() -> list[Row]:
    """One row per catalog op and kink point."""
    jx = _jax()
    out = []
    for spec in catalog():
        for probe in spec.probes:
            t = measure_torch(probe)
            j = measure_jax(probe, jx)
            out.append(
                Row(
                    spec.name,
                    spec.kind,
                    probe.at,
                    probe.clarke,
                    t if isinstance(t, str) else _fmt(t),
                    _judge(spec, probe, t),
                    None if j is None else (j if isinstance(j, str) else _fmt(j)),
                    _judge(spec, probe, j),
                    "torch",
                )
            )
    return out


@dataclass
class Composite:
    expression: str
    at: str
    true_derivative: float
    plain_backprop: float
    in_clarke: bool


#: Functions whose true derivative at 0 is known, where plain backprop is wrong.
COMPOSITES: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], float]] = [
    ("relu(x) - relu(-x)  (= x)", lambda x: torch.relu(x) - torch.relu(-x), 1.0),
    (
        "maximum(x, 0) - relu(x)  (= 0)",
        lambda x: torch.maximum(x, torch.zeros_like(x)) - torch.relu(x),
        0.0,
    ),
    (
        "clamp(x, 0, 1) - relu(x) + relu(x - 1)  (= 0)",
        lambda x: torch.clamp(x, 0.0, 1.0) - torch.relu(x) + torch.relu(x - 1),
        0.0,
    ),
]


def composites() -> list[Composite]:
    """Plain backprop at x = 0 on functions that are smooth there (so Clarke = {f'})."""
    out = []
    for expr, fn, true in COMPOSITES:
        x = torch.zeros((), dtype=torch.float64, requires_grad=True)
        fn(x).backward()
        got = float(x.grad)
        out.append(Composite(expr, "x = 0", true, got, got == true))
    return out


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kinkgrad conventions",
        description="What the installed PyTorch (and JAX) return at every kink in the catalog.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    table, comp = rows(), composites()
    if args.json:
        print(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "ops": [asdict(r) for r in table],
                    "composites": [asdict(c) for c in comp],
                },
                indent=2,
            )
        )
        return 0
    _print_tables(table, comp)
    return 0


def _mark(ok: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[bold red]NO[/]", None: "-"}[ok]


def _print_tables(table: list[Row], comp: list[Composite]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 150)
    has_jax = any(r.jax is not None for r in table)
    t = Table(title=f"Derivatives at kinks, measured live (torch {torch.__version__}, float64)")
    for col in ("op", "kind", "at", "Clarke set", "PyTorch", "in Clarke"):
        t.add_column(col)
    if has_jax:
        t.add_column("JAX")
        t.add_column("in Clarke")
    t.add_column("kinkgrad default")
    for r in table:
        cells = [r.op, r.kind, r.at, r.clarke, r.torch, _mark(r.torch_in_clarke)]
        if has_jax:
            cells += [r.jax or "-", _mark(r.jax_in_clarke)]
        cells.append(r.kinkgrad_default)
        t.add_row(*cells)
    console.print(t)
    c = Table(title="Composites where plain backprop leaves the Clarke set")
    for col in ("function", "at", "true derivative", "plain backprop", "correct"):
        c.add_column(col)
    for r in comp:
        c.add_row(
            r.expression,
            r.at,
            f"{r.true_derivative:g}",
            f"{r.plain_backprop:g}",
            _mark(r.in_clarke),
        )
    console.print(c)
    console.print(
        "Jump ops have no Clarke gradient at the jump; their policies are surrogates. "
        "kinkgrad's default policy is 'torch' for every op; choose others with kinkgrad.policy."
    )
