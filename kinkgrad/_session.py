"""Which pass of a certified computation is running on this thread, and the
"directional" policy that routes every catalog call to it: the record pass (hooks for
kinks met), the tangent passes (decisions from forward-mode tangents) and the probe
pass (linearization radius). See `kinkgrad.certify`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import ops
from ._pieces import _INF, _Mismatch, _piece, _plain, _run_dual
from .catalog import OpSpec
from .families import Call
from .intercept import acquire, release
from .policy import STATE

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
