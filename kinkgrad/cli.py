"""`kinkgrad study | conventions | check | bench | watch-summary`.

Each subcommand lives with the code it exposes and is imported only when used, so
`kinkgrad conventions` does not pay for the study's imports.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "study": ("kinkgrad.study.cli", "Run the study: does the derivative at the kink matter?"),
    "conventions": ("kinkgrad.conventions", "What PyTorch (and JAX) return at every kink."),
    "check": ("kinkgrad.check_cli", "Is backprop's gradient a Clarke gradient at a point?"),
    "bench": ("kinkgrad.bench", "Overhead vs plain: policy|watch|certified|compiled|phases."),
    "watch-summary": ("kinkgrad.watch", "Print a saved watch record file as a table."),
}


def _usage() -> str:
    lines = ["usage: kinkgrad COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"kinkgrad: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.cli(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
