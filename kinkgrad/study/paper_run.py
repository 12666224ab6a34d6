"""Run the paper protocol over a sweep: settings, chunks of initialisations, resumable store.

Files in the run directory (all written atomically, like the rest of the study):

- `paper_chunks.jsonl`: one checksummed record per finished (setting, chunk of
  initialisations), with every initialisation's result; the unit of resumption. A
  corrupted line is reported and its chunk runs again.
- `paper.json`: one row per setting (the fields of `ROW_FIELDS`), rewritten after
  every chunk from the chunks done so far.
- `paper_manifest.json`: the settings (and their hash), versions, machine, timings.

Only this driver writes; the chunks run anywhere (`paper.run_chunk` is a pure function
of a plain dict). Initialisation i is the same in every run with the same seed, and
chunk boundaries are multiples of `CHUNK`, so `--inits 1000` after a default run
reuses the initialisations already done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._files import atomic_write
from . import executors, paper, paper_stats, results
from .config import ConfigError

CHUNKS = "paper_chunks.jsonl"
ROWS = "paper.json"
MANIFEST = "paper_manifest.json"
#: Initialisations per unit of work (and per resumable record).
CHUNK = 25
#: Bumped when the meaning of a chunk record changes; part of the settings hash.
FORMAT = 1
ROW_FIELDS = (
    "precision depth width batch_size inits in_s share ci_low ci_high share_60k ci_low_60k "
    "ci_high_60k zeros relu_evals samples_per_pass seconds"
).split()
#: Default initialisations per setting: the default run (4 precisions, 784-256-256-256-10)
#: then takes about 2 minutes of the 5-minute budget on an idle 2-core machine.
DEFAULT_INITS = 200
QUICK_INITS = 10


@dataclass(frozen=True)
class PaperConfig:
    """Settings of a paper-protocol sweep (see `grid`)."""

    precisions: tuple[str, ...] = paper.PRECISIONS
    depths: tuple[int, ...] = (paper.DEFAULT_DEPTH,)
    widths: tuple[int, ...] = (paper.DEFAULT_WIDTH,)
    batch_sizes: tuple[int, ...] = (paper.DEFAULT_BATCH,)
    inits: int = DEFAULT_INITS
    seed: int = 0
    data: str = "mnist"
    train_size: int = 0
    jobs: int = 0

    def centre(self) -> tuple[int, int, int]:
        """The architecture the sweeps vary one axis of (the paper's default if listed)."""
        pick = lambda values, d: d if d in values else values[0]
        return (
            pick(self.depths, paper.DEFAULT_DEPTH),
            pick(self.widths, paper.DEFAULT_WIDTH),
            pick(self.batch_sizes, paper.DEFAULT_BATCH),
        )

    def grid(self) -> list[paper.Setting]:
        """Per precision, like the paper: depth varied at the centre's width and batch
        size, width at its depth and batch size, batch size at its architecture."""
        d0, w0, b0 = self.centre()
        out: list[paper.Setting] = []
        for p in self.precisions:
            cells = [(d, w0, b0) for d in self.depths]
            cells += [(d0, w, b0) for w in self.widths]
            cells += [(d0, w0, b) for b in self.batch_sizes]
            for d, w, b in sorted(set(cells), key=cells.index):
                out.append(paper.Setting(p, d, w, b))
        return out

    def settings(self) -> dict[str, Any]:
        """What decides a chunk's result (hashed); not `inits`, so runs can be extended."""
        return {
            "format": FORMAT,
            "seed": self.seed,
            "data": self.data,
            "train_size": self.train_size,
        }

    def settings_hash(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> None:
        for p in self.precisions:
            if p not in paper.PRECISIONS:
                raise ConfigError(
                    f"precisions: unknown value {p!r}; allowed: {', '.join(paper.PRECISIONS)}"
                )
        for name in ("depths", "widths", "batch_sizes"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"{name}: give at least one value")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100_000:
                    raise ConfigError(f"{name}: expected integers in 1..100000, got {v!r}")
        if (
            isinstance(self.inits, bool)
            or not isinstance(self.inits, int)
            or not 1 <= self.inits <= 10**6
        ):
            raise ConfigError(f"inits: expected an integer in 1..1000000, got {self.inits!r}")
        if (
            isinstance(self.train_size, bool)
            or not isinstance(self.train_size, int)
            or self.train_size < 0
        ):
            raise ConfigError(f"train_size: expected an integer >= 0, got {self.train_size!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(
                f"seeds: the paper protocol's seed must be in 0..2^63-1, got {self.seed!r}"
            )

    def tasks(self, settings: list[paper.Setting] | None = None) -> list[dict[str, Any]]:
        """Every unit of work of the sweep: (setting, initialisations [start, stop))."""
        return [
            {
                "setting": s.as_dict(),
                "start": start,
                "stop": min(start + CHUNK, self.inits),
                "seed": self.seed,
                "data": self.data,
                "train_size": self.train_size,
            }
            for s in (settings or self.grid())
            for start in range(0, self.inits, CHUNK)
        ]


def chunk_id(task: dict[str, Any]) -> str:
    return f"{paper.Setting(**task['setting']).id}-i{task['start']}-{task['stop']}"


# --------------------------------------------------------------------------------------
# store
# --------------------------------------------------------------------------------------


class ChunkStore:
    """`paper_chunks.jsonl`: checksummed chunk records, replaced atomically per chunk."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / CHUNKS
        self.records: dict[str, dict[str, Any]] = {}

    def load(self) -> list[str]:
        problems = []
        self.records = {}
        if not self.path.exists():
            return problems
        for n, line in enumerate(self.path.read_bytes().split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and _valid(rec)
            except (json.JSONDecodeError, UnicodeDecodeError):
                ok = False
            if not ok:
                problems.append(f"{self.path}: line {n} is corrupted; that chunk will be run again")
                continue
            self.records.setdefault(rec["id"] + "@" + rec["settings_hash"], rec)
        if problems:
            self._write()
        return problems

    def hashes(self) -> set[str]:
        return {r["settings_hash"] for r in self.records.values()}

    def done(self, settings_hash: str) -> dict[str, dict[str, Any]]:
        return {r["id"]: r for r in self.records.values() if r["settings_hash"] == settings_hash}

    def add(self, rec: dict[str, Any]) -> None:
        rec = results.seal(rec)
        self.records[rec["id"] + "@" + rec["settings_hash"]] = rec
        self._write()

    def _write(self) -> None:
        lines = [json.dumps(r, separators=(",", ":")) for r in self.records.values()]
        atomic_write(self.path, "".join(line + "\n" for line in lines))


def _valid(rec: dict[str, Any]) -> bool:
    if rec.get("checksum") != results.seal(dict(rec))["checksum"]:
        return False
    try:
        paper.Setting(**rec["setting"])
        return (
            isinstance(rec["id"], str)
            and isinstance(rec["settings_hash"], str)
            and isinstance(rec["inits"], list)
            and len(rec["inits"]) == rec["stop"] - rec["start"]
            and all(isinstance(i.get("in_s"), bool) for i in rec["inits"])
        )
    except (KeyError, TypeError, AttributeError):
        return False


# --------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------


def setting_chunks(cfg: PaperConfig, done: dict[str, dict[str, Any]], s: paper.Setting):
    """The finished chunks of setting `s` within cfg.inits, in order."""
    return [done[chunk_id(t)] for t in cfg.tasks([s]) if chunk_id(t) in done]


def row(s: paper.Setting, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """One `paper.json` row from a setting's chunks."""
    inits = [i for c in chunks for i in c["inits"]]
    n, k = len(inits), sum(i["in_s"] for i in inits)
    samples = chunks[0]["samples_per_pass"] if chunks else 0
    p = k / n if n else float("nan")
    lo, hi = paper_stats.wilson(k, n)
    to60 = lambda q: paper_stats.to_60k(q, samples) if samples else float("nan")
    return {
        **s.as_dict(),
        "inits": n,
        "in_s": k,
        "share": p,
        "ci_low": lo,
        "ci_high": hi,
        "share_60k": to60(p),
        "ci_low_60k": to60(lo),
        "ci_high_60k": to60(hi),
        "zeros": sum(i["zeros"] for i in inits),
        "relu_evals": sum(i["relu_evals"] for i in inits),
        "samples_per_pass": samples,
        "seconds": round(sum(c["seconds"] for c in chunks), 3),
    }


def rows(cfg: PaperConfig, done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for s in cfg.grid():
        chunks = setting_chunks(cfg, done, s)
        if chunks:
            out.append(row(s, chunks))
    return out


def write_rows(directory: Path, rows_: list[dict[str, Any]]) -> None:
    atomic_write(Path(directory) / ROWS, json.dumps(results.clean(rows_), indent=1) + "\n")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) else None


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM ends the run like Ctrl-C (finished chunks saved, workers stopped, lock
    removed), where nothing else handles it; the old handler comes back afterwards."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGTERM)
    if old is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _jobs(cfg: PaperConfig, todo: int) -> int:
    n = cfg.jobs or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    return max(1, min(n or 1, todo))


def _cost(task: dict[str, Any]) -> float:
    """Relative cost of a chunk, measured (float16 matmuls are slow on CPUs), so the
    most expensive run first and the workers finish together."""
    s = task["setting"]
    per_precision = {"float16": 9.0, "float64": 2.0, "float32": 1.0, "bfloat16": 0.6}
    w, d = s["width"], s["depth"]
    return (
        per_precision[s["precision"]] * (784 * w + (d - 1) * w * w) * (task["stop"] - task["start"])
    )


def run(
    cfg: PaperConfig,
    out: Path,
    *,
    log: Callable[[str], None],
    warn: Callable[[str], None],
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    executor: str = "local",
    address: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every chunk of `cfg` not yet in `out`; write paper.json; return (rows, manifest).

    Chunks run where `executor` says (`executors.make`: "local" or "ray" at `address`);
    whatever runs them, only this process writes `out`.

    Raises ConfigError when `out` holds paper results made with other settings (unless
    `overwrite`), results.LockedError when another study holds `out`.
    """
    cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    with _sigterm_interrupts(), results.lock(out):
        for msg in results.STALE:
            warn(msg)
        results.STALE.clear()
        store = ChunkStore(out)
        if overwrite:
            store.path.unlink(missing_ok=True)
        for problem in store.load():
            warn(problem)
        h = cfg.settings_hash()
        old = read_manifest(out)
        others = store.hashes() - {h}
        if old is not None and old.get("settings_hash") not in (None, h):
            others.add(old["settings_hash"])
        if others and not overwrite:
            before = (old or {}).get("settings") or {}
            diff = ", ".join(
                f"{k} {before.get(k)!r} -> {v!r}"
                for k, v in cfg.settings().items()
                if before.get(k) != v
            )
            raise ConfigError(
                f"{out} holds paper-protocol results made with other settings"
                f"{' (' + diff + ')' if diff else ''}; use another --out directory, or "
                "--overwrite to start it again"
            )
        done = store.done(h)
        tasks = cfg.tasks()
        todo = [t for t in tasks if chunk_id(t) not in done]
        env = results.environment()
        # What decides the rounding of the matmuls, and that every chunk runs on one thread.
        hardware = {**env.pop("hardware"), "threads_per_chunk": 1}
        manifest = {
            "protocol": "paper",
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
            "settings": cfg.settings(),
            "settings_hash": h,
            "environment": env,
            "hardware": hardware,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "resumed_with_chunks": len(tasks) - len(todo),
        }
        if todo and len(todo) < len(tasks):
            log(f"paper protocol: resuming, {len(tasks) - len(todo)} of {len(tasks)} chunks done")
        start = time.perf_counter()

        def finished(rec: dict[str, Any]) -> None:
            store.add({"id": chunk_id(rec), "settings_hash": h, **rec})
            done[chunk_id(rec)] = rec
            write_rows(out, rows(cfg, done))
            if progress is not None:
                progress(len(tasks) - sum(chunk_id(t) not in done for t in tasks), len(tasks))

        jobs = _jobs(cfg, len(todo))
        manifest["jobs"] = jobs
        todo.sort(key=_cost, reverse=True)
        manifest["executor"] = executor
        try:
            with executors.make(executor, jobs, address) as ex:
                for _, rec in ex.map_unordered(paper.run_chunk, todo):
                    finished(rec)
        except executors.ExecutorError as e:
            raise ConfigError(str(e)) from None
        final = rows(cfg, store.done(h))
        write_rows(out, final)
        manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        manifest["wall_seconds"] = round(time.perf_counter() - start, 2)
        manifest["chunk_seconds_all"] = round(sum(r["seconds"] for r in final), 2)
        atomic_write(out / MANIFEST, json.dumps(results.clean(manifest), indent=2) + "\n")
        return final, manifest


def load(
    directory: Path, grid: dict[str, Any] | None = None
) -> tuple[PaperConfig, list[dict[str, Any]], dict[str, dict[str, Any]]] | None:
    """(config, rows, chunks by id) saved in `directory`, or None when it has none.

    `grid` (precisions, depths, widths, batch_sizes, inits) replaces the saved run's, to
    report other settings of the same study (e.g. two runs into one directory)."""
    m = read_manifest(directory)
    if m is None:
        return None
    c = {**m["config"], **(grid or {})}
    cfg = PaperConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
    store = ChunkStore(directory)
    store.load()
    done = store.done(m["settings_hash"])
    return cfg, rows(cfg, done), done
