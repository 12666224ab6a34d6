"""Certified-step overhead: `python benchmarks/certified_overhead.py` (same as
`kinkgrad bench certified`)."""

from kinkgrad.bench.certified import main

if __name__ == "__main__":
    main()
