"""The study's settings: grid axes, fixed settings, TOML loading and validation.

A study is a grid of *configurations* (model x precision x bias mode x batch norm x
seed). Everything else (data, epochs, optimizer, policies, ...) is one value for the
whole study and goes into `settings_hash`, so results made with other settings are
never mixed in when a study resumes.

>>> cfg = StudyConfig(precisions=("float32",), seeds=(0,))
>>> cfg.validate()
>>> [k.id for k in cfg.grid()][:2]
['mlp-float32-fused-bn0-s0', 'mlp-float32-separate-bn0-s0']
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS = ("mlp", "cnn")
PRECISIONS = ("float64", "float32", "bfloat16", "float16")
BIAS_MODES = ("fused", "separate")
DATASETS = ("digits", "mnist", "mnist1d")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("cpu", "cuda")
EXECUTORS = ("local", "ray")
#: Bumped when the meaning of a result record changes; part of `settings_hash`.
FORMAT = 1
#: Seeds seed `torch.Generator`s (with offsets): beyond 32 bits they would overflow.
MAX_SEED = 2**32 - 1
#: Upper bounds that keep a mistyped size from allocating until the machine gives up
#: (an MLP of width 8192 already holds about 2e8 weights over its runs).
MAX_SIZE = {"width": 8192, "channels": 1024, "batch_size": 1_000_000, "epochs": 100_000}

#: Grid axes: field -> allowed values (None: any, checked separately).
AXES = {
    "models": MODELS,
    "precisions": PRECISIONS,
    "bias": BIAS_MODES,
    "batchnorm": (False, True),
    "seeds": None,
}


class ConfigError(ValueError):
    """A bad study setting; the CLI prints it and exits with status 2."""


@dataclass(frozen=True)
class RunKey:
    """One configuration of the grid: the paired runs share all of it."""

    model: str
    precision: str
    bias: str
    batchnorm: bool
    seed: int

    @property
    def id(self) -> str:
        return f"{self.model}-{self.precision}-{self.bias}-bn{int(self.batchnorm)}-s{self.seed}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StudyConfig:
    """All settings of one study. Defaults are the default study (`kinkgrad study`).

    The default sizes were chosen so that the default grid (96 configurations, each a
    reference run, a policy run and a noise-floor run in lockstep, plus a certified run
    for the first seed's 32 configurations) finishes within three minutes on two CPU
    cores; see `QUICK` for the CI grid.
    """

    # --- grid axes ---
    models: tuple[str, ...] = MODELS
    precisions: tuple[str, ...] = PRECISIONS
    bias: tuple[str, ...] = BIAS_MODES
    batchnorm: tuple[bool, ...] = (False, True)
    seeds: tuple[int, ...] = (0, 1, 2)
    # --- policies: run i uses ReLU'(0) = kinks[i] and max-pool tie rule ties[i]; run 0
    # is the reference every other policy is compared with. `extra_policies` names
    # further registered policies (`kinkgrad.study.policies.REGISTRY`), trained for the
    # first `extra_seeds` seeds of the grid only (0: every seed): the certified policy
    # costs about as much as the rest of a configuration together.
    kinks: tuple[Any, ...] = (0.0, 1.0)
    ties: tuple[str, ...] = ("first", "split")
    extra_policies: tuple[str, ...] = ("certified",)
    extra_seeds: int = 1
    noise_floor: bool = True
    # a certified policy's kink crossings are measured every k-th step (0: never)
    crossings_every: int = 1
    # --- fixed settings ---
    data: str = "digits"
    epochs: int = 3
    batch_size: int = 32
    width: int = 32
    channels: int = 4
    train_size: int = 0  # 0: the whole training split
    test_size: int = 0
    optimizer: str = "sgd"
    lr: float = 0.0  # 0: the optimizer's default (sgd 0.05, adam 0.002)
    momentum: float = 0.9
    device: str = "cpu"
    # --- execution (not part of the results' identity) ---
    jobs: int = 0  # 0: one per CPU core on cpu, 1 on cuda
    executor: str = "local"  # or "ray": each configuration a Ray task
    ray_address: str = ""  # "": start a local Ray; else join this cluster
    quick: bool = False

    # ----------------------------------------------------------------------------------
    def grid(self) -> list[RunKey]:
        """The configurations, in the order they run."""
        return [
            RunKey(m, p, b, bn, s)
            for m in self.models
            for p in self.precisions
            for bn in self.batchnorm
            for b in self.bias
            for s in self.seeds
        ]

    def extra_for(self, key: RunKey) -> tuple[str, ...]:
        """The extra policies configuration `key` trains (see `extra_seeds`)."""
        if self.extra_seeds and key.seed not in self.seeds[: self.extra_seeds]:
            return ()
        return self.extra_policies

    @property
    def learning_rate(self) -> float:
        if self.lr:
            return self.lr
        return 0.05 if self.optimizer == "sgd" else 0.002

    def settings(self) -> dict[str, Any]:
        """What besides the RunKey determines a result (hashed into `settings_hash`)."""
        return {
            "format": FORMAT,
            "data": self.data,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "width": self.width,
            "channels": self.channels,
            "train_size": self.train_size,
            "test_size": self.test_size,
            "optimizer": self.optimizer,
            "lr": self.learning_rate,
            "momentum": self.momentum,
            "kinks": [_jsonable(k) for k in self.kinks],
            "ties": list(self.ties),
            "extra_policies": list(self.extra_policies),
            "extra_seeds": self.extra_seeds,
            "noise_floor": self.noise_floor,
            "crossings_every": self.crossings_every,
            "device": self.device,
        }

    def settings_hash(self, world_size: int = 1) -> str:
        blob = json.dumps({**self.settings(), "world_size": world_size}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    # ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the setting, the value and what is allowed."""
        self._validate_types()
        for name, allowed in AXES.items():
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"{name}: the grid axis is empty; give at least one value")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name}: duplicate values in {list(values)}")
            for v in values:
                if allowed is not None and v not in allowed:
                    raise ConfigError(
                        f"{name}: unknown value {v!r}; allowed: {', '.join(map(str, allowed))}"
                    )
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ConfigError(f"seeds: {s!r} is not a non-negative integer")
            if s > MAX_SEED:
                raise ConfigError(f"seeds: {s} is too large; allowed: integers 0 to {MAX_SEED}")
        _one_of("data", self.data, DATASETS)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("device", self.device, DEVICES)
        _one_of("executor", self.executor, EXECUTORS)
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise ConfigError("executor: 'ray' needs the ray package: pip install 'kinkgrad[ray]'")
        if self.ray_address and self.executor != "ray":
            raise ConfigError(
                f"ray_address: {self.ray_address!r} is given but executor is "
                f"{self.executor!r}; add --executor ray"
            )
        for name, lo in (("epochs", 1), ("batch_size", 1), ("width", 1), ("channels", 1)):
            _int_at_least(name, getattr(self, name), lo)
        for name, hi in MAX_SIZE.items():
            if getattr(self, name) > hi:
                raise ConfigError(f"{name}: {getattr(self, name)} is too large; allowed: 1 to {hi}")
        for name in ("train_size", "test_size", "jobs", "crossings_every", "extra_seeds"):
            _int_at_least(name, getattr(self, name), 0)
        for name in ("lr", "momentum"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not v >= 0
                or not math.isfinite(v)
            ):
                raise ConfigError(f"{name}: expected a finite non-negative number, got {v!r}")
        if self.momentum >= 1:
            raise ConfigError(f"momentum: expected a number in [0, 1), got {self.momentum!r}")
        self._validate_policies()
        if self.data == "mnist1d" and importlib.util.find_spec("mnist1d") is None:
            raise ConfigError(
                "data: 'mnist1d' needs the mnist1d package: pip install 'kinkgrad[mnist1d]'"
            )
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("device: 'cuda' requested but torch.cuda.is_available() is False")

    def _validate_types(self) -> None:
        """Every value has the type its setting needs (a TOML file can hold anything)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _ITEM_TYPES:
                want, what = _ITEM_TYPES[f.name]
                bad = [x for x in v if isinstance(x, bool) != (want is bool)]
                bad += [x for x in v if not isinstance(x, want)]
                if bad:
                    raise ConfigError(f"{f.name}: {bad[0]!r} is not {what}; got {list(v)!r}")
            elif f.type in ("bool",) and not isinstance(v, bool):
                raise ConfigError(f"{f.name}: expected true or false, got {v!r}")
            elif f.type == "str" and not isinstance(v, str):
                raise ConfigError(f"{f.name}: expected a string, got {v!r}")

    def _validate_policies(self) -> None:
        from ..policy import make_frame
        from .policies import REGISTRY

        if len(self.kinks) != len(self.ties):
            raise ConfigError(
                f"kinks and ties pair up run by run; got {len(self.kinks)} kink values "
                f"{list(self.kinks)} and {len(self.ties)} tie rules {list(self.ties)}"
            )
        if not self.kinks:
            raise ConfigError("kinks: give at least the reference policy's ReLU'(0) value")
        for k, t in zip(self.kinks, self.ties, strict=True):
            try:
                make_frame({"relu": k, "max_pool1d": t, "max_pool2d": t})
            except ValueError as e:
                raise ConfigError(f"kinks/ties: {e}") from None
        for name in self.extra_policies:
            if name not in REGISTRY:
                raise ConfigError(
                    f"extra_policies: unknown policy {name!r}; registered: "
                    f"{', '.join(sorted(REGISTRY)) or '(none)'}"
                )
        if len(set(self.extra_policies)) != len(self.extra_policies):
            raise ConfigError(f"extra_policies: duplicate values in {list(self.extra_policies)}")
        everywhere = not self.extra_seeds or self.extra_seeds >= len(self.seeds)
        n = len(self.kinks) + (len(self.extra_policies) if everywhere else 0)
        if n < 2 and not self.noise_floor:
            raise ConfigError(
                "nothing to compare: give two policies or keep the noise floor"
                + ("" if everywhere else " (extra policies run for the first extra_seeds seeds)")
            )


#: Grid and policy lists: the type of each item (bool only where it is bool).
_ITEM_TYPES: dict[str, tuple[Any, str]] = {
    "models": (str, "a model name"),
    "precisions": (str, "a precision name"),
    "bias": (str, "a bias mode"),
    "batchnorm": (bool, "on/off (true or false)"),
    "seeds": (int, "an integer"),
    "kinks": ((int, float, str), "a number or an alias (left, mid, right)"),
    "ties": (str, "a tie rule name"),
    "extra_policies": (str, "a policy name"),
}


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, str) else float(v)


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: unknown value {value!r}; allowed: {', '.join(allowed)}")


def _int_at_least(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name}: expected an integer >= {lo}, got {value!r}")


#: `--quick`: a reduced grid for CI (both models, all precisions, one seed, one epoch).
QUICK = {
    "batchnorm": (False,),
    "bias": ("fused",),
    "seeds": (0,),
    "epochs": 1,
    "train_size": 640,
}

_TUPLE_FIELDS = {f.name for f in dataclasses.fields(StudyConfig) if str(f.type).startswith("tuple")}
_FIELDS = {f.name for f in dataclasses.fields(StudyConfig)}


def build(overrides: dict[str, Any], quick: bool = False) -> StudyConfig:
    """A StudyConfig from defaults, then `QUICK` if asked, then `overrides`."""
    values: dict[str, Any] = dict(QUICK) if quick else {}
    values.update(overrides)
    quick = values.pop("quick", quick)
    if not isinstance(quick, bool):
        raise ConfigError(f"quick: expected true or false, got {quick!r}")
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        import difflib

        hints = [
            f"{u!r}"
            + (
                f" (did you mean {c[0]!r}?)"
                if (c := difflib.get_close_matches(u, _FIELDS, 1))
                else ""
            )
            for u in unknown
        ]
        raise ConfigError(
            f"unknown setting(s): {', '.join(hints)}; known: {', '.join(sorted(_FIELDS))}"
        )
    for k in _TUPLE_FIELDS & set(values):
        v = values[k]
        values[k] = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    cfg = StudyConfig(**values, quick=quick)
    cfg.validate()
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys named like StudyConfig's fields.

    >>> # models = ["mlp"]; precisions = ["float32", "float16"]; epochs = 2
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {str(p)!r}") from None
    except IsADirectoryError:
        raise ConfigError(f"--config: {str(p)!r} is a directory, not a TOML file") from None
    except OSError as e:
        raise ConfigError(f"--config: cannot read {str(p)!r}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {str(p)!r}: not valid TOML: {e}") from None
    if "study" in data and isinstance(data["study"], dict):
        data = data["study"]
    return data
