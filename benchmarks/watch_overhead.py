"""Watch overhead: `python benchmarks/watch_overhead.py` (same as `kinkgrad bench watch`)."""

from kinkgrad.bench.watch import main

if __name__ == "__main__":
    main()
