"""The result of `kinkgrad.check`: `CheckReport` (verdict, the test that decided it,
evidence, a per-direction table) and `DirectionCheck` (the measurements along one
direction)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

from ._probe import Jump


@dataclass(frozen=True)
class DirectionCheck:
    """One direction d (unit norm over all inputs; `kind` "random" or "adversarial"):
    `forward` = f'(x; d), `backward` = f'(x; -d) (one-sided, float64 finite
    differences, `fd_error` / `fd_error_back` their error estimates), `predicted` =
    <g, d>, `error` = |forward - predicted|, `tolerance`; `ok` (the first-order model
    holds along d), `symmetric` (forward = -backward), `subgradient` (<g, +-d> <= f'(x; +-d)),
    `supergradient` (>=), `radius` / `radius_back` (linearization radius along d / -d),
    `jump` (a `Jump` certificate along d or -d, else None), `steep` (f changes by a
    jump's size within the smallest step, as steeply as g says it may: the
    differences along d are no evidence against g)."""

    index: int
    kind: str
    forward: float
    backward: float
    predicted: float
    error: float
    tolerance: float
    fd_error: float
    fd_error_back: float
    ok: bool
    symmetric: bool
    subgradient: bool
    supergradient: bool
    radius: float
    radius_back: float
    jump: Jump | None = None
    steep: bool = False


@dataclass(frozen=True, repr=False)
class CheckReport:
    """Result of `check`.

    **Fields**: `verdict` ("passed", "failed" or "inconclusive"); `decided_by` (the test
    that decided: "non-finite g", "discontinuity", "differentiability", "one variable",
    "Clarke hull",
    "Fréchet subgradient", "Fréchet supergradient", or "none"); `reason` (one line);
    `evidence` (further lines); `value` f(x); `grad_norm` |g|; `directions` (one
    `DirectionCheck` each); `differentiable` (certified as above); `clarke_distance`
    (from g to the hull of the sampled limiting gradients) and `clarke_tolerance`;
    `kinks_hit` (kink-op elements exactly on a kink at x); `dtype` (of g); `fd_dtype`
    (of the differences: "float64", "float64 (promoted)", or f's dtype); `samples`
    (limiting gradients sampled). Properties: `passed`, `kink`, `reasons`.
    """

    verdict: str
    decided_by: str
    reason: str
    evidence: tuple[str, ...]
    value: float
    grad_norm: float
    directions: tuple[DirectionCheck, ...]
    differentiable: bool
    clarke_distance: float
    clarke_tolerance: float
    kinks_hit: int
    dtype: str
    fd_dtype: str
    samples: int
    seed: int = field(default=0)

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    @property
    def kink(self) -> bool:
        return not self.differentiable

    @property
    def reasons(self) -> tuple[str, ...]:
        return (self.reason, *self.evidence)

    def table(self) -> Any:
        """The per-direction table as a `rich.table.Table`."""
        from rich.table import Table

        t = Table(
            title=f"{self.verdict.upper()} (decided by: {self.decided_by}); one-sided "
            "derivatives along unit directions d",
            title_justify="left",
        )
        for col in ("d", "kind", "f'(x; d)", "-f'(x; -d)", "<g, d>", "tol", "radius d / -d"):
            t.add_column(col, justify="right")
        t.add_column("", justify="left")
        for d in self.directions:
            flags = [
                "jump" if d.jump else "",
                "" if d.symmetric else "kink",
                "sub" if d.subgradient else "",
                "super" if d.supergradient else "",
            ]
            t.add_row(
                str(d.index),
                "rand" if d.kind == "random" else "adv",
                f"{d.forward:.8g}",
                f"{-d.backward:.8g}",
                f"{d.predicted:.8g}",
                f"{d.tolerance:.1e}",
                f"{_fmt_radius(d.radius)} / {_fmt_radius(d.radius_back)}",
                " ".join(s for s in flags if s),
            )
        return t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=120, color_system=None, force_terminal=False)
        console.print(f"kinkgrad check: {self.verdict.upper()}: {self.reason}", highlight=False)
        console.print(
            f"f(x) = {self.value:.10g}, |g| = {self.grad_norm:.6g} (g in {self.dtype}; "
            f"differences in {self.fd_dtype}); kink-op elements exactly on a kink: "
            f"{self.kinks_hit}; distance from g to the hull of {self.samples} sampled "
            f"limiting gradients: {self.clarke_distance:.3g} (tolerance "
            f"{self.clarke_tolerance:.1g}); seed {self.seed}",
            highlight=False,
        )
        console.print(self.table())
        for r in self.evidence:
            console.print(f"- {r}", highlight=False)
        return buf.getvalue().rstrip()

    def __repr__(self) -> str:
        return (
            f"CheckReport(verdict={self.verdict!r}, decided_by={self.decided_by!r}, "
            f"clarke_distance={self.clarke_distance:.3g}, directions={len(self.directions)})"
        )


def _fmt_radius(r: float) -> str:
    return "inf" if math.isinf(r) else f"{r:.3g}"
