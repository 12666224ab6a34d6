"""The study: settings validation, lockstep invariants, determinism, and the run
directory's reliability (resume, corrupted results, lock). Fast: tiny grids in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kinkgrad.study import config, data, results, runner, train
from kinkgrad.study.cli import cli
from kinkgrad.study.config import ConfigError, RunKey

TINY = {
    "models": ["mlp"],
    "precisions": ["float16"],
    "bias": ["separate"],
    "batchnorm": [False],
    "seeds": [0, 1, 2],
    "epochs": 1,
    "train_size": 96,
    "test_size": 60,
    "jobs": 1,
}


def tiny(**over):
    return config.build({**TINY, **over})


def study(cfg, out: Path, progress=None, **kw):
    warnings: list[str] = []
    records, manifest = runner.run_study(
        cfg, out, log=lambda m: None, warn=warnings.append, progress=progress, **kw
    )
    return records, manifest, warnings


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / results.RESULTS).read_text().splitlines() if x]


def strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("elapsed_s", "cpu_s", "checksum")}


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--precisions", "float32,float8"], "precisions: unknown value 'float8'"),
        (["--epochs", "-1"], "epochs: expected an integer >= 1, got -1"),
        (["--data", "mnist2"], "data: unknown value 'mnist2'"),
        (["--kinks", "0,nan"], "not finite"),
        (["--kinks", "0,sideways"], "'sideways' is not allowed"),
        (["--ties", "first,random"], "'random' is not allowed"),
        (["--kinks", "0,1,0.5"], "kinks and ties pair up"),
        (["--models", "resnet"], "models: unknown value 'resnet'"),
        (["--seeds", "0,0"], "seeds: duplicate values"),
        (["--optimizer", "lbfgs"], "optimizer: unknown value 'lbfgs'"),
        (["--extra-policies", "certified-nope"], "unknown policy 'certified-nope'"),
        (["--momentum", "1.5"], "momentum"),
    ],
)
def test_bad_settings_are_refused_before_training(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert cli([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in " ".join(err.split())
    assert not out.exists()  # nothing was trained or written


def test_unknown_flag_and_help(capsys):
    assert cli(["--no-such-flag"]) == 2
    assert cli(["--help"]) == 0
    assert "--precisions" in capsys.readouterr().out


def test_toml_config_and_precedence(tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text('models = ["cnn"]\nprecisions = ["bfloat16"]\nepochs = 2\nseeds = [4]\n')
    from kinkgrad.study.cli import parser, settings_from

    cfg = config.build(settings_from(parser().parse_args(["--config", str(f), "--epochs", "5"])))
    assert cfg.models == ("cnn",) and cfg.precisions == ("bfloat16",) and cfg.seeds == (4,)
    assert cfg.epochs == 5  # flags win over the file
    f.write_text("epochs = 2\nepoch = 3\n")
    assert cli(["--config", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "unknown setting(s): 'epoch' (did you mean 'epochs'?)" in capsys.readouterr().err
    f.write_text("epochs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load_toml(f)


def test_default_and_quick_grids():
    cfg = config.build({})
    assert len(cfg.grid()) == 2 * 4 * 2 * 2 * 3
    assert len({k.id for k in cfg.grid()}) == len(cfg.grid())
    quick = config.build({}, quick=True)
    assert {k.precision for k in quick.grid()} == set(config.PRECISIONS)
    assert quick.settings_hash() != cfg.settings_hash()


# --------------------------------------------------------------------------------------
# training: lockstep invariants and determinism
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", 96, 60)


def test_lockstep_invariants(digits):
    cfg = tiny(precisions=["float64", "float16"])
    f64 = train.run_config(cfg, RunKey("mlp", "float64", "separate", False, 0), digits)
    # float64 MLP: the kink is never hit, the paired runs stay bit-identical...
    assert f64["pairs"]["alt1"]["first_divergence"] is None
    assert f64["pairs"]["alt1"]["rel_l2"] == 0 and f64["pairs"]["alt1"]["differ_fraction"] == 0
    # ... while a one-ulp nudge does move them apart.
    assert f64["pairs"]["ulp"]["rel_l2"] > 0
    cnn = train.run_config(cfg, RunKey("cnn", "float16", "separate", False, 0), digits)
    for rec in (f64, cnn):
        alt = rec["pairs"]["alt1"]
        steps = [ep["same_weights_differ"]["alt1"] for ep in rec["epochs"]]
        # Until they first differ the runs share their weights, so the independent runs
        # diverge exactly at the first minibatch where the same-weights test differs.
        if alt["first_divergence"] is None:
            assert sum(steps) == 0
        else:
            assert sum(steps) >= 1
        assert alt["same_weights_differ"] == sum(steps) <= rec["steps"]
    assert cnn["watch"] and cnn["epochs"][0]["counts"]["ref"]
    layers = cnn["epochs"][0]["counts"]["ref"]
    assert any(k.endswith(":relu") for k in layers) and any("max_pool" in k for k in layers)


def test_same_seed_same_config_is_bit_identical(digits):
    cfg = tiny(models=["cnn"], batchnorm=[True])
    key = RunKey("cnn", "float16", "separate", True, 1)
    a = train.run_config(cfg, key, digits)
    b = train.run_config(cfg, key, digits)
    assert strip(a) == strip(b)
    other = train.run_config(cfg, RunKey("cnn", "float16", "separate", True, 2), digits)
    assert strip(other) != strip(a)


def test_native_shortcut_gives_the_same_bits(digits, monkeypatch):
    """The reference policy (ReLU'(0) = 0, ties to the first) runs as kinkgrad's "torch"
    value when PyTorch makes the same choice; kinkgrad's own rule gives the same bits."""
    from kinkgrad.study import policies

    assert policies.torch_is_native()
    cfg = tiny(models=["cnn"])
    key = RunKey("cnn", "float16", "separate", False, 0)
    fast = train.run_config(cfg, key, digits)
    monkeypatch.setattr(policies, "SHORTCUT_NATIVE", False)
    slow = train.run_config(cfg, key, digits)
    assert strip(fast) == strip(slow)
    assert fast["pairs"]["alt1"]["same_weights_differ"] > 0  # the test is not vacuous


def test_records_survive_json_round_trip(digits):
    cfg = tiny()
    rec = runner.run_one(cfg, RunKey("mlp", "float16", "separate", False, 0))
    sealed = results.seal(rec)
    assert json.loads(json.dumps(sealed)) == sealed
    row = results.flat_row(sealed)
    assert row["id"] == "mlp-float16-separate-bn0-s0" and "alt1_differ_fraction" in row


# --------------------------------------------------------------------------------------
# run directory: resume, corruption, lock
# --------------------------------------------------------------------------------------


def test_resume_after_interrupt_runs_only_the_rest(tmp_path):
    cfg = tiny()
    out = tmp_path / "run"
    seen = []

    def interrupt_after_two(rec):
        seen.append(rec["id"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study(cfg, out, progress=interrupt_after_two)
    assert [r["id"] for r in lines(out)] == seen  # both finished configs were saved
    assert not (out / results.LOCK).exists()  # and the lock released
    again = []
    records, manifest, warnings = study(cfg, out, progress=lambda r: again.append(r["id"]))
    assert again == ["mlp-float16-separate-bn0-s2"] and not warnings
    assert manifest["resumed_with"] == 2
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == sorted(k.id for k in cfg.grid()) and len(ids) == len(set(ids))
    assert [r["id"] for r in records] == [k.id for k in cfg.grid()]
    csv_rows = (out / results.CSV).read_text().splitlines()
    assert len(csv_rows) == 1 + len(cfg.grid())


def test_corrupted_and_truncated_lines_are_rerun_with_a_warning(tmp_path):
    cfg = tiny()
    out = tmp_path / "run"
    study(cfg, out)
    before = {r["id"]: strip(r) for r in lines(out)}
    raw = (out / results.RESULTS).read_text().splitlines()
    edited = json.loads(raw[0])
    edited["final"]["test_acc"]["ref"] = 1.0  # a changed number: checksum mismatch
    raw[0] = json.dumps(edited, sort_keys=True, separators=(",", ":"))
    raw[2] = raw[2][: len(raw[2]) // 2]  # a truncated last line, as a crash would leave
    (out / results.RESULTS).write_text("\n".join(raw))
    rerun = []
    _, _, warnings = study(cfg, out, progress=lambda r: rerun.append(r["id"]))
    assert len(warnings) == 2 and all("corrupted or truncated" in w for w in warnings)
    assert "mlp-float16-separate-bn0-s2" in warnings[1]  # names the configuration
    assert sorted(rerun) == sorted([edited["id"], "mlp-float16-separate-bn0-s2"])
    after = {r["id"]: strip(r) for r in lines(out)}
    assert after == before  # rerun bit-identically; exactly one line per configuration


def test_duplicate_lines_keep_one(tmp_path):
    cfg = tiny(seeds=[0])
    out = tmp_path / "run"
    study(cfg, out)
    path = out / results.RESULTS
    path.write_text(path.read_text() * 2)
    _, _, warnings = study(cfg, out)
    assert any("repeats configuration" in w for w in warnings)
    assert len(lines(out)) == 1


def test_second_study_on_the_same_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with results.lock(out):
        code = cli(
            ["--models", "mlp", "--precisions", "float32", "--seeds", "0", "--out", str(out)]
        )
    assert code == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "in use by another kinkgrad study" in err and f"pid {os.getpid()}" in err
    assert not (out / results.RESULTS).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / results.LOCK).write_text(
        json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname(), "started": "1"})
    )
    _, _, warnings = study(tiny(seeds=[0]), out)
    assert any("stale lock" in w for w in warnings)
    assert not (out / results.LOCK).exists()


def test_other_settings_in_the_same_directory_are_refused(tmp_path):
    out = tmp_path / "run"
    study(tiny(seeds=[0]), out)
    with pytest.raises(ConfigError, match="epochs 1 -> 2"):
        study(tiny(seeds=[0], epochs=2), out)
    _, manifest, _ = study(tiny(seeds=[0], epochs=2), out, overwrite=True)
    assert manifest["settings"]["epochs"] == 2 and len(lines(out)) == 1


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    from kinkgrad._files import atomic_write

    path = tmp_path / "f.txt"
    atomic_write(path, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_mnist1d_is_generated_locally_and_trains_a_1d_cnn():
    import numpy as np

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ds = data.load("mnist1d", 64, 40)  # make_dataset, never the downloading get_dataset
    assert (np.random.get_state()[1] == before).all()  # global RNG left as it was
    assert ds.shape == (1, 40) and ds.classes == 10 and len(ds.y_test) == 40
    cfg = tiny(models=["cnn"], data="mnist1d", train_size=64, test_size=40)
    rec = train.run_config(cfg, RunKey("cnn", "float16", "separate", False, 0), ds)
    assert any("max_pool1d" in k for k in rec["epochs"][0]["counts"]["ref"])
