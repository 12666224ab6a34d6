"""Dispatch: apply the active policy (and watchers) to one call of a catalog op."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .catalog import OpSpec, spec_by_name
from .frames import STATE, Value

#: Set by `kinkgrad.certify`: runs a call under the "directional" policy.
DIRECTIONAL: list[Callable[[OpSpec, Any, Any], Any]] = []


class _Forced(threading.local):
    value: Value | None = None


#: Set by `kinkgrad.certify` while a certified pass runs (per thread): every catalog call
#: uses this value, whatever the policies, attached modules or `kink=` keywords say.
FORCED = _Forced()


class _Replay(threading.local):
    active: bool = False


#: True while `kinkgrad.certify` replays a forward (its tangent and probe passes, per
#: thread): module-level counters (e.g. steps counted per forward) should skip it.
REPLAY = _Replay()


def dispatch(
    spec: OpSpec, func: Callable, args: tuple, kwargs: dict, value: Value | None = None
) -> Any:
    """Run `func(*args, **kwargs)`, PyTorch's own op, under `value` (default: the
    active policy for `spec`), and report it to the active watchers."""
    key = spec.name
    if spec.route is not None:
        routed = spec.route(args, kwargs)
        if routed is not None:
            key = f"{spec.name}:{routed}"  # a policy for either name reaches it (COVERS)
            spec = spec_by_name(routed)
    if FORCED.value is not None:
        value = FORCED.value
    elif value is None:
        resolved = STATE.resolved
        value = resolved.get(key)
        if value is None:
            value = resolved.get(spec.name, "torch")
    watchers = STATE.watchers
    if value == "torch" and not watchers:
        return func(*args, **kwargs)
    call = spec.family.bind(func, args, kwargs)
    for w in watchers:
        w.before(spec, call)
    if value == "torch":
        out = call.run()
    elif value == "directional":
        if not DIRECTIONAL:
            raise RuntimeError(
                "kinkgrad: the 'directional' policy needs forward tangents; use "
                "kinkgrad.certified_grad or kinkgrad.certified_backward"
            )
        out = DIRECTIONAL[0](spec, call, value)
    else:
        out = spec.family.apply(call, value)
    for w in watchers:
        replaced = w.after(spec, call, out)  # a watcher may route `out` through an identity
        if replaced is not None:
            out = replaced
    return out
