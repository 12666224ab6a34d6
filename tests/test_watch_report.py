"""kinkgrad.watch's outputs for real models: the table never cuts a module path, the
TensorBoard scalars read back equal the records, and the plot stays readable from 1 to
200 modules (a ResNet-style model of 40+ modules; the PNG of one is in docs/)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kinkgrad as kg
from kinkgrad import watch_report


def _nested(depth: int) -> nn.Module:
    m: nn.Module = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    for _ in range(depth):
        m = nn.Sequential(m)
    return m


class _LongPaths(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.an_encoder_block_with_a_rather_long_descriptive_name = _nested(40)

    def forward(self, x):
        return self.an_encoder_block_with_a_rather_long_descriptive_name(x)


def _first_column(text: str) -> str:
    """The first column of a rich table, its wrapped lines joined."""
    cells = []
    for line in text.splitlines():
        if line.startswith("│"):
            cells.append(line.split("│")[1].strip())
    return "".join(cells)


@pytest.mark.parametrize("width", [80, 140])
def test_print_never_cuts_a_module_path(width):
    model = _LongPaths()
    with kg.watch(model) as w:
        model(torch.zeros(3, 2))
    path = w.records()[0]["module"]
    assert len(path) > 100 and path.endswith(".1")
    text = watch_report.render(w.summary(), width=width)
    assert _first_column(text) == f"{path}total"  # every character, in order
    assert str(w).count("\n") > 6  # print(w) wraps the path over several lines


# --------------------------------------------------------------------------------------
# A ResNet-style model (torchvision is not needed): 40+ modules
# --------------------------------------------------------------------------------------


class Block(nn.Module):
    """A basic residual block; bn2 starts at zero (zero-init residual), so the second
    ReLU's input equals the shortcut's, whose zeros (from earlier ReLUs) are kinks."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        nn.init.zeros_(self.bn2.weight)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def resnet_like(width: int = 8, classes: int = 10) -> nn.Sequential:
    """Stem (conv, BN, ReLU, max-pool), four stages of two blocks, pooling, head."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        stride = 1 if i == 0 else 2
        layers += [nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1))]
        cin = cout
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def train_watched(model: nn.Module, steps: int = 6) -> kg.Watcher:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    with kg.watch(model) as w:
        for _ in range(steps):
            x = torch.randn(4, 3, 16, 16, generator=gen)
            x[:, :, :4] = 0.0  # a black band: exact zeros and tied pooling windows
            y = torch.randint(0, 10, (4,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_of_a_resnet_style_model(tmp_path):
    model = resnet_like(width=4)
    assert len(list(model.modules())) >= 40
    w = train_watched(model, steps=3)
    recs = w.records()
    layers = {(r["module"], r["op"]) for r in recs}
    assert len(layers) > 10 and sum(r["exact"] for r in recs) > 0
    p = w.plot(tmp_path / "resnet.png")
    width, height = _png_size(p)
    assert width == 1200 and height > 900
    text = str(w)
    assert all(f"{m} " in text for m, _ in layers)


@pytest.mark.parametrize("n", [1, 12, 260])  # 260: beyond MAX_ROWS, the rest summed
def test_plot_scales_with_the_number_of_layers(tmp_path, n):
    from kinkgrad import watch_plot

    recs = [
        {
            "step": s,
            "module": f"stage{i % 4}.block{i}.conv",
            "op": "relu",
            "dtype": "float32",
            "exact": (i * 7 + s) % 5,
            "effective": (i + s) % 3,
            "near": (i * 7 + s) % 5,
        }
        for i in range(n)
        for s in range(5)
    ]
    p = watch_plot.plot(recs, tmp_path / f"{n}.png")
    _, height = _png_size(p)
    rows = min(n, watch_plot.MAX_ROWS)
    assert height >= 16 * rows  # at least 16 px per heat-map row: labels do not overlap
    tiny_parts = watch_plot.shorten("x." * 40 + "y : relu")  # nothing to cut: the middle goes
    assert len(tiny_parts) == watch_plot.LABEL_CHARS and tiny_parts.endswith("y : relu")
    long = "encoder.stage0.block12.attention.some_long_submodule_name.conv : relu"
    short = watch_plot.shorten(long)
    assert len(short) <= watch_plot.LABEL_CHARS and "block12" in short
    assert short == "enco….stage0.block12.atte….some….conv : relu"


def test_plot_empty(tmp_path):
    p = kg.watch(nn.Linear(1, 1)).plot(tmp_path / "empty.png")
    assert _png_size(p)[0] > 0


# --------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------


def _tiny_watched() -> kg.Watcher:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[:2].zero_()  # units 0 and 1 sit on the kink for every sample
    with kg.watch(model) as w:
        for s in range(3):
            model(torch.randn(2 + s, 3)).sum().backward()
    return w


def test_to_tensorboard_reads_back_equal(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    w = _tiny_watched()
    writer = SummaryWriter(str(tmp_path / "run"))
    written = w.to_tensorboard(writer)
    writer.close()
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    back: dict[int, dict[str, int]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            back.setdefault(event.step, {})[tag] = int(event.value)
    expected: dict[int, dict[str, int]] = {}
    for r in w.records():
        tags = expected.setdefault(r["step"], {})
        for c in ("exact", "effective", "near"):
            for tag in (f"kinkgrad/{c}/op/{r['op']}", f"kinkgrad/{c}/module/{r['module']}"):
                tags[tag] = tags.get(tag, 0) + r[c]
            tags[f"kinkgrad/{c}/total"] = tags.get(f"kinkgrad/{c}/total", 0) + r[c]
    assert back == expected == written
    assert back[2]["kinkgrad/exact/op/relu"] == 2 * 4  # 4 samples at step 2, 2 units each
    assert back[2]["kinkgrad/effective/module/1"] == 8

    # A folder instead of a writer; one step only.
    only = w.to_tensorboard(tmp_path / "one", step=1)
    acc = EventAccumulator(str(tmp_path / "one"))
    acc.Reload()
    assert {e.step for t in acc.Tags()["scalars"] for e in acc.Scalars(t)} == {1}
    assert only == {1: expected[1]}


def test_top_module_scalars_sum_submodules():
    recs = [
        {"step": 0, "module": "features.1", "op": "relu", "exact": 2, "effective": 1, "near": 3},
        {"step": 0, "module": "features.4", "op": "relu", "exact": 5, "effective": 0, "near": 5},
        {"step": 0, "module": "(root)", "op": "clamp", "exact": 1, "effective": 1, "near": 1},
    ]
    s = watch_report.step_scalars(recs)[0]
    assert s["kinkgrad/exact/module/features"] == 7 and s["kinkgrad/near/op/relu"] == 8
    assert s["kinkgrad/exact/module/(root)"] == 1 and s["kinkgrad/exact/total"] == 8


def test_missing_tensorboard_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    w = _tiny_watched()
    with pytest.raises(ImportError, match=r"kinkgrad\[tensorboard\]"):
        w.to_tensorboard(tmp_path / "run")
