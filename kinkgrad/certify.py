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
3. Where a tangent is exactly zero too (or tied inputs have equal tangents), the kink
   is *immaterial*: on the piece d enters, the inputs' gradients a_i satisfy
   <a_i - a_j, d> = 0 (ties) or <c, a> = 0 (an elementwise kink with normal c; a
   continuous op's one-sided gradients differ by a multiple of c), and for a random d,
   drawn from a density and independent of the finitely many pieces, that happens only
   when the difference is zero, with probability one. Every choice at such a kink then
   gives the same gradient, so it is counted in `.immaterial` and does not stop the
   result from being certified. When the first direction was given (not random), a
   random one follows, keeping earlier decisions: the lexicographic rule (Nesterov;
   Khan & Barton), at most `max_directions` (default `MAX_DIRECTIONS` = 2). A kink
   whose tangents are not finite (NaN, inf) proves nothing: it is counted in
   `.unresolved`, keeps PyTorch's value (elementwise) or index order (ties), and the
   result is not certified.

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

import random
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import ops
from ._pieces import _INF, _Jumps, _Mismatch, _piece, _plain, _run_dual
from .catalog import OpSpec, spec_by_name
from .families import Call
from .intercept import acquire, release
from .policy import STATE

#: Directions per certified gradient: one random direction, then lexicographic
#: fallbacks for kinks it leaves undecided (each costs one more tangent pass).
MAX_DIRECTIONS = 2

# --------------------------------------------------------------------------------------
# Sessions: which pass is running on this thread
# --------------------------------------------------------------------------------------


class _Local(threading.local):
    def __init__(self) -> None:
        self.session: _Session | None = None


_LOCAL = _Local()


class _Session:
    """One pass of f. `entries[i]` is the state of the i-th catalog call of the record
    pass (None where it met no kink); tangent passes walk the same list in order."""

    def __init__(self, mode: str, entries: list | None = None, step: float = 1.0) -> None:
        self.mode = mode  # "record", "tangent" or "probe"
        self.entries: list = [] if entries is None else entries
        self.index = 0
        self.step = step
        self.probes: list[tuple[str, float, int, int]] = []  # op, radius, crossings, hits

    def met_kink(self) -> bool:
        """Did the (record) pass meet a kink? Reads accelerator flags once, together."""
        live = [e for e in self.entries if e is not None]
        if any(e.flag is None for e in live):
            return True
        by_device: dict[Any, list[Tensor]] = {}
        for e in live:
            by_device.setdefault(e.flag.device, []).append(e.flag)
        return any(bool(torch.stack(fs).any()) for fs in by_device.values())


@contextmanager
def _running(session: _Session, watchers: bool = True) -> Iterator[_Session]:
    """Route every catalog call of this thread to `_directional`, whatever the policies."""
    prev = (_LOCAL.session, ops.FORCED.value, STATE.watchers, ops.REPLAY.active)
    _LOCAL.session = session
    ops.FORCED.value = "directional"
    if not watchers:  # a replayed forward must not be counted twice
        STATE.watchers = []
        ops.REPLAY.active = True
    acquire()
    try:
        yield session
    finally:
        release()
        _LOCAL.session, ops.FORCED.value, STATE.watchers, ops.REPLAY.active = prev


def _directional(spec: OpSpec, call: Call, value: Any) -> Any:
    """The "directional" policy (registered in `ops.DIRECTIONAL`)."""
    # Our own tensor code must not be intercepted again (functional forms call dispatch
    # directly, outside the mode's re-entrancy guard).
    with torch._C.DisableTorchFunction():
        session = _LOCAL.session
        if session is None:
            return _inline(spec, call)
        if session.mode == "record":
            return _record(session, spec, call)
        if session.mode == "tangent":
            return _tangent(session, spec, call)
        return _probe(session, spec, call)


def _record(session: _Session, spec: OpSpec, call: Call) -> Any:
    session.index += 1
    piece = _piece(spec, call)
    if piece is None:
        session.entries.append(None)
        return _plain(spec, call)
    out = piece.run(hooks=True)
    session.entries.append(piece if piece.hit else None)
    return out


def _tangent(session: _Session, spec: OpSpec, call: Call) -> Any:
    i = session.index
    session.index += 1
    piece = session.entries[i] if i < len(session.entries) else None
    if i >= len(session.entries) or (piece is not None and piece.spec is not spec):
        raise _Mismatch(f"catalog call #{i} ({spec.name}) was not made by the first pass")
    if piece is None:
        return _run_dual(spec, call, call.run)
    return piece.tangent_run(call)


def _inline(spec: OpSpec, call: Call) -> Any:
    """Single pass: the caller made the inputs dual (`torch.autograd.forward_ad`)."""
    piece = _piece(spec, call)
    if piece is None:
        return _plain(spec, call)
    pairs = piece.pairs(piece.call)
    out = piece.run(hooks=True)
    if not (piece.hit if piece.flag is None else bool(piece.flag)):
        return out
    if all(t is None for _, t in pairs):
        if fwAD._current_level < 0:
            raise RuntimeError(
                f"kinkgrad: the 'directional' policy met a kink of {spec.name} but no "
                "forward-mode tangent is available; use kinkgrad.certified_grad / "
                "kinkgrad.certified_backward, or run inside torch.autograd.forward_ad "
                "with dual inputs"
            )
        return out  # the kink does not depend on the direction: PyTorch's value stays
    return piece.decide(out, pairs)


def _probe(session: _Session, spec: OpSpec, call: Call) -> Any:
    piece = _piece(spec, call)
    if piece is None:
        return _run_dual(spec, call, call.run)
    pairs = piece.pairs(piece.call)
    out = _run_dual(spec, piece.call, lambda: piece.run(hooks=False))
    if all(t is None for _, t in pairs):
        return out
    out = piece.decide(out, pairs)
    times = piece.crossing_times(pairs)
    hits = piece.hits
    if times is None or times.numel() == 0:
        session.probes.append((spec.name, _INF, 0, hits))
    else:
        radius = float(times.min())
        session.probes.append((spec.name, radius, int((times <= session.step).sum()), hits))
    return out


ops.DIRECTIONAL[:] = [_directional]


# --------------------------------------------------------------------------------------
# Directions
# --------------------------------------------------------------------------------------


def _new_seed(seed: int | None) -> int:
    # A fresh seed from the OS, so certification never draws from (or perturbs) torch's
    # global RNG; it is reported, so any result can be reproduced.
    return random.SystemRandom().randrange(2**63) if seed is None else int(seed)


class _Directions:
    """The k-th direction (one tensor per variable), drawn from `seed` in order; the
    first may be given. Standard normal, drawn in float32 on the CPU (five times faster
    than float64, and the same direction for every dtype), then cast."""

    def __init__(self, seed: int, like: Sequence[tuple], first: Sequence[Tensor] | None) -> None:
        self.seed, self.like, self.first = seed, list(like), first
        self.gen: torch.Generator | None = None
        self.drawn: list[tuple[Tensor, ...]] = []

    def __getitem__(self, k: int) -> tuple[Tensor, ...]:
        while len(self.drawn) <= k:
            if not self.drawn and self.first is not None:
                self.drawn.append(tuple(self.first))
                continue
            if self.gen is None:
                self.gen = torch.Generator().manual_seed(self.seed)
            self.drawn.append(
                tuple(
                    torch.randn(shape, generator=self.gen).to(device=device, dtype=dtype)
                    for shape, dtype, device in self.like
                )
            )
        return self.drawn[k]

    def is_random(self, k: int) -> bool:
        """Was the k-th direction drawn at random (not given by the caller)?"""
        return k > 0 or self.first is None


def _like(ts: Sequence[Tensor]) -> list[tuple]:
    return [(tuple(t.shape), t.dtype, t.device) for t in ts]


def _as_direction(direction: Any, like: Sequence[Tensor], names: Sequence[str] | None, who: str):
    """A direction given as a tensor, a sequence of tensors or (parameters) a dict."""
    if isinstance(direction, Tensor):
        direction = [direction]
    if isinstance(direction, Mapping):
        if names is None:
            raise TypeError(f"{who}: direction must be a tensor or a sequence of tensors")
        missing = [n for n in names if n not in direction]
        if missing:
            raise ValueError(f"{who}: direction lacks parameters {missing[:5]}")
        direction = [direction[n] for n in names]
    direction = list(direction)
    if len(direction) != len(like):
        raise ValueError(f"{who}: direction has {len(direction)} tensors, expected {len(like)}")
    out = []
    for i, (d, x) in enumerate(zip(direction, like, strict=True)):
        if not isinstance(d, Tensor) or d.shape != x.shape:
            got = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(f"{who}: direction {i} must have shape {tuple(x.shape)}, got {got}")
        out.append(d.detach().to(device=x.device, dtype=x.dtype))
    return out


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def _check_inputs(inputs: Sequence[Any], who: str, need_grad: bool = True) -> list[Tensor]:
    if not inputs:
        raise TypeError(f"{who}: give at least one input tensor after f")
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{who}: input {i} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{who}: input {i} has dtype {x.dtype}; gradients need a floating-point "
                "tensor (e.g. x.double())"
            )
        if need_grad and not x.requires_grad:
            raise ValueError(
                f"{who}: input {i} (shape {tuple(x.shape)}) does not require grad; "
                "create it with requires_grad=True or call x.requires_grad_()"
            )
        bad = ~torch.isfinite(x.detach())
        if bool(bad.any()):
            where = tuple(int(v) for v in bad.nonzero()[0])
            kinds = "NaN" if bool(torch.isnan(x.detach()).any()) else "inf"
            raise ValueError(
                f"{who}: input {i} holds {int(bad.sum())} non-finite value(s) ({kinds}, "
                f"first at index {where}); no derivative exists there"
            )
    return list(inputs)


