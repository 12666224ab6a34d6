"""The run directory: manifest, results (JSON Lines + CSV), lock. Crash-safe.

- Every file is written atomically: to a temporary file in the same directory,
  flushed and fsync'ed, then `os.replace`d over the old one. A kill -9 at any moment
  leaves either the old or the new version, never half of one.
- `results.jsonl` holds one line per finished configuration, each carrying a SHA-256
  checksum of its own content. A line that does not parse or whose checksum does not
  match (a truncated or edited file) is reported and its configuration is run again.
  Configurations are identified by id *and* settings hash, so a resumed study never
  mixes in results made with other settings.
- `study.lock` holds the PID (and host and process start time) of the study writing
  the directory; a second study is refused while that process is alive. A lock left
  by a process that no longer exists (kill -9) is stale and is taken over.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._files import atomic_write
from . import hardware
from .config import ConfigError

RESULTS = "results.jsonl"
CSV = "results.csv"
MANIFEST = "manifest.json"
LOCK = "study.lock"


class LockedError(RuntimeError):
    """Another live study holds the run directory."""


class RunDirError(ConfigError):
    """The run directory cannot be used as it is (a file where a directory belongs, ...)."""


def _regular_file_or_absent(path: Path, what: str) -> None:
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise RunDirError(
            f"{path} is not a regular file ({what}); move it away or use another --out"
        )


def clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def _checksum(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """The record, JSON-cleaned, with its checksum."""
    record = clean(record)
    record.pop("checksum", None)
    record["checksum"] = _checksum(record)
    return record


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------


class ResultStore:
    """Results of one run directory. `load()` once, then `add()` per finished config."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.records: list[dict[str, Any]] = []  # valid records, file order
        self.problems: list[str] = []

    @property
    def path(self) -> Path:
        return self.dir / RESULTS

    def load(self, rerun: bool = True) -> list[str]:
        """Read valid records; return one warning per bad or duplicate line. With
        `rerun` (a study, not a report) the file is rewritten without the bad lines,
        whose configurations the study then runs again."""
        self.records, self.problems = [], []
        _regular_file_or_absent(self.path, "the study's results")
        if not self.path.exists():
            return []
        fate = (
            "that configuration will be run again"
            if rerun
            else "it is left out (run the study again to redo that configuration)"
        )
        seen: set[tuple[str, str]] = set()
        raw = self.path.read_bytes()
        for n, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and rec.get("checksum") == _checksum(rec)
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec, ok = None, False
            if not ok:
                hint = _guess_id(line)
                self.problems.append(
                    f"{self.path}: line {n} is corrupted or truncated"
                    + (f" (configuration {hint})" if hint else "")
                    + f"; {fate}"
                )
                continue
            wrong = shape_problem(rec)
            if wrong:  # a valid checksum over the wrong content: never trusted
                hint = rec.get("id") if isinstance(rec.get("id"), str) else _guess_id(line)
                self.problems.append(
                    f"{self.path}: line {n} is not a study record ({wrong})"
                    + (f" (configuration {hint})" if hint else "")
                    + f"; {fate}"
                )
                continue
            ident = (rec["id"], rec["settings_hash"])
            if ident in seen:
                self.problems.append(
                    f"{self.path}: line {n} repeats configuration {rec['id']}; keeping the first"
                )
                continue
            seen.add(ident)
            self.records.append(rec)
        if self.problems and rerun:  # rewrite without the bad lines: the file is clean again
            self._write()
        return list(self.problems)

    def done(self, settings_hash: str) -> dict[str, dict[str, Any]]:
        """Valid records made with these settings, by configuration id."""
        return {r["id"]: r for r in self.records if r["settings_hash"] == settings_hash}

    def other_settings(self, settings_hash: str) -> dict[str, int]:
        """Settings hash -> number of valid records made with settings other than these."""
        out: dict[str, int] = {}
        for r in self.records:
            if r["settings_hash"] != settings_hash:
                out[r["settings_hash"]] = out.get(r["settings_hash"], 0) + 1
        return out

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        """Seal and append one record; the whole file is replaced atomically."""
        rec = seal(record)
        self.records = [
            r
            for r in self.records
            if (r["id"], r["settings_hash"]) != (rec["id"], rec["settings_hash"])
        ]
        self.records.append(rec)
        self._write()
        return rec

    def _write(self) -> None:
        # Not sorted: "id" stays first, so even a truncated line says what it was.
        lines = [json.dumps(r, separators=(",", ":")) for r in self.records]
        atomic_write(self.path, "".join(line + "\n" for line in lines))

    def write_csv(self, records: list[dict[str, Any]]) -> None:
        rows = [flat_row(r) for r in records]
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.dir / CSV, buf.getvalue())


#: A record's required fields and their types (what the report and the CSV read).
_SHAPE: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "key": dict,
    "settings_hash": str,
    "policies": dict,
    "steps": int,
    "final": dict,
    "pairs": dict,
    "epochs": list,
}
_KEY_FIELDS = {"model": str, "precision": str, "bias": str, "batchnorm": bool, "seed": int}


