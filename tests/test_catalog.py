"""The catalog is the single source of truth: check it against PyTorch itself."""

from __future__ import annotations

import json

import pytest
import torch

import kinkgrad as kg
from kinkgrad.catalog import targets
from kinkgrad.cli import main as cli_main
from kinkgrad.conventions import composites, measure_torch, rows
from kinkgrad.families import Elementwise

SPECS = kg.catalog()


def test_names_unique_and_targets_disjoint():
    names = [s.name for s in SPECS]
    assert len(names) == len(set(names))
    assert sum(len(s.targets) for s in SPECS) == len(targets())
    assert {s.kind for s in SPECS} == {"kink", "tie", "jump"}
    for spec in SPECS:
        assert spec.targets, spec.name
        assert spec.probes, f"{spec.name} has no probe for the conventions table"


@pytest.mark.parametrize(
    "spec", [s for s in SPECS if type(s.family) is Elementwise], ids=lambda s: s.name
)
def test_one_sided_derivatives_match_pytorch_next_to_the_kink(spec):
    """D- and D+ in the catalog equal PyTorch's gradient one step either side (float64)."""
    for probe in spec.probes:
        if "clamp" in spec.name:
            continue  # its probes are lambdas with bounds: covered below
        x0 = torch.tensor(probe.inputs[0], dtype=torch.float64)
        call = spec.family.bind(spec.targets[0], (x0,), {})
        kinks = [k for k in spec.family.kinks(call) if bool(k.mask.all())]
        assert kinks, f"{spec.name}: probe {probe.at} is on no catalog kink"
        for k in kinks:
            for side, want in ((-1, k.minus[0]), (1, k.plus[0])):
                x = (x0 + side * 1e-9).requires_grad_(True)
                probe.fn(x).sum().backward()
                assert abs(x.grad.item() - want) < 1e-6, (spec.name, probe.at, side)


def test_clamp_one_sided():
    for lo_side, want in ((-1, 0.0), (1, 1.0)):
        x = torch.tensor(lo_side * 1e-9, dtype=torch.float64, requires_grad=True)
        torch.clamp(x, 0.0, 1.0).backward()
        assert x.grad.item() == want


def test_conventions_are_measured_live():
    table = {(r.op, r.at): r for r in rows()}
    assert table[("relu", "x=0")].torch == "0"
    assert table[("leaky_relu", "x=0 (slope 0.01)")].torch == "0.01"
    assert table[("maximum", "a == b")].torch == "(0.5, 0.5)"
    assert table[("heaviside", "x=0")].torch.startswith("error")
    # Measured, not typed in: a function with another derivative gives another number.
    probe = kg.Probe("x=0", ([0.0],), lambda x: torch.relu(x) + 0.25 * x, "[0, 1]", None)
    assert measure_torch(probe) == [[0.25]]


def test_composites_where_backprop_leaves_clarke():
    got = {c.expression.split("  ")[0]: (c.plain_backprop, c.true_derivative) for c in composites()}
    assert got["relu(x) - relu(-x)"] == (0.0, 1.0)
    assert got["maximum(x, 0) - relu(x)"] == (0.5, 0.0)
    assert got["clamp(x, 0, 1) - relu(x) + relu(x - 1)"] == (1.0, 0.0)


def test_conventions_cli(capsys):
    assert cli_main(["conventions", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"] == torch.__version__
    assert {r["op"] for r in data["ops"]} == {s.name for s in SPECS}
    assert "jax" in data["ops"][0]
    assert cli_main(["conventions"]) == 0
    out = capsys.readouterr().out
    assert "relu(x) - relu(-x)" in out and "PyTorch" in out
    assert cli_main(["conventionz"]) == 2
    assert "did you mean 'conventions'" in capsys.readouterr().err
