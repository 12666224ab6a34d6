"""The study's certified policy: settings, what a certified run records (certification
counts and the kinks each SGD step crosses), that the crossing counts measure what they
claim, determinism, and the report. Fast: tiny grids in-process."""

from __future__ import annotations

import copy
import csv
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import kinkgrad as kg
from kinkgrad.study import config, data, models, policies, report, results, runner, train
from kinkgrad.study.cli import cli, parser, settings_from
from kinkgrad.study.config import ConfigError, RunKey

TINY = {
    "models": ["mlp"],
    "precisions": ["float64"],
    "bias": ["fused"],
    "batchnorm": [False],
    "seeds": [0],
    "epochs": 2,
    "train_size": 96,
    "test_size": 60,
    "jobs": 1,
    "extra_policies": ["certified"],
}
MLP64 = RunKey("mlp", "float64", "fused", False, 0)


def tiny(**over):
    return config.build({**TINY, **over})


def strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("elapsed_s", "cpu_s", "checksum")}


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", 96, 60)


def certified(rec: dict) -> tuple[str, dict]:
    (name,) = rec["certified"]
    assert rec["policies"][name] == "certified"
    return name, rec["certified"][name]


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------


def test_certified_is_registered_and_in_the_default_grid_for_the_first_seed():
    assert "certified" in policies.REGISTRY
    assert policies.REGISTRY["certified"]().certifies
    cfg = config.build({})
    assert cfg.extra_policies == ("certified",) and cfg.extra_seeds == 1
    with_it = [k for k in cfg.grid() if cfg.extra_for(k)]
    assert len(with_it) == 32 and {k.seed for k in with_it} == {0}
    assert [p.name for p in train.policies(cfg, with_it[0])][-1] == "certified"
    assert len(train.policies(cfg, RunKey("mlp", "float32", "fused", False, 1))) == 2
    quick = config.build({}, quick=True)  # one seed: every quick configuration has it
    assert all(quick.extra_for(k) == ("certified",) for k in quick.grid())
    # --extra-seeds 0: every seed; the first N seeds of the grid, whatever they are
    every = config.build({"extra_seeds": 0})
    assert all(every.extra_for(k) for k in every.grid())
    later = config.build({"seeds": [5, 7, 9], "extra_seeds": 2})
    assert {k.seed for k in later.grid() if later.extra_for(k)} == {5, 7}


def test_settings_change_the_hash():
    base = config.build({})
    for over in ({"crossings_every": 2}, {"extra_seeds": 0}, {"extra_policies": []}):
        assert config.build(over).settings_hash() != base.settings_hash()


