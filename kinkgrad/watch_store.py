"""Counters of `kinkgrad.watch`: host ints per row, device counts folded in blocks, so
that no op call waits for the device."""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from .families import _to_device

#: Device-side columns; the host keeps calls, elements, sites (and some near hits).
DEVICE_COLUMNS = ("exact", "effective", "near", "subnormal", "samples", "nonfinite")
_FLUSH = 256
_NEAR = DEVICE_COLUMNS.index("near")


class Store:
    """Counters of one watcher. A row is one (step, module, op, dtype) key. Each call
    appends its count vector; every `_FLUSH` vectors are folded into one dense int64
    tensor per device with one `index_add_`, so no call waits for the device."""

    def __init__(self) -> None:
        self.keys: list[tuple] = []
        self.index: dict[tuple, int] = {}
        # calls, elements, sites, and near hits counted on the host: the CPU pre-check
        # reads its near count back anyway, and a tensor per call would cost more.
        self.host: list[list[int]] = []
        self.lock = threading.Lock()
        # device -> (rows, vectors [6]) and (rows, effective scalars)
        self.fwd: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        self.eff: dict[torch.device, tuple[list[int], list[Tensor]]] = {}
        self.dense: dict[torch.device, Tensor] = {}
        self.zero: dict[torch.device, Tensor] = {}

    def row(self, key: tuple) -> int:
        i = self.index.get(key)
        if i is None:
            with self.lock:
                i = self.index.get(key)
                if i is None:
                    i = self.index[key] = len(self.keys)
                    self.keys.append(key)
                    self.host.append([0, 0, 0, 0])
        return i

    def zero_on(self, device: torch.device) -> Tensor:
        z = self.zero.get(device)
        if z is None:
            z = self.zero[device] = torch.zeros((), dtype=torch.int64, device=device)
        return z

    def add(self, row: int, vec: Tensor) -> None:
        self._append(self.fwd, row, vec)

    def add_effective(self, row: int, n: Tensor) -> None:
        self._append(self.eff, row, n)

    def _append(self, pending: dict, row: int, t: Tensor) -> None:
        with self.lock:
            rows, values = pending.setdefault(t.device, ([], []))
            rows.append(row)
            values.append(t)
            if len(rows) >= _FLUSH:
                self._flush(t.device)

    def _dense(self, device: torch.device) -> Tensor:
        need = len(self.keys)
        d = self.dense.get(device)
        if d is None or d.shape[0] < need:
            new = torch.zeros(
                max(64, 2 * need), len(DEVICE_COLUMNS), dtype=torch.int64, device=device
            )
            if d is not None:
                new[: d.shape[0]] = d
            d = self.dense[device] = new
        return d

    def _flush(self, device: torch.device) -> None:
        """Fold pending vectors of `device` into its dense tensor (caller holds the lock)."""
        dense = self._dense(device)
        rows, vecs = self.fwd.pop(device, ([], []))
        if rows:
            dense.index_add_(0, _to_device(rows, device), torch.stack(vecs))
        rows, vals = self.eff.pop(device, ([], []))
        if rows:
            dense[:, 1].index_add_(0, _to_device(rows, device), torch.stack(vals))

    def read(self, step: int | None = None) -> list[tuple[tuple, list[int]]]:
        """(key, counts in COUNTS order) per row (rows of `step` only, if given); one
        device-to-host copy per device."""
        with self.lock, torch._C.DisableTorchFunction():
            devices = set(self.fwd) | set(self.eff) | set(self.dense)
            if step is None:
                chosen = list(range(len(self.keys)))
            else:
                chosen = [i for i, key in enumerate(self.keys) if key[0] == step]
            totals = [[0] * len(DEVICE_COLUMNS) for _ in chosen]
            for device in devices:
                self._flush(device)
                dense = self.dense[device]
                if step is None:
                    table = dense[: len(self.keys)]
                else:  # copy only these rows: a long run has many steps
                    table = dense.index_select(0, _to_device(chosen, device))
                for i, vals in enumerate(table.tolist()):
                    totals[i] = [a + b for a, b in zip(totals[i], vals, strict=True)]
            out = []
            for i, r in enumerate(chosen):
                calls, elements, sites, near = self.host[r]
                totals[i][_NEAR] += near
                out.append((self.keys[r], [calls, elements, sites, *totals[i]]))
            return out
