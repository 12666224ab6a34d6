"""The hardware and libraries that decide how floating-point sums are rounded.

Exact zeros at a kink come from rounding cancellation or underflow, so how often they
occur depends on the summation order of matrix products and reductions, which PyTorch
picks per CPU instruction set (AVX2, AVX-512, AMX), BLAS / oneDNN build, thread count
and GPU. Two runs with the same settings can differ bitwise on machines that differ in
any of these; the manifest records them so that a rerun elsewhere can tell why.

>>> info = describe()
>>> {"cpu_model", "cpu_flags", "cpu_capability", "blas", "torch_threads"} <= set(info)
True
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

#: /proc/cpuinfo flags that change which kernels (and so which summation order and
#: fused rounding) PyTorch and its BLAS use.
ROUNDING_FLAGS = re.compile(
    r"^(sse4_1|sse4_2|avx|avx2|fma|f16c|avx512\w*|amx\w*|avx_vnni\w*|avx_ne_convert|"
    r"asimd\w*|sve\w*|fphp|bf16|i8mm)$"
)


def cpu_info(path: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU model name and the rounding-relevant ISA flags of the first CPU listed in
    `path` (Linux); model from `platform.processor()` and no flags elsewhere."""
    model, flags = None, []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip() or None
        elif name in ("flags", "features") and not flags:
            flags = sorted({f for f in value.split() if ROUNDING_FLAGS.match(f)})
        if model is not None and flags:
            break
    return {"cpu_model": model or platform.processor() or None, "cpu_flags": flags}


def _torch_config() -> dict[str, Any]:
    """BLAS, LAPACK and oneDNN (MKL-DNN) as torch was built with, and its threading."""
    import torch

    show = torch.__config__.show()

    def line(pattern: str) -> str | None:
        m = re.search(pattern, show, re.MULTILINE)
        return m.group(1).strip() if m else None

    parallel = torch.__config__.parallel_info()
    par = lambda pattern: m.group(1).strip() if (m := re.search(pattern, parallel)) else None
    return {
        "blas": line(r"BLAS_INFO=([^,\n]+)"),
        "lapack": line(r"LAPACK_INFO=([^,\n]+)"),
        "mkl": line(r"^\s*-\s*(Intel\(R\) (?:oneAPI )?Math Kernel Library[^\n]*)"),
        "onednn": line(r"^\s*-\s*(Intel\(R\) MKL-DNN[^\n]*|oneDNN[^\n]*)"),
        "openmp": line(r"^\s*-\s*(OpenMP [^\n]*)"),
        "parallel_backend": par(r"ATen parallel backend: ([^\n]+)"),
        "mkl_available": bool(torch.backends.mkl.is_available()),
        "mkldnn_available": bool(torch.backends.mkldnn.is_available()),
    }


def describe(device: str = "cpu") -> dict[str, Any]:
    """A JSON-able dict of what decides rounding on this machine: CPU model and ISA
    flags, `torch.backends.cpu.get_cpu_capability()` (the kernels PyTorch dispatches
    to), BLAS / oneDNN / OpenMP builds, thread counts and, for `device="cuda"`, the GPU.

    Arguments:
        device: "cpu" or "cuda" (the study's `--device`).
    Returns:
        dict with keys cpu_model, cpu_flags, cpu_capability, machine, blas, lapack, mkl,
        onednn, openmp, parallel_backend, mkl_available, mkldnn_available,
        torch_threads, torch_interop_threads, omp_num_threads, mkl_num_threads,
        cpu_count, device, device_name (and cuda/cudnn versions on cuda).
    """
    import torch

    info: dict[str, Any] = {**cpu_info(), "machine": platform.machine()}
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch or an exotic build: record that it is unknown
        info["cpu_capability"] = None
    info.update(_torch_config())
    info.update(
        {
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "mkl_num_threads": os.environ.get("MKL_NUM_THREADS"),
            "cpu_count": os.cpu_count(),
            "device": device,
            "device_name": info["cpu_model"],
        }
    )
    if device == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return info


#: Fields that, when they differ between two manifests, can explain bitwise differences.
ROUNDING_FIELDS = (
    "cpu_model",
    "cpu_flags",
    "cpu_capability",
    "blas",
    "onednn",
    "torch_threads",
    "device_name",
)


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The rounding-relevant fields in which two `describe()` results differ."""
    return {k: (a.get(k), b.get(k)) for k in ROUNDING_FIELDS if a.get(k) != b.get(k)}
