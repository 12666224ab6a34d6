"""Run a study: lock the directory, resume, run what is missing, write, report.

Configurations run in this process (`--jobs 1`), in a local process pool (`--jobs N`),
as Ray tasks (`--executor ray`, see `executors`), or one at a time data-parallel under
`torchrun` (all ranks train together, rank 0 writes). In every mode the driver alone
writes the run directory, each finished configuration at once.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import executors, results
from .config import RunKey, StudyConfig

Log = Callable[[str], None]


@functools.cache
def _dataset(name: str, train_size: int, test_size: int):
    from .data import load

    return load(name, train_size, test_size)


def run_one(cfg: StudyConfig, key: RunKey, world_size: int = 1) -> dict[str, Any]:
    """Train one configuration and return its full result record (unsealed)."""
    from .train import run_config

    data = _dataset(cfg.data, cfg.train_size, cfg.test_size)
    rec = run_config(cfg, key, data)
    return {
        "id": key.id,
        "key": key.as_dict(),
        "settings_hash": cfg.settings_hash(world_size),
        # Which seeds get the extra policies depends on the seed list, which is not in
        # the settings hash: a record made for another seed list is not reused.
        "extra_policies": list(cfg.extra_for(key)),
        **rec,
    }


def _work(args: tuple[StudyConfig, RunKey, int]) -> dict[str, Any]:
    """One configuration: the unit of work every executor runs (top level: picklable)."""
    return run_one(*args)


def _extras_of(rec: dict[str, Any]) -> list[str]:
    if "extra_policies" in rec:
        return list(rec["extra_policies"])
    from .policies import REGISTRY  # records made before the field existed

    return [n for n in rec["policies"].values() if n in REGISTRY]


def reusable(cfg: StudyConfig, done: dict[str, dict[str, Any]]) -> tuple[dict, list[str]]:
    """The finished records that a fresh run of `cfg` would give as they are, and one
    note per record that must be run again (made for another seed list)."""
    keep, notes = {}, []
    for key in cfg.grid():
        rec = done.get(key.id)
        if rec is None:
            continue
        want, have = list(cfg.extra_for(key)), _extras_of(rec)
        if want != have:
            notes.append(
                f"{key.id} was saved with extra policies {have or 'none'}, but with seeds "
                f"{list(cfg.seeds)} and extra_seeds {cfg.extra_seeds} it gets "
                f"{want or 'none'}; running it again"
            )
            continue
        keep[key.id] = rec
    return keep, notes


def jobs_for(cfg: StudyConfig, todo: int) -> int:
    if cfg.jobs:
        n = cfg.jobs
    elif cfg.device == "cuda":
        n = 1
    else:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(n or 1, todo))


def run_study(
    cfg: StudyConfig,
    out: Path,
    *,
    log: Log,
    warn: Log,
    progress: Any = None,
    overwrite: bool = False,
    on_resume: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every configuration of `cfg` not yet finished in `out`; return the records
    of the whole grid (grid order) and the manifest. Raises LockedError, ConfigError."""
    world = _world_size()
    shared = False

    def share(ids: list[str] | None) -> None:  # exactly once, also when failing early
        nonlocal shared
        if not shared:
            shared = True
            _share_todo(ids, world)

    try:
        out.mkdir(parents=True, exist_ok=True)
        with results.lock(out):
            for msg in results.STALE:
                warn(msg)
            results.STALE.clear()
            return _run_locked(cfg, out, world, share, log, warn, progress, overwrite, on_resume)
    finally:
        share(None)


