"""Certified generalized gradients: the piece a random direction enters at every kink.

Kakade & Lee (NeurIPS 2018): pick a random direction d. At every kink the forward pass
sits on, the sign of the forward-mode tangent along d says which one-sided piece
x + t d enters for small t > 0; reverse mode then differentiates that piece. The result
is lim_{t -> 0+} grad f(x + t d), an element of the Bouligand (hence Clarke)
subdifferential, for any composition of catalog ops and smooth PyTorch ops.

How it runs (the tangent pass only when needed):

1. *record*: the forward runs once, as usual, with reverse-mode recording and every
   catalog op under the "directional" policy. Each op checks whether some element sits
   exactly on a kink (the check the policies make anyway); where one does, it registers
   a backward hook whose piece is decided later. Off the kinks the forward values and
   the gradient are PyTorch's, bit for bit.
2. *tangent*: only if step 1 met a kink, the forward runs again under
   `torch.autograd.forward_ad` with tangent d and no reverse recording. Each op with a
   kink reads its inputs' tangents and decides the piece: for elementwise ops and
   maximum/minimum the sign of `Kink.direction . tangents`; for tie ops (max, sort,
   max pooling, ...) tied inputs are ordered by tangent. It then corrects its output
   tangent to that piece's directional derivative (PyTorch's jvp at a kink is a fixed
   choice, e.g. relu's is 0 whatever the tangent), so later kinks see the right tangents.
3. Where a tangent is exactly zero too (or tied inputs have equal tangents), step 2
   runs again with a further random direction, keeping earlier decisions: the
   lexicographic rule (Nesterov; Khan & Barton), at most `max_directions` directions
   (default `MAX_DIRECTIONS` = 2; 6 in half precision). What is left is *immaterial*:
   on the piece entered, the inputs' gradients a_i satisfy <a_i - a_j, d> = 0 (ties)
   or <c, a> = 0 (an elementwise kink with normal c; a continuous op's one-sided
   gradients differ by a multiple of c) for every direction d used, and for a random
   d, drawn from a density independently of the finitely many pieces, that happens
   only when the difference is zero, with probability one. Every choice at such a
   kink gives the same gradient, so it is counted in `.immaterial` and the result
   stays certified (PyTorch's value or index order is kept). In floating point two
   different tangents can round to the same value (about 2^-p of the time for p
   mantissa bits, far more when the gradients are close), which is why the second
   direction still runs, and why float16 / bfloat16 need `HALF_PRECISION_DIRECTIONS`
   = 6 before anything is immaterial. A kink left undecided with non-finite tangents
   (NaN, inf), or when every direction was given rather than random, proves nothing:
   it is counted in `.unresolved` and the result is not certified.

Then reverse mode runs and the hooks read the decisions.

Why not forward and reverse mode in one pass (the textbook form): measured on the
benchmark MLPs (`kinkgrad bench certified`, CPU), recording both modes at once costs
about 4x-6x a plain step, every step, while a step that meets no kink costs 1.1x-1.5x
here; kinks are rare (most steps meet none), and a step that meets one costs about 4x
(PyTorch's forward AD alone costs 1x-3x a plain step). The price: f must compute the
same values twice. `certified_backward` replays the RNG state and runs the replay on
copies of the module buffers; a mismatch is detected and reported. Inside a user's own
`forward_ad` context the policy "directional" also works in one pass (`_inline`), with
a single direction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._inputs import (
    _as_direction,
    _check_inputs,
    _check_output,
    _cuda_devices,
    _Directions,
    _like,
    _module_runner,
    _new_seed,
    _rng_preserved,
    _rng_state,
    _set_rng_state,
    _trainable,
)
from ._pieces import _Jumps, _Mismatch
from ._session import _running, _Session
from .catalog import spec_by_name
from .linearize import Linearization as Linearization
from .linearize import kink_crossings as kink_crossings
from .linearize import linearization as linearization

#: Directions per certified gradient: one random direction, then lexicographic
#: fallbacks for kinks it leaves undecided (each costs one more tangent pass).
MAX_DIRECTIONS = 2
#: In float16 / bfloat16 a kink is called immaterial only after this many directions
#: (and it is the default limit there). Tangents round to 8 (bfloat16) or 11 bits, so
#: tied inputs whose gradients differ by 10% had equal tangents along two random
#: directions for 7 ties in 20000 (bfloat16; 2^-6 apart: 288 in bfloat16, 3 in
#: float16), each called immaterial with a wrong gradient; after six, none
#: (tests/test_certify_adversarial.py).
HALF_PRECISION_DIRECTIONS = 6
_HALF = (torch.float16, torch.bfloat16)


def default_directions(dtype: torch.dtype) -> int:
    """How many directions `max_directions=None` allows for inputs of `dtype`."""
    return HALF_PRECISION_DIRECTIONS if dtype in _HALF else MAX_DIRECTIONS


def _max_directions(max_directions: int | None, xs: Sequence[Tensor], who: str) -> int:
    if max_directions is None:
        return max((default_directions(x.dtype) for x in xs), default=MAX_DIRECTIONS)
    if (
        not isinstance(max_directions, int)
        or isinstance(max_directions, bool)
        or max_directions < 1
    ):
        raise ValueError(f"{who}: max_directions must be an integer >= 1, got {max_directions!r}")
    return max_directions


# --------------------------------------------------------------------------------------
# The passes
# --------------------------------------------------------------------------------------


@dataclass
class _Summary:
    kinks_hit: int = 0
    unresolved: int = 0
    jumps_hit: int = 0
    directions_used: int = 0
    by_op: dict[str, dict[str, int]] = field(default_factory=dict)
    immaterial: int = 0


def _tangent_passes(
    record: _Session,
    run_dual: Callable[[Sequence[Tensor]], Any],
    directions: _Directions,
    max_directions: int,
    who: str,
) -> _Summary:
    entries = record.entries
    live = [e for e in entries if e is not None]
    summary = _Summary()
    if not record.met_kink():
        return summary
    for k in range(max_directions):
        session = _Session("tangent", entries)
        d = directions[k]
        try:
            with torch.no_grad(), fwAD.dual_level(), _running(session, watchers=False):
                run_dual(d)
        except _Mismatch as e:
            raise RuntimeError(
                f"{who}: the tangent pass did not replay the first pass ({e}). f must "
                "compute the same values when run twice; the RNG state is replayed and buffers "
                "are copied, other sources of nondeterminism are not handled"
            ) from None
        except (NotImplementedError, RuntimeError) as e:
            if "forward AD" not in str(e) and "jvp" not in str(e):
                raise
            raise RuntimeError(
                f"{who}: a kink was met, and deciding its piece needs forward-mode AD "
                f"through every op of f: {e}"
            ) from e
        if session.index != record.index:
            raise RuntimeError(
                f"{who}: the tangent pass made {session.index} catalog calls, the first "
                f"pass {record.index}; f must compute the same values when run twice"
            )
        summary.directions_used = k + 1
        if not any(e.undecided for e in live):
            break
    # Immaterial only once a random direction was used: a given direction can be
    # orthogonal to the difference of two gradients; in half precision only after
    # `HALF_PRECISION_DIRECTIONS` (rounding makes different tangents equal).
    random_used = any(directions.is_random(j) for j in range(summary.directions_used))
    if any(t.dtype in _HALF for t in directions[0]):
        random_used = random_used and summary.directions_used >= HALF_PRECISION_DIRECTIONS
    for e in live:
        if not e.seen:
            continue
        row = summary.by_op.setdefault(e.spec.name, {"hits": 0, "unresolved": 0, "immaterial": 0})
        undecided = e.undecided
        unresolved = e.nonfinite if random_used else undecided
        row["hits"] += e.hits
        row["unresolved"] += unresolved
        row["immaterial"] += undecided - unresolved
        if isinstance(e, _Jumps):
            summary.jumps_hit += e.hits
        else:
            summary.kinks_hit += e.hits
            summary.unresolved += unresolved
            summary.immaterial += undecided - unresolved
    return summary


class _Counts:
    """Shared fields and behaviour of the results."""

    kinks_hit: int
    unresolved: int
    jumps_hit: int
    directions_used: int
    seed: int
    by_op: dict[str, dict[str, int]]
    immaterial: int

    @property
    def certified(self) -> bool:
        """True when every kink met was decided by a direction or shown immaterial and
        no jump op sat on its jump: the gradient is lim_{t->0+} grad f(x + t d) for the
        directions used (with probability one over the random directions)."""
        return self.jumps_hit == 0 and self.unresolved == 0

    def _summary(self) -> str:
        state = "certified" if self.certified else "NOT certified"
        why = []
        if self.unresolved:
            why.append(
                f"{self.unresolved} kink(s) undecided after {self.directions_used} directions"
            )
        if self.jumps_hit:
            why.append(f"{self.jumps_hit} element(s) on a jump")
        if self.immaterial:
            why.append(f"{self.immaterial} immaterial tie(s)/kink(s)")
        extra = f" ({'; '.join(why)})" if why else ""
        ops_ = ", ".join(
            f"{k}: {v['hits']}"
            for k, v in sorted(self.by_op.items())
            if getattr(spec_by_name(k), "kind", "") != "jump"
        )
        return (
            f"{state}{extra}; kinks hit: {self.kinks_hit}"
            + (f" [{ops_}]" if ops_ else "")
            + f"; directions used: {self.directions_used}; seed {self.seed}"
        )


@dataclass(frozen=True, repr=False)
class CertifiedGrad(_Counts):
    """Result of `certified_grad`.

    **Fields**: `grads` (one tensor per input), `value` (f at the inputs), `kinks_hit`
    (elements exactly on a kink, tie groups, tie windows, whose input depends on the
    inputs), `immaterial` (those no direction decided, where every choice gives the
    same gradient), `unresolved` (those left undecided with no such proof),
    `jumps_hit` (elements on a jump of sign, round, ...), `directions_used` (tangent
    passes run; 0 when no kink was met), `seed`, `by_op` (op -> hits, unresolved,
    immaterial). Properties: `grad` (the gradient of the only input, or the tuple
    `grads`), `certified`, `direction` (the first direction, one tensor per input).
    """

    grads: tuple[Tensor, ...]
    value: Tensor
    kinks_hit: int
    unresolved: int
    jumps_hit: int
    directions_used: int
    seed: int
    by_op: dict[str, dict[str, int]]
    _directions: _Directions
    immaterial: int = 0

    @property
    def grad(self) -> Tensor | tuple[Tensor, ...]:
        return self.grads[0] if len(self.grads) == 1 else self.grads

    @property
    def direction(self) -> Tensor | tuple[Tensor, ...]:
        d = self._directions[0]
        return d[0] if len(d) == 1 else d

    @property
    def directions(self) -> list[tuple[Tensor, ...]]:
        """Every direction used, in order (the lexicographic sequence)."""
        return [self._directions[k] for k in range(max(self.directions_used, 1))]

    def __repr__(self) -> str:
        return f"CertifiedGrad({self._summary()})"

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class CertifiedStep(_Counts):
    """Result of `certified_backward`: the certified gradient is in the parameters'
    `.grad`. Fields as `CertifiedGrad`, plus `loss` (its value); `direction` is a dict
    parameter name -> tensor."""

    loss: Tensor
    kinks_hit: int
    unresolved: int
    jumps_hit: int
    directions_used: int
    seed: int
    by_op: dict[str, dict[str, int]]
    _directions: _Directions
    _names: tuple[str, ...]
    immaterial: int = 0

    @property
    def direction(self) -> dict[str, Tensor]:
        return dict(zip(self._names, self._directions[0], strict=True))

    def __repr__(self) -> str:
        return f"CertifiedStep(loss {float(self.loss):.6g}; {self._summary()})"

    __str__ = __repr__


def certified_grad(
    f: Callable[..., Tensor],
    *inputs: Tensor,
    seed: int | None = None,
    direction: Any = None,
    max_directions: int | None = None,
) -> CertifiedGrad:
    """A certified generalized gradient of a scalar function f at `inputs`.

    The gradient of the piece of f that x + t d enters for small t > 0, d random:
    lim_{t->0+} grad f(x + t d), an element of the Clarke subdifferential. Off the kinks
    it is bit for bit what `torch.autograd.grad` returns. Every catalog op inside f is
    handled, in any call style; policies, attached modules and `kink=` keywords are
    overridden while f runs.

    **Arguments**: `f` maps the inputs to a one-element floating tensor and must compute
    the same values when called twice; `inputs` are floating tensors with
    `requires_grad=True` and finite values; `seed` fixes the directions (default: a
    fresh one, reported in the result); `direction` (optional) the first direction
    (a tensor per input); `max_directions` the limit of the lexicographic sequence
    (default `MAX_DIRECTIONS`, `HALF_PRECISION_DIRECTIONS` for float16 / bfloat16
    inputs, where fewer leave every undecided kink unresolved).

    **Returns**: `CertifiedGrad` (`.grad`, `.grads`, `.kinks_hit`, `.unresolved`,
    `.certified`, `.direction`, ...). Gradients are not accumulated into `.grad`.

    >>> import torch, kinkgrad as kg
    >>> x = torch.zeros(1, requires_grad=True)
    >>> r = kg.certified_grad(lambda x: (torch.relu(x) - torch.relu(-x)).sum(), x, seed=0)
    >>> r.grad, r.kinks_hit, r.certified      # plain backprop says 0; f is the identity
    (tensor([1.]), 2, True)
    """
    who = "kinkgrad.certified_grad"
    xs = _check_inputs(inputs, who)
    max_directions = _max_directions(max_directions, xs, who)
    first = None if direction is None else _as_direction(direction, xs, None, who)
    dirs = _Directions(_new_seed(seed), _like(xs), first)
    devices = _cuda_devices([(str(i), x) for i, x in enumerate(xs)])
    rng = _rng_state(devices)
    record = _Session("record")
    with _running(record):
        out = f(*xs)
    _check_output(out, who)
    plain = [x.detach() for x in xs]

    def run_dual(ds: Sequence[Tensor]) -> Any:
        _set_rng_state(rng, devices)  # random ops inside f draw what they drew before
        return f(*[fwAD.make_dual(x, d) for x, d in zip(plain, ds, strict=True)])

    with _rng_preserved(devices):
        summary = _tangent_passes(record, run_dual, dirs, max_directions, who)
    if out.requires_grad:
        grads = torch.autograd.grad(out.reshape(()), xs, allow_unused=True)
    else:
        grads = (None,) * len(xs)
    grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs, strict=True))
    return CertifiedGrad(
        grads,
        out.detach(),
        summary.kinks_hit,
        summary.unresolved,
        summary.jumps_hit,
        summary.directions_used,
        dirs.seed,
        summary.by_op,
        dirs,
        summary.immaterial,
    )


def certified_backward(
    loss_fn: Callable[..., Tensor],
    model: torch.nn.Module,
    *batch: Any,
    seed: int | None = None,
    max_directions: int | None = None,
) -> CertifiedStep:
    """Backward with a certified generalized gradient, for training.

    Computes `loss = loss_fn(model, *batch)` and accumulates into each trainable
    parameter's `.grad` (as `loss.backward()` would) the gradient of the piece that
    params + t d enters, d random over the parameters: lim_{t->0+} grad L(params + t d).
    Steps that meet no kink cost one policy step; a step that meets one pays one extra
    forward-mode pass (two if a kink stays undecided; then it is immaterial). The
    second pass replays the RNG
    state (dropout draws the same masks) and runs on copies of the module buffers.

    **Arguments**: `loss_fn(model, *batch)` returns a scalar loss; `model` an
    `nn.Module`; `seed`, `max_directions` as in `certified_grad`.

    **Returns**: `CertifiedStep` (`.loss`, `.kinks_hit`, `.unresolved`, `.certified`,
    `.direction`, ...).

    >>> import torch, torch.nn.functional as F, kinkgrad as kg
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.zeros(4, 2), torch.ones(4, 1)
    >>> opt.zero_grad()
    >>> step = kg.certified_backward(lambda m, x, y: F.mse_loss(m(x), y), model, x, y, seed=0)
    >>> opt.step(); step.certified
    True
    """
    who = "kinkgrad.certified_backward"
    named = _trainable(model, who)
    max_directions = _max_directions(max_directions, [p for _, p in named], who)
    devices = _cuda_devices(named)
    dirs = _Directions(_new_seed(seed), _like([p for _, p in named]), None)
    rng = _rng_state(devices)
    record = _Session("record")
    with _running(record):
        loss = loss_fn(model, *batch)
    _check_output(loss, who, "loss_fn")
    if not loss.requires_grad:
        raise ValueError(f"{who}: the loss does not depend on any trainable parameter")
    summary = _Summary()
    if record.met_kink():
        run_dual = _module_runner(loss_fn, model, named, batch, rng, devices)
        with _rng_preserved(devices):
            summary = _tangent_passes(record, run_dual, dirs, max_directions, who)
    loss.reshape(()).backward()
    return CertifiedStep(
        loss.detach(),
        summary.kinks_hit,
        summary.unresolved,
        summary.jumps_hit,
        summary.directions_used,
        dirs.seed,
        summary.by_op,
        dirs,
        tuple(n for n, _ in named),
        summary.immaterial,
    )
