"""Data that needs no download: scikit-learn's digits (default) and MNIST-1D.

MNIST-1D is generated locally with `mnist1d.data.make_dataset` and its default
arguments (never `get_dataset`, which downloads); generation takes about 2 s.
Both return float64 tensors; runs cast them to their precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor  # float64, [N, C, *spatial]
    y_train: torch.Tensor  # int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample: (channels, *spatial)."""
        return tuple(self.x_train.shape[1:])

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test samples of "
            f"shape {list(self.shape)}, {self.classes} classes"
        )


def load(name: str, train_size: int = 0, test_size: int = 0) -> Dataset:
    """The dataset `name` ("digits" or "mnist1d"), optionally subsampled (first rows of
    a fixed shuffle). The split is fixed; seeds vary initialisation and data order."""
    if name == "digits":
        ds = _digits()
    elif name == "mnist1d":
        ds = _mnist1d()
    else:
        raise ValueError(f"unknown dataset {name!r}; allowed: 'digits', 'mnist1d'")
    if train_size or test_size:
        ds = Dataset(
            ds.name,
            ds.x_train[: train_size or None],
            ds.y_train[: train_size or None],
            ds.x_test[: test_size or None],
            ds.y_test[: test_size or None],
            ds.classes,
        )
    return ds


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are integers 0..16; dividing by 16 keeps the many exact zeros of the
    # background, as MNIST's pixels in [0, 1] do in the published protocol.
    x = torch.tensor(bunch.data, dtype=torch.float64).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(20211206))
    x, y = x[order], y[order]
    n_train = 1437  # 80 %
    return Dataset("digits", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


def _mnist1d() -> Dataset:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:  # pragma: no cover
        raise ValueError(
            "--data mnist1d needs the mnist1d package: pip install 'kinkgrad[mnist1d]'"
        ) from None
    # make_dataset reseeds numpy's and random's global generators; keep ours intact.
    import random

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    f = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64).unsqueeze(1)
    i = lambda a: torch.tensor(np.asarray(a), dtype=torch.int64)
    return Dataset("mnist1d", f(d["x"]), i(d["y"]), f(d["x_test"]), i(d["y_test"]), 10)
