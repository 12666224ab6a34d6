"""Overhead benchmarks: each case times plain PyTorch and kinkgrad side by side,
interleaved in one process, and prints median ratios (never lone absolute times).

`kinkgrad bench NAME` runs `kinkgrad.bench.NAME` (policy, watch, certified, compiled,
phases); the
scripts in `benchmarks/` call the same functions.
"""

from __future__ import annotations

import argparse
import importlib

CASES = ("policy", "watch", "certified", "compiled", "phases")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kinkgrad bench", description=__doc__)
    parser.add_argument("case", choices=CASES + ("all",))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant (>= 30)")
    parser.add_argument("--quick", action="store_true", help="few steps, for smoke tests")
    args, rest = parser.parse_known_args(argv)
    for case in CASES if args.case == "all" else (args.case,):
        module = importlib.import_module(f"kinkgrad.bench.{case}")
        module.main(steps=5 if args.quick else args.steps, extra=rest)
    return 0