def _run_locked(cfg, out, world, share, log, warn, progress, overwrite, on_resume):
    from .config import ConfigError

    if (out / results.MANIFEST).exists() and results.read_manifest(out) is None:
        warn(f"{out / results.MANIFEST} is not a valid manifest; it will be rewritten")
    old = results.read_manifest(out)
    h = cfg.settings_hash(world)
    if old is not None and old.get("settings_hash") not in (None, h) and not overwrite:
        raise ConfigError(
            f"{out} holds a study made with other settings ({_settings_diff(old, cfg)}); "
            f"use another --out directory, or --overwrite to start it again"
        )
    store = results.ResultStore(out)
    if overwrite:
        store.path.unlink(missing_ok=True)
        old = None
    for problem in store.load():
        warn(problem)
    other = store.other_settings(h)
    if other and not overwrite:  # the guard holds without the manifest too
        counts = ", ".join(f"{n} with settings hash {k}" for k, n in other.items())
        raise ConfigError(
            f"{out / results.RESULTS} holds results made with other settings ({counts}; "
            f"this run's settings hash is {h}); use another --out directory, or --overwrite "
            f"to start it again"
        )
    grid = cfg.grid()
    done, notes = reusable(cfg, store.done(h))
    for note in notes:
        warn(note)
    todo = [k for k in grid if k.id not in done]
    share([k.id for k in todo])
    data = _dataset(cfg.data, cfg.train_size, cfg.test_size)  # fails before any write
    manifest = {
        "study": "kinkgrad study",
        "command": os.environ.get("KINKGRAD_STUDY_COMMAND"),
        "config": cfg.as_dict(),
        "settings": cfg.settings(),
        "settings_hash": h,
        "seeds": list(cfg.seeds),
        "configurations": len(grid),
        "world_size": world,
        "environment": results.environment(cfg.device),
        "executor": cfg.executor,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "resumed_with": len(grid) - len(todo),
    }
    same = old is not None and old.get("settings_hash") == h
    manifest["first_started"] = old.get("first_started") if same else manifest["started"]
    results.write_manifest(out, manifest)
    if done:
        log(f"resuming: {len(grid) - len(todo)} of {len(grid)} configurations already done")
        if on_resume is not None:
            on_resume(len(grid) - len(todo))
    started = time.perf_counter()
    log(f"data: {data.describe()}")
    manifest["data"] = data.describe()

    def finished(rec: dict[str, Any]) -> None:
        store.add(rec)  # atomically, as soon as the configuration ends
        if progress is not None:
            progress(rec)

    jobs = 1 if world > 1 else jobs_for(cfg, len(todo))
    manifest["jobs"] = jobs
    if todo:
        # Longest first (CNNs, then MLPs), so the workers finish together.
        todo = sorted(todo, key=lambda k: k.model != "cnn") if jobs > 1 else todo
        kind = "local" if world > 1 else cfg.executor
        try:
            executor = executors.make(kind, jobs, cfg.ray_address or None)
            with executor:
                manifest["workers"] = executor.workers
                manifest["worker_threads"] = (
                    _threads() if isinstance(executor, executors.Serial) else 1
                )
                units = [(cfg, k, world) for k in todo]
                for _, rec in executor.map_unordered(_work, units):
                    finished(rec)
        except executors.ExecutorError as e:
            raise ConfigError(str(e)) from None
    by_id = store.done(h)
    records = [by_id[k.id] for k in grid]
    store.write_csv(records)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest["train_seconds_this_run"] = round(time.perf_counter() - started, 2)
    manifest["train_seconds_all_configs"] = round(sum(r.get("elapsed_s") or 0 for r in records), 2)
    manifest["cpu_seconds_all_configs"] = round(sum(r.get("cpu_s") or 0 for r in records), 2)
    results.write_manifest(out, manifest)
    return records, manifest


def _share_todo(ids: list[str] | None, world: int) -> list[str] | None:
    """Rank 0 tells the other ranks which configurations to run (None: stop)."""
    if world == 1:
        return ids
    import torch.distributed as dist

    box = [ids]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow_study(cfg: StudyConfig) -> int:
    """Ranks other than 0 under torchrun: train the configurations rank 0 names."""
    world = _world_size()
    ids = _share_todo(None, world)
    if ids is None:
        return 1
    keys = {k.id: k for k in cfg.grid()}
    for ident in ids:
        run_one(cfg, keys[ident], world)
    return 0


def _settings_diff(old: dict[str, Any], cfg: StudyConfig) -> str:
    before = old.get("settings") or {}
    now = cfg.settings()
    diffs = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k) != v]
    return ", ".join(diffs) or "different world size"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
