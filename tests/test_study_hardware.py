"""The manifest records what decides rounding: CPU model and ISA, torch's kernel level,
BLAS / oneDNN, threads, device."""

from __future__ import annotations

import torch

from kinkgrad.study import hardware, results

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512_bf16 amx_tile amx_bf16 ht
processor\t: 1
model name\t: something else
flags\t\t: fpu
"""


def test_cpu_info_reads_model_and_rounding_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(CPUINFO)
    info = hardware.cpu_info(f)
    assert info["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["cpu_flags"] == sorted(
        [
            "sse4_1",
            "sse4_2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512_bf16",
            "amx_tile",
            "amx_bf16",
        ]
    )  # fpu, vme, ht: irrelevant to rounding, left out


def test_cpu_info_without_proc_still_answers(tmp_path):
    info = hardware.cpu_info(tmp_path / "absent")
    assert info["cpu_flags"] == [] and "cpu_model" in info


def test_describe_names_what_decides_rounding():
    info = hardware.describe()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["device"] == "cpu" and info["device_name"] == info["cpu_model"]
    show = torch.__config__.show()
    if "BLAS_INFO=" in show:
        assert info["blas"] and info["blas"] in show
    if torch.backends.mkldnn.is_available():
        assert info["onednn"] and info["onednn"] in show
    assert set(hardware.ROUNDING_FIELDS) <= set(info)
    other = {**info, "cpu_capability": "AVX2", "torch_threads": 1}
    assert set(hardware.differences(info, other)) == {"cpu_capability", "torch_threads"}


def test_environment_carries_the_hardware():
    env = results.environment()
    assert env["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
