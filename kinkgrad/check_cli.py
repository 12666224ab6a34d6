"""`kinkgrad check MODULE:FUNCTION`: `kinkgrad.check` from the command line.

Exit status: 0 passed, 1 failed, 3 inconclusive, 2 a user error (one line on stderr,
no traceback: a module that does not import, a function that raises, a bad point).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .check import check

#: Largest input --shape may ask for (elements): the check evaluates f a few hundred
#: times, so anything larger is a mistake on the command line.
MAX_ELEMENTS = 10_000_000

EXIT = {"passed": 0, "failed": 1, "inconclusive": 3}
#: Most random directions --directions may ask for (each costs ~40 evaluations of f).
MAX_DIRECTIONS = 10_000

_CLI_HELP = """\
Is backprop's gradient of FUNCTION at a point a Clarke generalized gradient?
Verdict: passed, failed (with a certificate: a jump, or f differentiable with another
gradient) or inconclusive.

Two ways to give the point:
  * no --at/--shape: FUNCTION() takes no arguments and returns (f, inputs), inputs a
    tensor or a tuple of tensors;
  * --at / --shape, once per input: FUNCTION is f itself; --at takes a JSON number or
    nested list of numbers ('[0, 1.5, -2]'), --shape a comma-separated shape ('3,4')
    filled with standard normal values from --seed.
MODULE is a dotted module name (importable from the current directory) or a path to a
.py file. Exit status: 0 passed, 1 failed, 3 inconclusive, 2 bad arguments or a
function that raises.

examples:
  kinkgrad check mypkg.cases:relu_identity
  kinkgrad check cases.py:f --at '[0.0]' --policy relu=0.5
"""


class UserError(ValueError):
    """A mistake on the command line or in the user's code: one line, exit 2."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _load(target: str) -> Callable[..., Any]:
    if ":" not in target:
        raise UserError(f"expected MODULE:FUNCTION, got {target!r}")
    mod_name, fn_name = target.rsplit(":", 1)
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            path = os.path.abspath(mod_name)
            if not os.path.exists(path):
                raise UserError(f"no such file: {mod_name}")
            name = "_kinkgrad_check_" + os.path.splitext(os.path.basename(path))[0]
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise UserError(f"cannot load {mod_name} as a Python module")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except UserError:
        raise
    except SyntaxError as e:
        raise UserError(
            f"module {mod_name} has a syntax error (line {e.lineno}): {e.msg}"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is theirs
        raise UserError(f"module {mod_name} failed to import: {_one_line(e)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"{mod_name} has no callable {fn_name!r}")
    return fn


def _policy_values(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--policy expects OP=VALUE (e.g. relu=1.0), got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value: Any = float(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


def _numbers(v: Any) -> bool:
    if isinstance(v, list):
        return all(_numbers(u) for u in v)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _point(raw: str, dtype: torch.dtype) -> Tensor:
    try:
        v = json.loads(raw)
    except (json.JSONDecodeError, ValueError):
        raise UserError(
            f"--at expects a JSON number or nested list of numbers, got {raw!r}"
        ) from None
    if not _numbers(v):
        raise UserError(
            f"--at expects finite numbers (a number or a nested list of them), got {raw!r}"
        )
    try:
        return torch.tensor(v, dtype=dtype)
    except (ValueError, TypeError) as e:
        raise UserError(f"--at {raw!r} is not a rectangular list of numbers ({e})") from None


def _shape(raw: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--shape expects comma-separated positive integers, got {raw!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise UserError(f"--shape expects comma-separated positive integers, got {raw!r}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise UserError(
            f"--shape {raw!r} has {math.prod(shape):,} elements; at most {MAX_ELEMENTS:,} allowed"
        )
    return shape


def _cli_inputs(args: argparse.Namespace, fn: Callable[..., Any]) -> tuple[Callable, list[Tensor]]:
    dtype = getattr(torch, args.dtype)
    if args.at or args.shape:
        gen = torch.Generator().manual_seed(args.seed if args.seed is not None else 0)
        inputs = [_point(a, dtype) for a in args.at]
        for s in args.shape:
            inputs.append(torch.randn(_shape(s), generator=gen, dtype=torch.float64).to(dtype))
        return fn, [x.requires_grad_() for x in inputs]
    try:
        made = fn()
    except TypeError as e:
        raise UserError(
            f"FUNCTION() failed ({e}); if FUNCTION is f itself, give the point with --at or --shape"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"FUNCTION() raised {_one_line(e)}") from None
    if not (isinstance(made, tuple) and made and callable(made[0])):
        raise UserError(
            f"with no --at/--shape, FUNCTION() must return (f, inputs); got {type(made).__name__}"
        )
    f, rest = made[0], made[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = tuple(rest[0])
    inputs = []
    for x in rest:
        if not isinstance(x, Tensor):
            raise UserError(f"inputs must be tensors, got {type(x).__name__}")
        inputs.append(x if x.requires_grad else x.detach().clone().requires_grad_())
    return f, inputs


def cli(argv: list[str]) -> int:
    """`kinkgrad check MODULE:FUNCTION [--at JSON]... [--shape S]... [options]`."""
    parser = argparse.ArgumentParser(
        prog="kinkgrad check",
        description=_CLI_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="MODULE:FUNCTION")
    parser.add_argument("--at", action="append", default=[], help="one input as JSON")
    parser.add_argument("--shape", action="append", default=[], help="one random input")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--directions", type=int, default=16)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--policy", action="append", default=[], help="OP=VALUE (or default=VALUE)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if not 1 <= args.directions <= MAX_DIRECTIONS:
            raise UserError(
                f"--directions must be an integer in [1, {MAX_DIRECTIONS}], got {args.directions}"
            )
        pol = _policy_values(args.policy)
        fn = _load(args.target)
        f, inputs = _cli_inputs(args, fn)
        report = _run(f, inputs, pol, args)
    except SystemExit as e:
        # sys.exit() in the user's module or f must not pass for a verdict (exit 0)
        print(
            f"kinkgrad check: the module or function called sys.exit({e.code!r}); no verdict",
            file=sys.stderr,
        )
        return 2
    except Exception as e:  # noqa: BLE001 - the user's f may raise anything: one line
        msg = str(e) if isinstance(e, UserError) else _one_line(e)
        print(f"kinkgrad check: {msg}", file=sys.stderr)
        return 2
    print(report)
    return EXIT[report.verdict]


def _run(f: Callable, inputs: list[Tensor], pol: dict[str, Any], args: argparse.Namespace) -> Any:
    from .policy import policy

    if not pol:
        return check(f, *inputs, directions=args.directions, seed=args.seed)
    default = pol.pop("default", None)
    with policy(default, **pol):
        return check(f, *inputs, directions=args.directions, seed=args.seed)
