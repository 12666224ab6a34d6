"""Where the study's units of work run: in this process, in a local process pool, or as
Ray tasks on a cluster. Every executor yields `(unit index, result)` as units finish,
so the driver writes each result at once; only the driver writes the run directory.

A unit is any picklable value and `fn` a top-level function (pickled by reference:
Ray workers need the kinkgrad package installed, not the driver's files).

>>> with Serial() as ex:
...     sorted(ex.map_unordered(abs, [-2, 3]))
[(0, 2), (1, 3)]
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .config import EXECUTORS

#: A top-level function of one unit (picklable by reference).
Work = Callable[[Any], Any]

RAY_EXTRA = "pip install 'kinkgrad[ray]'"


class ExecutorError(RuntimeError):
    """An executor could not start (e.g. no Ray cluster at the given address)."""


def ray_available() -> bool:
    """Whether the optional `ray` package is importable (the `kinkgrad[ray]` extra)."""
    return importlib.util.find_spec("ray") is not None


def _single_thread() -> None:
    # One thread per worker: the workers already use every core, and the numbers are
    # the same as in a local pool worker's.
    import torch

    torch.set_num_threads(1)


class Serial:
    """Units one after another in this process."""

    name = "serial"
    workers = 1

    def __enter__(self) -> Serial:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def map_unordered(self, fn: Work, units: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for i, unit in enumerate(units):
            yield i, fn(unit)


def _pool_init() -> None:
    # Ctrl-C and SIGTERM go to the driver, which terminates the pool; workers stay quiet.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _single_thread()


def _indexed(job: tuple[Work, int, Any]) -> tuple[int, Any]:
    fn, i, unit = job
    return i, fn(unit)


class ProcessPool:
    """Units in `jobs` spawned local worker processes (`--jobs N`)."""

    name = "process pool"

    def __init__(self, jobs: int) -> None:
        self.workers = jobs
        self._pool: Any = None

    def __enter__(self) -> ProcessPool:
        self._pool = mp.get_context("spawn").Pool(self.workers, initializer=_pool_init)
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if kind is None:
            self._pool.close()
        else:
            self._pool.terminate()  # interrupted or failed: stop the workers now
        self._pool.join()

    def map_unordered(self, fn: Work, units: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        yield from self._pool.imap_unordered(_indexed, [(fn, i, u) for i, u in enumerate(units)])


def _ray_call(fn: Work, unit: Any) -> Any:
    _single_thread()
    return fn(unit)


class RayExecutor:
    """Units as Ray tasks (one CPU each). Joins the cluster at `address` ("auto": the
    one `ray start` runs on this machine), or starts a local Ray with `num_cpus` CPUs.
    Ray is shut down on exit only if this executor started it."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        if not ray_available():
            raise ExecutorError(f"--executor ray needs the ray package: {RAY_EXTRA}")
        self.address, self.num_cpus = address, num_cpus
        self._started = False
        self.workers = num_cpus or 0

    def __enter__(self) -> RayExecutor:
        import ray

        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address:
                _reachable(self.address)
                kw["address"] = self.address
            else:
                kw["num_cpus"] = self.num_cpus
            # ray.init takes SIGTERM over (sys.exit, then an abort in its C++ core);
            # the study's own handler (save, stop the workers, exit 143) is put back.
            term = signal.getsignal(signal.SIGTERM)
            try:
                ray.init(**kw)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise ExecutorError(
                    f"--ray-address {self.address!r}: cannot join a Ray cluster: {e}"
                    if self.address
                    else f"cannot start a local Ray: {e}"
                ) from None
            finally:
                if term is not None and threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGTERM, term)
            self._started = True
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._started:
            import ray

            ray.shutdown()

    def map_unordered(self, fn: Work, units: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        import ray

        # Retries only on a worker that died (a node lost), never on an exception of fn.
        task = ray.remote(num_cpus=1, max_retries=2)(_ray_call)
        index = {task.remote(fn, u): i for i, u in enumerate(units)}
        pending = list(index)
        try:
            while pending:
                # A short timeout keeps the driver responsive to Ctrl-C and SIGTERM.
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                for ref in ready:
                    yield index[ref], ray.get(ref)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on (Ray itself retries for minutes)."""
    import socket

    host, sep, port = address.rpartition(":")
    if address in ("auto", "local") or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ExecutorError(
            f"--ray-address {address!r}: no Ray head answers there ({e.strerror or e}); "
            "start one with `ray start --head`"
        ) from None


def make(kind: str, jobs: int, address: str | None = None) -> Serial | ProcessPool | RayExecutor:
    """The executor for `--executor kind` with `jobs` local workers (Ray: the CPUs of a
    local Ray it starts; ignored when joining a cluster at `address`)."""
    if kind == "ray":
        return RayExecutor(address, num_cpus=None if address else jobs)
    if kind != "local":
        raise ValueError(f"executor: unknown value {kind!r}; allowed: {', '.join(EXECUTORS)}")
    return ProcessPool(jobs) if jobs > 1 else Serial()
