"""`python -m kinkgrad.study ...` (also under `torchrun --nproc_per_node=N -m kinkgrad.study`)."""

from .cli import cli

raise SystemExit(cli())
