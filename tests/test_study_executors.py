"""Executors: local serial, local process pool and Ray give the same records bit for bit;
each yields (unit index, result) as units finish, and the driver alone writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kinkgrad.study import config, executors, results, runner

TINY = {
    "models": ["mlp"],
    "precisions": ["float16", "float32"],
    "bias": ["separate"],
    "batchnorm": [False],
    "seeds": [0],
    "epochs": 1,
    "train_size": 64,
    "test_size": 32,
    "jobs": 2,
    "crossings_every": 0,
}


def strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("elapsed_s", "cpu_s", "checksum")}


def run(out: Path, **over) -> tuple[list[dict], dict]:
    cfg = config.build({**TINY, **over})
    recs, manifest = runner.run_study(cfg, out, log=lambda m: None, warn=lambda m: None)
    return [strip(r) for r in recs], manifest


def square_or_fail(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative unit {x}")
    return x * x


@pytest.mark.parametrize("make", [executors.Serial, lambda: executors.ProcessPool(2)])
def test_local_executors_yield_every_index_once(make):
    with make() as ex:
        got = dict(ex.map_unordered(square_or_fail, [3, 1, 2]))
    assert got == {0: 9, 1: 1, 2: 4}


def test_a_failing_unit_propagates():
    with pytest.raises(ValueError, match="negative unit -1"):
        with executors.Serial() as ex:
            list(ex.map_unordered(square_or_fail, [1, -1, 2]))


@pytest.mark.slow
def test_a_failing_unit_propagates_and_stops_the_pool():
    with pytest.raises(ValueError, match="negative unit -1"):
        with executors.ProcessPool(2) as ex:
            list(ex.map_unordered(square_or_fail, [1, -1, 2]))


def test_make_picks_by_kind_and_jobs():
    assert isinstance(executors.make("local", 1), executors.Serial)
    assert isinstance(executors.make("local", 3), executors.ProcessPool)
    with pytest.raises(ValueError, match="executor: unknown value 'dask'"):
        executors.make("dask", 1)


@pytest.mark.slow  # two spawned workers importing torch: ~30 s on a busy 2-core machine
def test_process_pool_study_equals_serial_study(tmp_path):
    serial, _ = run(tmp_path / "serial", jobs=1)
    pooled, manifest = run(tmp_path / "pool", jobs=2)
    assert pooled == serial and manifest["workers"] == 2


# --------------------------------------------------------------------------------------
# Ray (a local Ray with 2 CPUs, started once for the module)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_executor_yields_every_index_and_propagates_errors(local_ray):
    with executors.RayExecutor() as ex:
        assert ex.workers == 2
        assert dict(ex.map_unordered(square_or_fail, [4, 5])) == {0: 16, 1: 25}
        with pytest.raises(ValueError, match="negative unit -3"):
            list(ex.map_unordered(square_or_fail, [-3]))
    assert local_ray.is_initialized()  # it joined the running Ray: not its own to stop


def test_ray_study_is_bit_identical_to_the_local_one(local_ray, tmp_path):
    local, _ = run(tmp_path / "local", jobs=1)
    ray_out = tmp_path / "ray"
    remote, manifest = run(ray_out, executor="ray")
    assert remote == local and len(remote) == 2
    assert manifest["executor"] == "ray" and manifest["workers"] == 2
    # The driver wrote the store: one sealed line per configuration, no lock left.
    lines = [json.loads(x) for x in (ray_out / results.RESULTS).read_text().splitlines()]
    assert [results.shape_problem(r) for r in lines] == [None, None]
    assert not (ray_out / results.LOCK).exists()
    # A resumed Ray study runs nothing and gives the same records.
    again, manifest = run(ray_out, executor="ray")
    assert again == local and manifest["resumed_with"] == 2


def test_ray_paper_protocol_is_bit_identical_to_the_local_one(local_ray, tmp_path):
    from kinkgrad.study import paper_run

    cfg = paper_run.PaperConfig(
        precisions=("bfloat16",), widths=(16,), inits=30, train_size=256, jobs=1
    )
    quiet = dict(log=lambda m: None, warn=lambda m: None)
    local, _ = paper_run.run(cfg, tmp_path / "local", **quiet)
    remote, manifest = paper_run.run(cfg, tmp_path / "ray", executor="ray", **quiet)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert strip(remote) == strip(local) and manifest["executor"] == "ray"
    # two chunks ran as Ray tasks; only the driver wrote them, one line each
    assert len((tmp_path / "ray" / paper_run.CHUNKS).read_text().splitlines()) == 2
