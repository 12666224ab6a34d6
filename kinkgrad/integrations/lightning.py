"""Lightning: apply a kinkgrad policy to a LightningModule and log its kink counts.

>>> from kinkgrad.integrations.lightning import KinkCallback
>>> cb = KinkCallback(policy={"relu": 1.0})  # ReLU'(0) = 1, and watch (the default)
>>> # trainer = lightning.Trainer(callbacks=[cb]); trainer.fit(module)

Every training batch is one watcher step. After the batch (forward, backward and the
optimizer step), the callback logs, through `LightningModule.log` (so the trainer's
logger receives them), the exact, effective and near hits of that batch per op
(`kinkgrad/exact/op/relu`), per top-level module (`kinkgrad/exact/module/features`)
and in total (`kinkgrad/exact/total`): the names `Watcher.to_tensorboard` writes. Under
a distributed strategy (DDP), the counts are summed over all ranks (every rank logs the
same sums). Validation and test batches are not watched.

Needs `pip install 'kinkgrad[lightning]'`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised with a simulated missing import
    raise ImportError(
        "kinkgrad.integrations.lightning needs Lightning; install it with: "
        "pip install 'kinkgrad[lightning]'"
    ) from e

from .. import watch_dist
from ..intercept import attach, detach
from ..policy import make_frame
from ..watch import Watcher
from ..watch_report import step_scalars

__all__ = ["KinkCallback"]


class KinkCallback(pl.Callback):
    """A Lightning callback: a policy on the LightningModule and/or a watcher logging
    per-step kink counts (see the module docstring).

    **Arguments**: `policy`: op name -> value, as in `kinkgrad.policy` (None: no policy);
    `default`: the policy's default value; `watch`: count and log kink hits; `near`: the
    watcher's near tolerance; `all_ranks`: sum over ranks when `torch.distributed` is
    initialised (a collective every batch; False: each rank logs its own counts);
    `prog_bar`: show the total exact hits in the progress bar.

    After `fit`, `callback.watcher` holds every count (`records()`, `plot()`, ...) and
    `callback.logged` the values logged, one dict per batch.
    """

    def __init__(
        self,
        policy: Mapping[str, object] | None = None,
        *,
        default: object = None,
        watch: bool = True,
        near: float | None = None,
        all_ranks: bool = True,
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        self.policy = dict(policy or {})
        self.default = default
        if self.policy or default is not None:
            make_frame(self.policy, default)  # a bad policy fails here, not mid-fit
        self.watch = watch
        self.near = near
        self.all_ranks = all_ranks
        self.prog_bar = prog_bar
        self.watcher: Watcher | None = None
        self.logged: list[dict[str, Any]] = []
        self._batches = 0
        self._attached: Any = None

    # ---- policy ----------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (self.policy or self.default is not None) and self._attached is None:
            self._attached = attach(pl_module, self.default, **self.policy)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()
        if self._attached is not None:
            detach(self._attached)
            self._attached = None

    # ---- watch -----------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.watch and self.watcher is None:
            self.watcher = Watcher(pl_module, near=self.near, step="manual")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.watcher is None:
            return
        if self._batches:
            self.watcher.step()
        self._batches += 1
        self.watcher.__enter__()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        w = self.watcher
        if w is None or not w.active:
            return
        w.close()  # the backward and the optimizer step have run: counts are complete
        step = w.current_step
        all_ranks = self.all_ranks and watch_dist.distributed() is not None
        scalars = step_scalars(w.records(all_ranks=all_ranks, step=step)).get(step, {})
        for tag, value in scalars.items():
            pl_module.log(
                tag,
                float(value),
                on_step=True,
                on_epoch=False,
                prog_bar=self.prog_bar and tag == "kinkgrad/exact/total",
            )
        self.logged.append({"step": step, "global_step": trainer.global_step, **scalars})

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def _close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
