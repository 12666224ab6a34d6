"""Two processes (gloo, CPU) train one DistributedDataParallel model under
`kinkgrad.watch`; `records(all_ranks=True)` must equal the sum of every rank's own
records, key by key, on every rank."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn as nn

WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import kinkgrad as kg

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        torch.manual_seed(0)
        # No bias in the first layer: a zero input row puts all 8 ReLU inputs exactly on
        # the kink, at every step. Rank r feeds 1 + r such rows, so the ranks differ.
        model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2))
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)
        with kg.watch(ddp) as w:
            for _ in range(STEPS):
                x = torch.randn(6, 4, generator=gen)
                x[: 1 + rank] = 0.0
                loss = ddp(x).square().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        result = {
            "mine": w.records(),
            "all": w.records(all_ranks=True),
            "total": w.summary(all_ranks=True).total,
            "saved": str(w.save(Path(out) / "all.jsonl", all_ranks=True)),
        }
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
        # Leave together: a rank tearing gloo down while the other still talks to it
        # can abort the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_all_ranks_is_the_sum_of_ranks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    key = lambda r: (r["step"], r["module"], r["op"], r["dtype"])
    counts = ("calls", "elements", "sites", "exact", "effective", "near", "samples")
    expected: dict[tuple, dict[str, int]] = {}
    for rank, res in enumerate(results):
        assert {r["rank"] for r in res["mine"]} == {rank}
        for r in res["mine"]:
            acc = expected.setdefault(key(r), dict.fromkeys(counts, 0))
            for c in counts:
                acc[c] += r[c]
    for res in results:
        assert {r["rank"] for r in res["all"]} == {"all"}
        assert {key(r): {c: r[c] for c in counts} for r in res["all"]} == expected
    assert results[0]["all"] == results[1]["all"]
    # The numbers themselves: module.1 is the ReLU (DDP wraps the model as `module`).
    relu = [r for r in results[0]["all"] if r["op"] == "relu"]
    assert [(r["step"], r["module"]) for r in relu] == [(s, "module.1") for s in range(STEPS)]
    per_step = 8 * (1 + 2)  # rank 0: one zero row, rank 1: two; 8 units each
    assert all(r["exact"] == per_step and r["samples"] == 3 for r in relu)
    assert results[0]["total"]["exact"] == STEPS * per_step
    # save(all_ranks=True) writes once, on rank 0.
    assert results[0]["saved"].endswith("all.jsonl") and results[1]["saved"] == "None"
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == results[0]["all"]
