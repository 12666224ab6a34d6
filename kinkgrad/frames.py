"""Policy values, their validation, and the per-thread stack of policy frames.

A policy says which derivative to use *exactly* at a kink, per op. Everything here is
data: the catalog says which values an op accepts, `policy(...)` pushes a frame, and
the interception layer reads the merged view (`STATE.resolved`) at forward time.
"""

from __future__ import annotations

import difflib
import math
import numbers
import threading
from collections.abc import Mapping

from .catalog import OpSpec, catalog, spec_by_name

Value = float | str

#: Names for numeric values of elementwise kink ops: derivative = (1 - a) D- + a D+.
KINK_ALIASES: dict[str, float] = {"left": 0.0, "right": 1.0, "mid": 0.5}
TIE_RULES = ("first", "split")
JUMP_RULES = ("zero", "ste")
#: Accepted by every op: PyTorch's own choice, and the forward-tangent piece selection.
COMMON = ("torch", "directional")


class _State(threading.local):
    """Per-thread policy stack and watchers (TorchFunctionMode stacks are per thread too)."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Value]] = []
        # op name -> value, for ops some frame mentions; read once per intercepted call.
        self.resolved: dict[str, Value] = {}
        self.watchers: list = []


STATE = _State()


def allowed_values(spec: OpSpec) -> str:
    """Human description of what `spec` accepts, used in every error message."""
    if spec.kind == "kink":
        lo, hi = spec.value_range
        rng = f"a number in [{lo:g}, {hi:g}]"
        return f"{rng}, {', '.join(map(repr, KINK_ALIASES))}, {', '.join(map(repr, COMMON))}"
    rules = TIE_RULES if spec.kind == "tie" else JUMP_RULES
    return ", ".join(map(repr, rules + COMMON))


def validate(spec: OpSpec, value: object) -> Value:
    """Return the canonical form of `value` for `spec`, or raise a ValueError naming both."""
    where = f"kinkgrad policy for {spec.name!r} ({spec.kind} op)"
    value = _plain_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(
            f"{where}: expected {allowed_values(spec)}; got {value!r} of type "
            f"{type(value).__name__}"
        )
    if isinstance(value, str):
        if value in COMMON:
            return value
        if spec.kind == "kink" and value in KINK_ALIASES:
            return KINK_ALIASES[value]
        if spec.kind == "tie" and value in TIE_RULES:
            return value
        if spec.kind == "jump" and value in JUMP_RULES:
            return value
        raise ValueError(f"{where}: {value!r} is not allowed; allowed: {allowed_values(spec)}")
    if spec.kind != "kink":
        raise ValueError(
            f"{where}: a number ({value!r}) is only meaningful for elementwise kink ops; "
            f"allowed: {allowed_values(spec)}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: {value!r} is not finite; allowed: {allowed_values(spec)}")
    lo, hi = spec.value_range
    if not lo <= value <= hi:
        raise ValueError(
            f"{where}: {value!r} is outside the catalog's range; allowed: {allowed_values(spec)}"
        )
    return value


def _plain_number(value: object) -> object:
    """numpy scalars and 0-d real tensors are numbers too (`np.float32(0.5)`)."""
    if isinstance(value, (bool, int, float, str)) or type(value).__name__ == "bool_":
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    shape = getattr(value, "shape", None)
    if callable(item) and shape == () and type(value).__module__.startswith(("torch", "numpy")):
        inner = item()
        if isinstance(inner, (int, float)) and not isinstance(inner, bool):
            return float(inner)
    return value


#: A policy for a name reaches every spelling of that function: keys it also sets in
#: its frame, unless the frame names them itself (the more specific name wins).
#: "hardtanh:relu6" is the key of `F.hardtanh(x, 0, 6)` calls, which PyTorch routes
#: to relu6 (nn.ReLU6 makes them): a hardtanh policy and a relu6 policy both reach it.
COVERS: dict[str, tuple[str, ...]] = {
    "clamp": ("clamp_min", "clamp_max"),
    "hardtanh": ("hardtanh:relu6",),
    "relu6": ("hardtanh:relu6",),
}
#: Names covered by another: set after the general names, so they win.
_SPECIFIC = {"clamp_min", "clamp_max", "relu6"}


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _default_applies(spec: OpSpec, value: object) -> bool:
    if isinstance(value, str) and value in COMMON:
        return True
    if spec.kind == "kink":
        return isinstance(value, (int, float)) or value in KINK_ALIASES
    return value in (TIE_RULES if spec.kind == "tie" else JUMP_RULES)


def make_frame(op_values: Mapping[str, object], default: object = None) -> dict[str, Value]:
    """Validate `op_values` (and `default`) against the catalog into one frame.

    Frames are read-only once made; a training loop that opens the same `policy(...)`
    every step gets the same frame back instead of validating it again.
    """
    try:
        # Types are part of the key: True == 1.0 as a dict key, but only one is valid.
        key = (type(default), default, tuple((k, type(v), v) for k, v in op_values.items()))
        hash(key)
    except TypeError:  # unhashable values: validate (and refuse) without caching
        return _make_frame(op_values, default)
    frame = _FRAMES.get(key)
    if frame is None:
        frame = _FRAMES[key] = _make_frame(op_values, default)
        if len(_FRAMES) > 256:  # bounded: policies are few, but keys could be generated
            _FRAMES.pop(next(iter(_FRAMES)))
    return frame


_FRAMES: dict[tuple, dict[str, Value]] = {}


def _make_frame(op_values: Mapping[str, object], default: object) -> dict[str, Value]:
    frame: dict[str, Value] = {}
    if default is not None:
        matched = [s for s in catalog() if _default_applies(s, default)]
        if not matched:
            raise ValueError(
                f"kinkgrad policy default={default!r} fits no op kind; use a number or "
                f"{', '.join(map(repr, KINK_ALIASES))} (kink ops), {TIE_RULES} (tie ops), "
                f"{JUMP_RULES} (jump ops), or {COMMON}"
            )
        for spec in matched:
            frame[spec.name] = validate(spec, default)
            for key in COVERS.get(spec.name, ()):
                frame[key] = frame[spec.name]
    names = [s.name for s in catalog()]
    for name in sorted(op_values, key=lambda n: n in _SPECIFIC):
        spec = spec_by_name(name)
        if spec is None:
            raise ValueError(f"kinkgrad policy: unknown op {name!r}{_suggest(name, names)}")
        frame[spec.name] = validate(spec, op_values[name])
        for key in COVERS.get(spec.name, ()):
            covered = spec_by_name(key)
            # The covered op validates the value itself (same kinds; the message names it).
            frame[key] = frame[spec.name] if covered is None else validate(covered, op_values[name])
    return frame


def _recompute() -> None:
    frames = STATE.frames
    if len(frames) == 1:  # the common case; frames are never modified once made
        STATE.resolved = frames[0]
        return
    merged: dict[str, Value] = {}
    for frame in frames:
        merged.update(frame)
    STATE.resolved = merged


def push_frame(frame: dict[str, Value]) -> None:
    STATE.frames.append(frame)
    _recompute()


def pop_frame(frame: dict[str, Value]) -> None:
    # Identity search, not stack top: attach()'s hooks and user blocks may interleave.
    for i in range(len(STATE.frames) - 1, -1, -1):
        if STATE.frames[i] is frame:
            del STATE.frames[i]
            break
    _recompute()
