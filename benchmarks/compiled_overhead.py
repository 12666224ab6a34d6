"""Compiled overhead: `python benchmarks/compiled_overhead.py` (same as `kinkgrad bench
compiled`): a torch.compile'd training step under kg.policy / kg.watch vs plain."""

from kinkgrad.bench.compiled import main

if __name__ == "__main__":
    main()
