"""Multi-process sums of `kinkgrad.watch` counts over `torch.distributed` ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .watch_report import COUNTS


def distributed() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = distributed()
    return dist.get_rank() if dist is not None else 0


def all_reduce(dist: Any, rows: list, sort_key: Callable) -> list:
    """Sum rows over ranks; ranks may have seen different keys, so the union first."""
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, [k for k, _ in rows])
    union = sorted({k for ks in keys for k in ks}, key=sort_key)
    if not union:
        return []
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    where = {k: i for i, k in enumerate(union)}
    table = torch.zeros(len(union), len(COUNTS), dtype=torch.int64)
    for k, counts in rows:
        table[where[k]] = torch.tensor(counts, dtype=torch.int64)
    table = table.to(device)
    dist.all_reduce(table)
    return list(zip(union, table.cpu().tolist(), strict=True))
