"""Where the time goes: `python benchmarks/step_phases.py` (same as `kinkgrad bench
phases`): per-phase medians of a training step, plain / mode only / policy / watch,
eager and compiled."""

from kinkgrad.bench.phases import main

if __name__ == "__main__":
    main()
