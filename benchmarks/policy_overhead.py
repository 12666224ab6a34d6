"""Policy overhead: `python benchmarks/policy_overhead.py` (same as `kinkgrad bench policy`)."""

from kinkgrad.bench.policy import main

if __name__ == "__main__":
    main()
