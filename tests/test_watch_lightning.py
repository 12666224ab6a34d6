"""kinkgrad.integrations.lightning with a real Lightning Trainer on CPU: the values the
callback logs equal a plain `kg.watch` run's, the policy it attaches gives the same
weights as `kg.attach`, DDP sums the counts of the ranks, and without Lightning the
import says which extra to install."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import kinkgrad as kg
from kinkgrad.watch_report import step_scalars

L = pytest.importorskip("lightning.pytorch")
from kinkgrad.integrations.lightning import KinkCallback  # noqa: E402

BATCH = 4
BATCHES = 3


class Tiny(L.LightningModule):
    """Units 0 and 1 of the first layer have zero weights and no bias: their ReLU input
    is exactly 0 for every sample, at every step (their gradient is 0 under PyTorch's
    ReLU'(0) = 0, so they stay zero)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
        self.head = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        with torch.no_grad():
            self.net[0].weight[:2].zero_()

    def forward(self, x):
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x).square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data(n: int = BATCH * BATCHES) -> DataLoader:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x), batch_size=BATCH)


def _trainer(**kw) -> L.Trainer:
    base = dict(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    base.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and loggers
        return L.Trainer(**base)


def _fit(trainer: L.Trainer, module: L.LightningModule) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data())


def _plain_run(policy: dict | None = None) -> tuple[dict[int, dict[str, int]], Tiny]:
    """The same training, by hand, under a plain kg.watch (one step per batch)."""
    module = Tiny()
    if policy:
        kg.attach(module, **policy)
    opt = module.configure_optimizers()
    with kg.watch(module, step="manual") as w:
        for i, batch in enumerate(_data()):
            if i:
                w.step()
            opt.zero_grad()
            module.training_step(batch, i).backward()
            opt.step()
    kg.detach(module)
    return step_scalars(w.records()), module


def test_logged_values_equal_a_plain_watch_run():
    cb = KinkCallback()
    module = Tiny()
    trainer = _trainer(fast_dev_run=BATCHES, callbacks=[cb])
    _fit(trainer, module)
    expected, _ = _plain_run()
    assert len(cb.logged) == BATCHES
    for entry in cb.logged:
        step = entry.pop("step")
        entry.pop("global_step")
        assert entry == expected[step]
    assert expected[0]["kinkgrad/exact/op/relu"] >= 2 * BATCH  # the two dead units at least
    assert expected[0]["kinkgrad/effective/module/net"] == 2 * BATCH
    # What Lightning itself recorded for the last batch: the same numbers.
    last = {k: v for k, v in trainer.logged_metrics.items() if k.startswith("kinkgrad/")}
    assert {k: int(v) for k, v in last.items()} == expected[BATCHES - 1]
    assert not cb.watcher.active and kg.attached(module) is None


def test_the_trainers_logger_receives_every_step():
    from lightning.pytorch.loggers.logger import Logger

    class Capture(Logger):
        def __init__(self):
            super().__init__()
            self.rows = []

        name = "capture"
        version = 0

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, *args, **kwargs):
            pass

    logger = Capture()
    cb = KinkCallback()
    trainer = _trainer(max_steps=BATCHES, logger=logger, log_every_n_steps=1, limit_val_batches=0)
    trainer.callbacks.append(cb)
    _fit(trainer, Tiny())
    expected, _ = _plain_run()
    got = [{k: int(v) for k, v in m.items() if k.startswith("kinkgrad/")} for _, m in logger.rows]
    assert [g for g in got if g] == [expected[s] for s in range(BATCHES)]


def test_policy_applies_like_attach():
    cb = KinkCallback(policy={"relu": 1.0}, watch=False)
    module = Tiny()
    _fit(_trainer(fast_dev_run=BATCHES, callbacks=[cb]), module)
    _, reference = _plain_run(policy={"relu": 1.0})
    for a, b in zip(module.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    # Under ReLU'(0) = 1 the dead units learn: their weights left zero.
    assert module.net[0].weight[:2].abs().sum() > 0
    assert cb.watcher is None and cb.logged == []
    assert kg.attached(module) is None  # detached at teardown


def test_a_bad_policy_fails_at_construction():
    with pytest.raises(ValueError, match="relu"):
        KinkCallback(policy={"relu": "nope"})
    with pytest.raises(ValueError, match="unknown op"):
        KinkCallback(policy={"rleu": 1.0})


def test_missing_lightning_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name == "lightning" or name.startswith("lightning."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "kinkgrad.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"kinkgrad\[lightning\]"):
        import kinkgrad.integrations.lightning  # noqa: F401
    import kinkgrad

    assert kinkgrad.watch is not None  # kinkgrad itself never needs Lightning


# --------------------------------------------------------------------------------------
# DDP: two CPU processes; every rank logs the sum over ranks
# --------------------------------------------------------------------------------------


class _Dump(KinkCallback):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out

    def on_train_end(self, trainer, pl_module):
        own = self.watcher.records()
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"logged": self.logged, "own": own})
        )


@pytest.mark.slow
def test_ddp_counts_are_summed_over_ranks(tmp_path):
    trainer = _trainer(
        strategy="ddp_spawn",
        devices=2,
        fast_dev_run=2,
        callbacks=[_Dump(str(tmp_path))],
    )
    _fit(trainer, Tiny())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["logged"] == ranks[1]["logged"] and len(ranks[0]["logged"]) == 2
    # 12 samples, 6 per rank: batches of 4 then 2, each sample on two dead units.
    for s, samples in enumerate((BATCH, 2)):
        own = [step_scalars(r["own"])[s]["kinkgrad/exact/module/net"] for r in ranks]
        assert own == [2 * samples, 2 * samples]
        assert ranks[0]["logged"][s]["kinkgrad/exact/module/net"] == sum(own)
        assert ranks[0]["logged"][s]["kinkgrad/effective/module/net"] == sum(own)


def test_kinkgrad_imports_and_watches_without_the_extras():
    import subprocess

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'tensorboard'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, kinkgrad as kg\n"
        "m = torch.nn.ReLU()\n"
        "with kg.watch(m) as w:\n"
        "    m(torch.zeros(3))\n"
        "assert w.records()[0]['exact'] == 3\n"
        "try:\n"
        "    import kinkgrad.integrations.lightning\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "try:\n"
        "    w.to_tensorboard('unused')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "pip install 'kinkgrad[lightning]'" in out
    assert "pip install 'kinkgrad[tensorboard]'" in out