def test_cli_flags():
    args = parser().parse_args(["--extra-policies", "none", "--extra-seeds", "0"])
    cfg = config.build(settings_from(args))
    assert cfg.extra_policies == () and cfg.extra_seeds == 0
    args = parser().parse_args(["--extra-policies", "certified", "--crossings-every", "4"])
    cfg = config.build(settings_from(args))
    assert cfg.extra_policies == ("certified",) and cfg.crossings_every == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--extra-seeds", "-1"], "extra_seeds: expected an integer >= 0, got -1"),
        (["--crossings-every", "-2"], "crossings_every: expected an integer >= 0, got -2"),
        (["--extra-policies", "certified,certified"], "extra_policies: duplicate values"),
        (["--extra-policies", "certifed"], "unknown policy 'certifed'; registered: certified"),
        (
            ["--kinks", "0", "--ties", "first", "--no-noise-floor", "--seeds", "0,1"],
            "nothing to compare",
        ),
    ],
)
def test_bad_certified_settings_are_refused_before_training(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert cli([*argv, "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error" in err and message in err
    assert not out.exists()


def test_a_lone_certified_policy_is_enough_to_compare_when_it_runs_everywhere():
    config.build({"kinks": [0], "ties": ["first"], "noise_floor": False, "seeds": [0]})
    with pytest.raises(ConfigError, match="first extra_seeds seeds"):
        config.build({"kinks": [0], "ties": ["first"], "noise_floor": False, "seeds": [0, 1]})
    config.build(
        {"kinks": [0], "ties": ["first"], "noise_floor": False, "seeds": [0, 1], "extra_seeds": 0}
    )


def test_step_seeds_are_fixed_and_distinct():
    seeds = {policies.step_seed(s, t) for s in range(4) for t in range(500)}
    assert len(seeds) == 2000 and all(0 <= v < 2**63 for v in seeds)
    assert policies.step_seed(0, 0) == policies.step_seed(0, 0)
    assert policies.step_seed(0, 1) != policies.step_seed(1, 0)


# --------------------------------------------------------------------------------------
# what a certified run records
# --------------------------------------------------------------------------------------


def test_crossings_are_recorded_per_step_as_integers(digits):
    cfg = tiny(precisions=["float16"], bias=["separate"])
    rec = train.run_config(cfg, RunKey("mlp", "float16", "separate", False, 0), digits)
    name, c = certified(rec)
    s = c["series"]
    assert s["step"] == list(range(rec["steps"]))  # every step, crossings_every = 1
    assert all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in s["crossings"])
    assert all(isinstance(v, int) and v >= 0 for v in s["kinks_hit"])
    assert all(v is None or v > 0 for v in s["radius"])
    # a radius beyond the step means the step crossed nothing, and vice versa
    for n, r in zip(s["crossings"], s["radius"], strict=True):
        assert (n == 0) == (r is None or r > 1)
    assert c["crossings"] == sum(s["crossings"]) and c["crossings_max"] == max(s["crossings"])
    assert c["crossing_steps"] == sum(n > 0 for n in s["crossings"])
    assert c["measured_steps"] == c["steps"] == rec["steps"] == len(s["step"])
    assert c["certified_steps"] + c["uncertified_steps"] == c["steps"]
    # float16: 6 directions; no ties in an MLP
    assert c["uncertified_steps"] == 0 and c["max_directions"] == 6
    assert sum(c["crossings_by_op"].values()) == c["crossings"]
    assert set(c["crossings_by_op"]) == {"relu"}
    # per epoch: the same numbers, split
    eps = [ep["certified"][name] for ep in rec["epochs"]]
    assert [e["steps"] for e in eps] == [ep["steps"] for ep in rec["epochs"]]
    assert sum(e["crossings"] for e in eps) == c["crossings"]
    assert sum(e["kinks_hit"] for e in eps) == c["kinks_hit"] == sum(s["kinks_hit"])
    for e in eps:
        assert e["crossings_mean"] == e["crossings"] / e["measured_steps"]
        assert 0 <= e["crossing_share"] <= 1 and e["radius_median"] > 0
    # the certified run is one more paired run, compared like the others
    pair = rec["pairs"][name]
    assert pair["kind"] == "policy" and pair["label"] == "certified"
    assert 0 <= pair["same_weights_differ"] <= rec["steps"]
    assert json.loads(json.dumps(results.seal(rec)))  # JSON-safe (no inf, no nan)


def test_crossings_every_k_steps(digits):
    rec = train.run_config(tiny(crossings_every=3), MLP64, digits)
    _, c = certified(rec)
    assert c["series"]["step"] == list(range(0, rec["steps"], 3))
    assert c["measured_steps"] == math.ceil(rec["steps"] / 3)
    assert c["steps"] == rec["steps"]  # certification is counted at every step
    off = train.run_config(tiny(crossings_every=0), MLP64, digits)
    _, c0 = certified(off)
    assert c0["measured_steps"] == 0 and c0["crossings_mean"] is None
    # measuring changes nothing in training
    assert off["final"] == rec["final"] and off["pairs"] == rec["pairs"]


def test_tiny_learning_rate_crosses_no_kink_and_a_huge_one_crosses_many(digits):
    small = train.run_config(tiny(lr=1e-7, epochs=1), MLP64, digits)
    _, c = certified(small)
    assert c["crossings"] <= 1
    assert c["radius_min"] is None or c["radius_min"] > 1
    large = train.run_config(tiny(lr=5.0, epochs=1), MLP64, digits)
    _, c = certified(large)
    sites = 32 * 2 * 32  # ReLU inputs of a minibatch: batch x two hidden layers of 32
    assert c["crossing_share"] == 1 and c["crossings_mean"] > 0.1 * sites
    assert c["radius_median"] < 1e-3


def test_off_the_kinks_the_certified_run_is_the_reference_run(digits):
    """float64 MLP: no kink is ever hit, so certified gradients are PyTorch's bit for bit
    and the certified run never leaves the reference run."""
    rec = train.run_config(tiny(), MLP64, digits)
    name, c = certified(rec)
    assert c["kinks_hit"] == 0 and c["certified_steps"] == rec["steps"]
    assert rec["pairs"][name]["first_divergence"] is None
    assert rec["pairs"][name]["same_weights_differ"] == 0
    assert rec["final"]["test_acc"][name] == rec["final"]["test_acc"]["ref"]


def test_cnn_steps_with_immaterial_ties_are_certified(digits):
    """Max-pool windows over the blank background tie with equal tangents (their inputs
    do not move along either direction): immaterial, so every step of the float64 CNN
    is certified."""
    cfg = tiny(models=["cnn"], epochs=1)
    rec = train.run_config(cfg, RunKey("cnn", "float64", "fused", False, 0), digits)
    _, c = certified(rec)
    assert c["certified_steps"] == rec["steps"] and c["uncertified_steps"] == 0
    assert c["immaterial"] > 0 and c["unresolved"] == 0
    assert c["uncertified_jumps"] == 0 and c["jumps_hit"] == 0
    assert c["tangent_passes"] == 2 * rec["steps"]  # each step met a tie; two directions
    assert {"relu", "max_pool2d"} >= set(c["crossings_by_op"]) and c["crossings"] > 0


def test_reasons_for_no_certification_are_counted_separately():
    stats = train._CertStats(every=1)
    step = {"kinks_hit": 0, "unresolved": 0, "jumps_hit": 0, "tangent_passes": 0, "by_op": {}}
    step["immaterial"] = 0
    stats.add_step(step)
    stats.add_step({**step, "kinks_hit": 3, "tangent_passes": 1, "by_op": {"relu": (3, 0)}})
    stats.add_step({**step, "kinks_hit": 5, "immaterial": 5, "by_op": {"max_pool2d": (5, 0)}})
    stats.add_step({**step, "jumps_hit": 2, "tangent_passes": 1, "by_op": {"sign": (2, 0)}})
    stats.add_step({**step, "kinks_hit": 4, "unresolved": 1, "by_op": {"max": (4, 1)}})
    stats.add_step({**step, "kinks_hit": 1, "unresolved": 1, "jumps_hit": 1, "by_op": {}})
    ep = stats.end_epoch()
    assert (ep["steps"], ep["certified_steps"], ep["uncertified_steps"]) == (6, 3, 3)
    assert ep["immaterial"] == 5
    assert (ep["uncertified_jumps"], ep["uncertified_unresolved"]) == (2, 2)
    assert (ep["kinks_hit"], ep["unresolved"], ep["jumps_hit"]) == (13, 2, 3)
    assert ep["by_op"]["max"] == {"hits": 4, "unresolved": 1}
    assert ep["measured_steps"] == 0 and ep["radius_median"] is None


# --------------------------------------------------------------------------------------
# the crossing counts measure what they claim
# --------------------------------------------------------------------------------------


def _preactivations(model, x):
    outs, h = [], x.flatten(1)
    for name in ("fc1", "fc2"):
        z = getattr(model, name)(h)
        outs.append(z.flatten())
        h = torch.relu(z)
    return torch.cat(outs)


def test_predicted_crossings_match_the_sign_changes_of_an_sgd_step(digits):
    """kink_crossings along the update predicts, from the tangents at the old weights,
    which ReLU inputs reach 0 during the step. The first layer's inputs are linear in the
    weights (exact); the second's are not, so a few may differ. Compare with the sign
    changes actually seen between the old and the new weights (which miss inputs that
    cross twice)."""
    g = torch.Generator().manual_seed(0)
    model = models.build(
        "mlp", digits.shape, 10, width=32, channels=4, bias="fused", batchnorm=False, generator=g
    )
    old = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)
    predicted = actual = off = first_layer = 0
    for b in range(0, 96, 32):
        x, y = digits.x_train[b : b + 32].double(), digits.y_train[b : b + 32]
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        old.load_state_dict(model.state_dict())
        opt.step()
        update = [p.detach() - q.detach() for p, q in zip(model.parameters(), old.parameters())]
        lin = kg.kink_crossings(loss_fn, old, x, y, direction=update, step=1.0)
        with torch.no_grad():
            z0, z1 = _preactivations(old, x), _preactivations(model, x)
        changed = (z0 > 0) != (z1 > 0)
        predicted += lin.crossings
        actual += int(changed.sum())
        off += abs(lin.crossings - int(changed.sum()))
        first_layer += int(changed[: 32 * 32].sum())
    assert actual > 50 and first_layer > 0
    # measured over a whole epoch: 1.6% per step (sum of |differences|), 0.1% in total
    assert off <= 0.05 * actual + 2
    assert abs(predicted - actual) <= 0.05 * actual + 2


# --------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------


def test_same_seed_same_numbers(digits):
    cfg = tiny(models=["cnn"], precisions=["float16"], bias=["separate"], epochs=1)
    key = RunKey("cnn", "float16", "separate", False, 0)
    a = train.run_config(cfg, key, digits)
    b = train.run_config(cfg, key, digits)
    assert strip(a) == strip(b)
    _, ca = certified(a)
    assert ca["kinks_hit"] > 0 and ca["crossings"] > 0  # not vacuous
    other = train.run_config(
        tiny(models=["cnn"], precisions=["float16"], bias=["separate"], epochs=1, seeds=[1]),
        RunKey("cnn", "float16", "separate", False, 1),
        digits,
    )
    assert certified(other)[1]["series"] != ca["series"]


# --------------------------------------------------------------------------------------
# report, CSV, plot
# --------------------------------------------------------------------------------------


def test_report_csv_and_plot(tmp_path):
    cfg = tiny(models=["mlp", "cnn"], seeds=[0, 1], epochs=1, train_size=64)
    out = tmp_path / "run"
    records, manifest = runner.run_study(cfg, out, log=lambda m: None, warn=lambda m: None)
    assert [("certified" in r) for r in records] == [True, False, True, False]  # seed 0 only
    paths = report.write(out, records, manifest)
    md = (out / "report.md").read_text()
    opening = md.split("\n## ")[0]
    assert "**Does an SGD step stay within the linear region?**" in opening
    assert "Steps that cross no kink: none of the 4 measured" in opening
    assert "Kinks crossed per step, mean: MLP float64" in opening and "CNN float64" in opening
    assert "Certification: MLP all 2 steps certified; CNN all 2 steps certified" in opening
    assert "seed 0 of every configuration" in opening
    assert "## Certified gradients and the kinks an SGD step crosses" in md
    assert "2 of 4 configurations" in md  # the subset is said
    assert out / "plots" / "crossings.png" in paths
    assert (out / "plots" / "crossings.png").stat().st_size > 10_000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    rows = list(csv.DictReader((out / results.CSV).read_text().splitlines()))
    assert rows[0]["alt2_crossings_mean"] and rows[1].get("alt2_crossings_mean") in ("", None)
    assert "not certified" in md and "max_pool2d" in md


@pytest.mark.slow  # ~15 s: torchrun with 2 CPU ranks
def test_certified_under_torchrun(tmp_path):
    from tests.test_study_e2e import records, run

    out = tmp_path / "ddp"
    p = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["-m", "kinkgrad.study", "--quick", "--models", "mlp", "--precisions", "float64"]
        + ["--out", str(out)],
        timeout=180,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = records(out)
    _, c = certified(rec)
    quick = config.build({"models": ["mlp"], "precisions": ["float64"]}, quick=True)
    single = train.run_config(quick, quick.grid()[0], data.load("digits", quick.train_size))
    _, c1 = certified(single)
    # each rank measures its half of the minibatch; summed, the counts cover all of it
    assert c["certified_steps"] == c1["certified_steps"] == rec["steps"]
    assert abs(c["crossings"] - c1["crossings"]) <= 0.02 * c1["crossings"]