def shape_problem(rec: Any) -> str | None:
    """Why `rec` is not a well-formed result record, or None if it is one."""
    if not isinstance(rec, dict):
        return f"a {type(rec).__name__}, not an object"
    for name, kind in _SHAPE.items():
        if name not in rec:
            return f"no {name!r}"
        if not isinstance(rec[name], kind) or isinstance(rec[name], bool) and kind is int:
            return f"{name!r} is a {type(rec[name]).__name__}"
    key = rec["key"]
    for name, kind in _KEY_FIELDS.items():
        v = key.get(name)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            return f"key {name!r} is {v!r}"
    ident = "{}-{}-{}-bn{:d}-s{}".format(*(key[k] for k in _KEY_FIELDS))
    if ident != rec["id"]:
        return f"id {rec['id']!r} does not match its key ({ident})"
    for part in ("test_acc", "train_loss"):
        if not isinstance(rec["final"].get(part), dict):
            return f"final.{part} is missing"
    for name, pair in rec["pairs"].items():
        if not isinstance(pair, dict) or "kind" not in pair or "acc_delta" not in pair:
            return f"pair {name!r} is incomplete"
    if not all(isinstance(ep, dict) and isinstance(ep.get("counts"), dict) for ep in rec["epochs"]):
        return "an epoch without counts"
    return None


def _guess_id(line: bytes) -> str | None:
    import re

    m = re.search(rb'"id":\s*"([^"]{1,200})"', line)
    return m.group(1).decode(errors="replace") if m else None


def flat_row(rec: dict[str, Any]) -> dict[str, Any]:
    """One CSV row per configuration: the key, final accuracies, the pairs' numbers,
    and the reference run's kink counts summed over layers and epochs."""
    from .counts import KEYS

    row: dict[str, Any] = {"id": rec["id"], **rec["key"]}
    for run, acc in rec["final"]["test_acc"].items():
        row[f"acc_{run}"] = acc
    for run, loss in rec["final"]["train_loss"].items():
        row[f"loss_{run}"] = loss
    for name, pair in rec["pairs"].items():
        for k in (
            "acc_delta",
            "differ_fraction",
            "same_weights_differ",
            "same_weights_differ_first_layer",
            "first_divergence",
            "rel_l2",
            "max_abs",
        ):
            if k in pair:
                row[f"{name}_{k}"] = pair[k]
    for run in rec["policies"]:
        if run == "ulp":
            continue
        tot = dict.fromkeys(KEYS, 0)
        for ep in rec["epochs"]:
            for d in ep["counts"].get(run, {}).values():
                for k in KEYS:
                    tot[k] += d.get(k, 0)
        for k in ("sites", "exact", "effective", "near"):
            row[f"{run}_{k}"] = tot[k]
    for run, c in rec.get("certified", {}).items():
        for k in (
            "certified_steps",
            "uncertified_steps",
            "uncertified_unresolved",
            "uncertified_jumps",
            "kinks_hit",
            "measured_steps",
            "crossings_mean",
            "crossings_max",
            "crossing_share",
            "radius_median",
        ):
            row[f"{run}_{k}"] = c.get(k)
    row["steps"] = rec["steps"]
    row["elapsed_s"] = rec.get("elapsed_s")
    row["cpu_s"] = rec.get("cpu_s")
    return row


# --------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions, platform and (under "hardware") what decides rounding, see `hardware`."""
    import platform

    import numpy
    import torch

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "kinkgrad": __version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "hardware": hardware.describe(device),
    }


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    atomic_write(Path(directory) / MANIFEST, json.dumps(clean(manifest), indent=2) + "\n")


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest, or None if there is none or it is not a JSON object (a study then
    rewrites it; its records still guard the settings, see `ResultStore.other_settings`)."""
    path = Path(directory) / MANIFEST
    _regular_file_or_absent(path, "the study's manifest")
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------
# lock
# --------------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) from /proc, to tell a live
    process from a reused PID; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if started is not None:
        now = _start_time(pid)
        if now is not None and now != started:
            return False  # the PID was reused by another process
    return True


@contextlib.contextmanager
def lock(directory: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock for the block; refuse if a live study holds it.

    Raises LockedError naming the holder. A stale lock (its process is gone) is taken
    over with a warning written to the returned lock's `stale` list.
    """
    path = Path(directory) / LOCK
    _regular_file_or_absent(path, "the study's lock")
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # The lock appears with its content in one step: write a private file, then
    # os.link it to the lock's name, which fails if the name exists.
    fd, tmp = tempfile.mkstemp(prefix=f".{LOCK}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        for _attempt in range(5):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                pass
            holder = _read_lock(path)
            if holder is not None and _holder_alive(holder):
                raise LockedError(
                    f"{directory} is in use by another kinkgrad study (pid {holder['pid']} "
                    f"on {holder['host']}, since {holder.get('since', '?')}); wait for it to "
                    f"finish or use another --out directory"
                )
            # Stale: move it aside (only one contender wins the rename), then retry.
            aside = path.with_name(f"{LOCK}.stale.{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, aside)
                os.unlink(aside)
                who = holder["pid"] if holder else "unknown"
                STALE.append(f"took over the stale lock of a study that no longer runs (pid {who})")
        else:  # pragma: no cover
            raise LockedError(f"could not take {path}: other studies keep taking it")
    finally:
        os.unlink(tmp)
    try:
        yield path
    finally:
        holder = _read_lock(path)
        if holder is not None and holder.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


#: Warnings about stale locks taken over (read and cleared by the CLI).
STALE: list[str] = []


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _holder_alive(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes: assume alive
    return _alive(holder["pid"], holder.get("started"))