def _check_output(out: Any, who: str, what: str = "f") -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{who}: {what} must return a tensor, got {type(out).__name__}")
    if out.numel() != 1:
        raise ValueError(
            f"{who}: {what} must return a scalar (one element), got shape "
            f"{tuple(out.shape)}; reduce it first, e.g. .sum() or .mean()"
        )
    if not out.is_floating_point():
        raise TypeError(f"{who}: {what} returned dtype {out.dtype}; expected a floating point")
    return out


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
        if directions.is_random(k):
            break  # what a random direction leaves undecided is immaterial (a.s.)
    # Immaterial only once a random direction was used: a given direction can be
    # orthogonal to the difference of two gradients.
    random_used = any(directions.is_random(j) for j in range(summary.directions_used))
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
    max_directions: int = MAX_DIRECTIONS,
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
    (a tensor per input); `max_directions` the limit of the lexicographic sequence.

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
    if max_directions < 1:
        raise ValueError(f"{who}: max_directions must be >= 1, got {max_directions}")
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


class _LossModule(torch.nn.Module):
    """`loss_fn(model, *batch)` as a module, so `torch.func.functional_call` can swap the
    model's parameters for dual tensors (also where loss_fn reads model.parameters())."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch: Any) -> Any:
        return self.loss_fn(self.model, *batch)


def _trainable(model: torch.nn.Module, who: str) -> list[tuple[str, torch.nn.Parameter]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{who}: the model has no parameter with requires_grad=True")
    for n, p in named:
        if not p.is_floating_point():
            raise TypeError(f"{who}: parameter {n} has dtype {p.dtype}; expected floating")
    return named


def _rng_state(devices: Sequence[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple, devices: Sequence[int]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1], strict=True):
        torch.cuda.set_rng_state(s, d)


def _module_runner(
    loss_fn: Callable[..., Tensor],
    model: torch.nn.Module,
    named: Sequence[tuple[str, Tensor]],
    batch: tuple,
    rng: tuple,
    devices: Sequence[int],
) -> Callable[[Sequence[Tensor]], Any]:
    """Runs loss_fn(model, *batch) with the parameters made dual, each time from the RNG
    state `rng` (so dropout draws the same masks as the first pass) and on copies of the
    buffers (batch-norm statistics are not updated twice; the originals are saved for
    the first pass's backward and must not change)."""
    wrapper = _LossModule(model, loss_fn)
    plain = [(f"model.{n}", p.detach()) for n, p in named]

    def run_dual(ds: Sequence[Tensor]) -> Any:
        _set_rng_state(rng, devices)
        params = {n: fwAD.make_dual(p, d) for (n, p), d in zip(plain, ds, strict=True)}
        for n, b in model.named_buffers():
            params[f"model.{n}"] = b.detach().clone()
        return torch.func.functional_call(wrapper, params, batch)

    return run_dual


@contextmanager
def _rng_preserved(devices: Sequence[int]) -> Iterator[None]:
    """Leaves the RNG state as it is now."""
    rng = _rng_state(devices)
    try:
        yield
    finally:
        _set_rng_state(rng, devices)


def _cuda_devices(named: Sequence[tuple[str, Tensor]]) -> list[int]:
    return sorted({p.device.index or 0 for _, p in named if p.device.type == "cuda"})


def certified_backward(
    loss_fn: Callable[..., Tensor],
    model: torch.nn.Module,
    *batch: Any,
    seed: int | None = None,
    max_directions: int = MAX_DIRECTIONS,
) -> CertifiedStep:
    """Backward with a certified generalized gradient, for training.

    Computes `loss = loss_fn(model, *batch)` and accumulates into each trainable
    parameter's `.grad` (as `loss.backward()` would) the gradient of the piece that
    params + t d enters, d random over the parameters: lim_{t->0+} grad L(params + t d).
    Steps that meet no kink cost one policy step; a step that meets one pays one extra
    forward-mode pass (a kink that pass leaves undecided is immaterial). The second pass
    replays the RNG
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
    if max_directions < 1:
        raise ValueError(f"{who}: max_directions must be >= 1, got {max_directions}")
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


# --------------------------------------------------------------------------------------
# Linearization radius and kink crossings along a direction
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linearization:
    """How far the linear model of f holds along a direction.

    **Fields**: `radius`: the smallest step t > 0 at which some kink-op input reaches a
    kink (a tie, a jump) along the direction, inf if none; up to it every kink op stays
    on one piece, so a piecewise-linear f is exactly linear on [0, radius] (for other f
    the times are first-order predictions from the tangents). `crossings`: how many
    such events happen within `step` (elements x kink points; for ties, pairs of the
    selected element with another, neighbours for sort). `kinks_hit`: elements on a kink
    at the point itself. `by_op`: op -> radius, crossings, hits.
    """

    radius: float
    crossings: int
    step: float
    kinks_hit: int
    by_op: dict[str, dict[str, float]]


def _linearization(session: _Session, step: float) -> Linearization:
    by_op: dict[str, dict[str, float]] = {}
    for name, radius, crossings, hits in session.probes:
        row = by_op.setdefault(name, {"radius": _INF, "crossings": 0, "hits": 0})
        row["radius"] = min(row["radius"], radius)
        row["crossings"] += crossings
        row["hits"] += hits
    radius = min((r["radius"] for r in by_op.values()), default=_INF)
    crossings = int(sum(r["crossings"] for r in by_op.values()))
    hits = int(sum(r["hits"] for r in by_op.values()))
    return Linearization(radius, crossings, step, hits, by_op)


def linearization(
    f: Callable[..., Any], *inputs: Tensor, direction: Any, step: float = 1.0
) -> Linearization:
    """Linearization radius of f at `inputs` along `direction`, from one forward-mode
    pass (the kink-op inputs and their tangents).

    >>> import torch, kinkgrad as kg
    >>> lin = kg.linearization(lambda x: torch.relu(x - 1.0).sum(), torch.zeros(2),
    ...                        direction=torch.tensor([1.0, 0.5]))
    >>> lin.radius, lin.crossings                  # x reaches 1 at t = 1 (first element)
    (1.0, 1)
    """
    who = "kinkgrad.linearization"
    xs = [x.detach() for x in _check_inputs(inputs, who, need_grad=False)]
    ds = _as_direction(direction, xs, None, who)
    session = _Session("probe", step=step)
    with torch.no_grad(), fwAD.dual_level(), _running(session, watchers=False):
        f(*[fwAD.make_dual(x, d) for x, d in zip(xs, ds, strict=True)])
    return _linearization(session, step)


def kink_crossings(
    loss_fn: Callable[..., Tensor],
    model: torch.nn.Module,
    *batch: Any,
    direction: Mapping[str, Tensor] | Sequence[Tensor],
    step: float = 1.0,
) -> Linearization:
    """How many kinks the step params -> params + step * direction crosses, predicted
    from the tangents of one forward-mode pass of `loss_fn(model, *batch)`; and the
    linearization radius along the direction. For a training step, pass the update
    (new minus old parameters) and step=1. RNG state and buffers are left as they were.

    **Arguments**: `direction`: dict parameter name -> tensor (all trainable
    parameters) or a sequence in `model.named_parameters()` order.
    """
    who = "kinkgrad.kink_crossings"
    named = _trainable(model, who)
    ds = _as_direction(direction, [p for _, p in named], [n for n, _ in named], who)
    devices = _cuda_devices(named)
    session = _Session("probe", step=step)
    with _rng_preserved(devices):
        run_dual = _module_runner(loss_fn, model, named, batch, _rng_state(devices), devices)
        with torch.no_grad(), fwAD.dual_level(), _running(session, watchers=False):
            run_dual(ds)
    return _linearization(session, step)
