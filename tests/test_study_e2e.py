"""The study end to end, in fresh processes: `kinkgrad study --quick` (what CI runs),
a kill -9 in the middle and a resume, and data-parallel under torchrun (2 CPU ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kinkgrad.study import config, data, results, train
from kinkgrad.study.config import RunKey

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run in a new session, so a hang kills the whole process group (torchrun's ranks)."""
    env = {**os.environ, "COLUMNS": "120", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(args)}\n{err[-2000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / results.RESULTS).read_text().splitlines() if x]


def strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("elapsed_s", "cpu_s", "checksum")}


def test_quick_study_end_to_end(tmp_path):
    out = tmp_path / "quick"
    t0 = time.perf_counter()
    p = run([sys.executable, "-m", "kinkgrad.study", "--quick", "--out", str(out)])
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr
    assert elapsed < 90  # the budget is 30 s on 2 idle cores; CI machines may be busy
    quick = config.build({}, quick=True)
    recs = records(out)
    assert sorted(r["id"] for r in recs) == sorted(k.id for k in quick.grid())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["environment"]["torch"] and manifest["seeds"] == [0]
    assert len((out / "results.csv").read_text().splitlines()) == 1 + len(recs)
    md = (out / "report.md").read_text()
    assert md.startswith("# Does the derivative at the kink matter?")
    lockstep = md.split("\n## Training in lockstep")[1]  # after the paper protocol's section
    assert "**Answer in numbers.**" in lockstep.split("\n## ")[0]
    assert "Compared with published figures" in md and "Bertoin" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "<table>" in page
    # the paper protocol ran too, and its section leads the report
    rows = json.loads((out / "paper.json").read_text())
    assert sorted(r["precision"] for r in rows) == sorted(config.PRECISIONS)
    assert all(r["inits"] == 10 and r["samples_per_pass"] == 5000 for r in rows)
    assert md.split("\n## ")[1].startswith("The published experiment")
    for name in ("bifurcation", "kink_hits", "divergence", "accuracy", "crossings"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 10_000
    assert "Does the derivative at the kink matter?" in p.stdout  # summary table
    # Worker processes (--jobs defaults to one per core) give the same bits as this one.
    key = RunKey("cnn", "float16", "fused", False, 0)
    here = train.run_config(quick, key, data.load("digits", quick.train_size))
    there = next(r for r in recs if r["id"] == key.id)
    assert json.loads(json.dumps(results.clean(strip(here)))) == {
        k: v for k, v in strip(there).items() if k in here
    }


@pytest.mark.slow  # ~10 s; the in-process interrupt test covers resume by default
def test_kill_9_then_resume(tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "kinkgrad.study", "--protocol", "lockstep", "--models", "mlp"]
    args += ["--bias", "fused"]
    args += ["--batchnorm", "off", "--seeds", "0,1", "--epochs", "1", "--jobs", "1"]
    args += ["--train-size", "320", "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    path = out / results.RESULTS
    deadline = time.time() + 60
    while time.time() < deadline:
        if path.exists() and path.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {r["id"]: strip(r) for r in records(out)}
    assert 2 <= len(done_before) < 8 and (out / results.LOCK).exists()  # a stale lock
    p = run(args)
    assert p.returncode == 0, p.stderr
    assert "stale lock" in p.stderr and "resuming" in p.stderr
    after = records(out)
    assert len(after) == 8 and len({r["id"] for r in after}) == 8
    assert all(strip(r) == done_before[r["id"]] for r in after if r["id"] in done_before)


def test_torchrun_data_parallel_two_cpu_ranks(tmp_path):
    out = tmp_path / "ddp"
    p = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["-m", "kinkgrad.study", "--quick", "--models", "cnn", "--precisions", "float32"]
        + ["--out", str(out)],
        timeout=180,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(out)
    assert rec["world_size"] == 2
    # Each rank saw half of every minibatch; the counts are summed over both ranks, so
    # they cover the whole data exactly as one process does.
    quick = config.build({"models": ["cnn"], "precisions": ["float32"]}, quick=True)
    key = quick.grid()[0]
    single = train.run_config(quick, key, data.load("digits", quick.train_size))
    for layer, d in single["epochs"][0]["counts"]["ref"].items():
        got = rec["epochs"][0]["counts"]["ref"][layer]
        assert got["elements"] == d["elements"] and got["sites"] == d["sites"], layer
    assert rec["steps"] == single["steps"]
    assert (out / "report.md").exists()


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    pytest.fail(f"no {n} results in {path} after {timeout} s")


def _group_gone(pgid: int, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


TINY_ARGS = ["--models", "mlp", "--bias", "fused", "--batchnorm", "off", "--epochs", "1"]
TINY_ARGS += ["--train-size", "256", "--test-size", "32", "--extra-policies", "none"]


@pytest.mark.slow  # two spawned workers, then a rerun: ~15 s idle; test_study_faults has
# the fast in-process SIGTERM test
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigterm_saves_releases_the_lock_stops_workers_and_exits_143(tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")  # ray.init takes SIGTERM over; the study takes it back
    out = tmp_path / "termed"
    args = [sys.executable, "-m", "kinkgrad.study", *TINY_ARGS, "--seeds", "0,1"]
    args += ["--precisions", "float32,float16", "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [*args, "--jobs", "2", "--executor", executor],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the workers can be counted
    )
    try:
        _wait_for_lines(out / results.RESULTS, 1, proc)
        os.kill(proc.pid, signal.SIGTERM)  # the study alone, as `kill PID` does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    said = " ".join(err.split())
    assert "terminated (SIGTERM)" in said and "run the same command again" in said
    assert not (out / results.LOCK).exists()
    assert _group_gone(proc.pid)  # no orphaned workers left behind
    saved = records(out)
    assert 1 <= len(saved) < 4
    p = run([*args, "--jobs", "1"])  # and the rerun resumes (jobs: not a setting)
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stderr and len(records(out)) == 4


@pytest.mark.slow  # a local Ray starts in ~10 s, twice
def test_ray_driver_kill_9_then_resume_gives_the_local_numbers(tmp_path):
    pytest.importorskip("ray")
    out, local = tmp_path / "ray", tmp_path / "local"
    base = [sys.executable, "-m", "kinkgrad.study", *TINY_ARGS, "--seeds", "0,1,2"]
    args = [*base, "--executor", "ray", "--jobs", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_lines(out / results.RESULTS, 1, proc, timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # Ray's own processes of the killed driver
    assert (out / results.LOCK).exists()  # stale, taken over by the rerun
    p = run(args, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "stale lock" in p.stderr and "resuming" in p.stderr
    q = run([*base, "--jobs", "1", "--out", str(local)])
    assert q.returncode == 0, q.stderr[-3000:]
    by_id = lambda d: {r["id"]: strip(r) for r in records(d)}
    assert by_id(out) == by_id(local) and len(by_id(out)) == 12
