"""The study under injected faults: every case ends right (the same records a fresh run
gives) or loud (one line naming the problem, exit status 2), never in a traceback or in
silently mixed results. In-process and on tiny grids, so fast."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest

from kinkgrad.study import cli as study_cli
from kinkgrad.study import config, results, runner
from kinkgrad.study.cli import cli
from kinkgrad.study.config import ConfigError

TINY = {
    "models": ["mlp"],
    "precisions": ["float16"],
    "bias": ["separate"],
    "batchnorm": [False],
    "seeds": [0],
    "epochs": 1,
    "train_size": 64,
    "test_size": 32,
    "jobs": 1,
    "extra_policies": [],
}
FLAGS = (
    "--models mlp --precisions float16 --bias separate --batchnorm off --seeds 0 --epochs 1 "
    "--train-size 64 --test-size 32 --jobs 1 --extra-policies none"
).split()


def tiny(**over):
    return config.build({**TINY, **over})


def study(cfg, out: Path, **kw):
    warnings: list[str] = []
    recs, manifest = runner.run_study(cfg, out, log=lambda m: None, warn=warnings.append, **kw)
    return recs, manifest, warnings


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / results.RESULTS).read_text().splitlines() if x]


def strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("elapsed_s", "cpu_s", "checksum")}


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    text = err.strip()
    assert "\n" not in text, text  # one line, not wrapped
    assert text.startswith("kinkgrad study: error:")
    for n in needles:
        assert n in text, text
    return text


# --------------------------------------------------------------------------------------
# resume: seed lists, records' shape, the settings guard without the manifest
# --------------------------------------------------------------------------------------


def test_resume_with_another_seed_list_equals_a_fresh_run(tmp_path):
    # The extra (certified) policy goes to the first seed only: with --seeds 1 seed 1 has
    # it, with --seeds 0,1 it does not. Resuming must not keep seed 1's old record.
    over = {"extra_policies": ["certified"], "extra_seeds": 1, "crossings_every": 0}
    out, fresh = tmp_path / "resumed", tmp_path / "fresh"
    study(tiny(seeds=[1], **over), out)
    assert lines(out)[0]["certified"] and lines(out)[0]["extra_policies"] == ["certified"]
    rerun: list[str] = []
    recs, _, warnings = study(
        tiny(seeds=[0, 1], **over), out, progress=lambda r: rerun.append(r["id"])
    )
    assert sorted(rerun) == ["mlp-float16-separate-bn0-s0", "mlp-float16-separate-bn0-s1"]
    assert any("s1 was saved with extra policies ['certified']" in w for w in warnings)
    fresh_recs, _, _ = study(tiny(seeds=[0, 1], **over), fresh)
    assert [strip(r) for r in recs] == [strip(r) for r in fresh_recs]
    assert "certified" not in recs[1] and recs[1]["extra_policies"] == []


def test_a_valid_checksum_over_the_wrong_shape_is_not_trusted(tmp_path):
    out = tmp_path / "run"
    study(tiny(), out)
    genuine = lines(out)[0]
    forged = results.seal({"id": genuine["id"], "settings_hash": genuine["settings_hash"]})
    # The forged line comes first: as a duplicate it must not push out the genuine one.
    path = out / results.RESULTS
    path.write_text(json.dumps(forged) + "\n" + path.read_text())
    ran: list[str] = []
    recs, _, warnings = study(tiny(), out, progress=lambda r: ran.append(r["id"]))
    assert ran == []  # the genuine record was kept: nothing to run again
    assert [w for w in warnings if "is not a study record (no 'key')" in w]
    assert [strip(r) for r in lines(out)] == [strip(genuine)]
    assert strip(recs[0]) == strip(genuine)


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda r: r.update(key=[1]), "'key' is a list"),
        (lambda r: r.update(steps="3"), "'steps' is a str"),
        (lambda r: r["key"].update(seed=7), "does not match its key"),
        (lambda r: r["final"].pop("test_acc"), "final.test_acc is missing"),
        (lambda r: r.update(epochs=[1]), "an epoch without counts"),
    ],
)
def test_shape_problems_are_named(tmp_path, edit, why):
    out = tmp_path / "run"
    study(tiny(), out)
    rec = lines(out)[0]
    edit(rec)
    (out / results.RESULTS).write_text(json.dumps(results.seal(rec)) + "\n")
    ran: list[str] = []
    _, _, warnings = study(tiny(), out, progress=lambda r: ran.append(r["id"]))
    assert ran == ["mlp-float16-separate-bn0-s0"] and why in warnings[0]


def test_settings_guard_holds_without_the_manifest(tmp_path):
    out = tmp_path / "run"
    study(tiny(), out)
    (out / results.MANIFEST).unlink()
    with pytest.raises(ConfigError, match="holds results made with other settings"):
        study(tiny(epochs=2), out)
    assert len(lines(out)) == 1  # nothing appended
    _, manifest, _ = study(tiny(epochs=2), out, overwrite=True)
    assert len(lines(out)) == 1 and manifest["settings"]["epochs"] == 2


def test_manifest_that_is_not_an_object_is_rewritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / results.MANIFEST).write_text("[]")
    assert cli([*FLAGS, "--out", str(out)]) == 0
    assert "is not a valid manifest" in capsys.readouterr().err
    assert json.loads((out / results.MANIFEST).read_text())["settings_hash"]


def test_report_only_after_garbage_lines_does_not_promise_a_rerun(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli([*FLAGS, "--out", str(out)]) == 0
    path = out / results.RESULTS
    before = path.read_text()
    path.write_text(before + '{"id":"mlp-float16-separate-bn0-s9","trunc\n')
    capsys.readouterr()
    assert cli([*FLAGS, "--out", str(out), "--report-only"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "corrupted or truncated" in err and "will be run again" not in err
    assert "left out" in err
    assert path.read_text().startswith(before)  # the report does not edit the results


# --------------------------------------------------------------------------------------
# one-line errors, exit 2, nothing written
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, needle",
    [
        (lambda t: t / "afile", "is a file, not a directory"),
        (lambda t: t / "afile" / "sub", "a file stands where a directory"),
        (lambda t: Path("/proc/kinkgrad-study"), "is in /proc"),
        (lambda t: Path("/sys/kinkgrad-study"), "is in /sys"),
    ],
)
def test_unusable_out_is_one_line_exit_2(tmp_path, capsys, where, needle):
    (tmp_path / "afile").write_text("x")
    one_line_error(capsys, cli([*FLAGS, "--out", str(where(tmp_path))]), "--out", needle)


def test_read_only_out_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    # A read-only mount needs root to make; its error (EROFS) is what the probe sees.
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    code = cli([*FLAGS, "--out", str(tmp_path / "ro")])
    one_line_error(capsys, code, "read-only file system")


@pytest.mark.parametrize("name", [results.RESULTS, results.LOCK, results.MANIFEST])
def test_run_dir_file_that_is_a_directory_is_one_line_exit_2(tmp_path, capsys, name):
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    code = cli([*FLAGS, "--out", str(out)])
    one_line_error(capsys, code, name, "not a regular file")
    with pytest.raises(results.RunDirError, match="not a regular file"):
        if name == results.LOCK:
            with results.lock(out):
                pass
        elif name == results.RESULTS:
            results.ResultStore(out).load()
        else:
            results.read_manifest(out)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--seeds", str(10**30)], "seeds: 1000000000000000000000000000000 is too large"),
        (["--seeds", str(2**32)], "allowed: integers 0 to 4294967295"),
        (["--width", "100000000"], "width: 100000000 is too large; allowed: 1 to 8192"),
        (["--channels", "100000"], "channels: 100000 is too large"),
        (["--lr", "inf"], "lr: expected a finite non-negative number, got inf"),
        (["--lr", "nan"], "lr: expected a finite non-negative number, got nan"),
        (["--momentum", "nan"], "momentum"),
        (["--out", ""], "--out: the directory name is empty"),
        (["--executor", "dask"], "executor: unknown value 'dask'; allowed: local, ray"),
        (["--ray-address", "auto"], "ray_address: 'auto' is given but executor is 'local'"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    args = [*FLAGS, "--out", str(out), *argv] if argv[0] != "--out" else [*FLAGS, *argv]
    one_line_error(capsys, cli(args), needle)
    assert not out.exists()  # validated first: no manifest written


@pytest.mark.parametrize(
    "content, needle",
    [
        (b'quick = "yes"\n', "quick: expected true or false, got 'yes'"),
        (b"extra_policies = [[]]\n", "extra_policies: [] is not a policy name"),
        (b"models = [1]\n", "models: 1 is not a model name"),
        (b"seeds = [true]\n", "seeds: True is not an integer"),
        (b'batchnorm = ["on"]\n', "batchnorm: 'on' is not on/off"),
        (b'noise_floor = "no"\n', "noise_floor: expected true or false, got 'no'"),
        (b"data = 3\n", "data: expected a string, got 3"),
        (b"\x7fELF\x02\x01\x01\x00\xd0\xff\xfe", "not valid TOML"),
    ],
)
def test_bad_config_files_are_one_line_exit_2(tmp_path, capsys, content, needle):
    f = tmp_path / "s.toml"
    f.write_bytes(content)
    out = tmp_path / "run"
    one_line_error(capsys, cli(["--config", str(f), "--out", str(out)]), needle)
    assert not out.exists()


def test_config_that_is_a_directory_is_one_line_exit_2(tmp_path, capsys):
    code = cli(["--config", str(tmp_path), "--out", str(tmp_path / "run")])
    one_line_error(capsys, code, "is a directory, not a TOML file")


def test_mnist1d_without_the_package_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # find_spec: not installed
    out = tmp_path / "run"
    code = cli([*FLAGS, "--data", "mnist1d", "--out", str(out)])
    one_line_error(capsys, code, "pip install 'kinkgrad[mnist1d]'")
    assert not out.exists()


def test_ray_executor_without_ray_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    code = cli([*FLAGS, "--executor", "ray", "--out", str(tmp_path / "run")])
    one_line_error(capsys, code, "pip install 'kinkgrad[ray]'")


def test_sigterm_is_handled_like_ctrl_c(tmp_path, capsys, monkeypatch):
    # A real SIGTERM to this process after the first configuration is saved; the
    # end-to-end test (test_study_e2e, slow) does it to a study with worker processes.
    import os
    import signal

    real = runner.run_study

    def term_after_first(cfg, out, **kw):
        def progress(rec):
            os.kill(os.getpid(), signal.SIGTERM)

        return real(cfg, out, **{**kw, "progress": progress})

    monkeypatch.setattr(runner, "run_study", term_after_first)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    code = cli([*FLAGS, "--seeds", "0,1", "--out", str(out)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 143, err
    assert "terminated (SIGTERM): 1 of 2 configurations are saved" in err
    assert "run the same command again" in err and "Traceback" not in err
    assert not (out / results.LOCK).exists() and len(lines(out)) == 1
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    assert study_cli.EXIT_TERMINATED == 143


def test_ray_address_nobody_listens_on_is_one_line_exit_2(tmp_path, capsys):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nobody listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = cli(
        [
            *FLAGS,
            "--executor",
            "ray",
            "--ray-address",
            f"127.0.0.1:{port}",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"--ray-address '127.0.0.1:{port}': no Ray head answers there" in err
