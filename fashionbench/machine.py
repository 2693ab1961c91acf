"""What a result ran on, recorded beside every training metric."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The widest vector extension a CPU has, in the order that decides its training speed here:
# AMX and AVX512-BF16 run bf16 natively (precision auto trains in bf16 there), AVX512 and
# AVX2 do fp32 only. Two CPUs that both call themselves "AMD EPYC" differ by 2.5x.
_VECTOR_FLAGS = (("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"),
                 ("avx2", "AVX2"))


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_model(info: dict[str, str] | None = None) -> str:
    """The CPU's model name, family/model numbers and widest vector extension, e.g.
    "AMD EPYC (family 25 model 17, AVX512-BF16)": the name alone does not tell an AVX2 EPYC
    from an AVX512-BF16 one."""
    info = _cpuinfo() if info is None else info
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    vector = next((label for flag, label in _VECTOR_FLAGS if flag in flags), None)
    numbered = {"cpu family", "model"} <= info.keys()
    details = [f"family {info['cpu family']} model {info['model']}"] if numbered else []
    details += [vector] if vector else []
    return f"{name} ({', '.join(details)})" if details else name


def describe(device: str = "cpu") -> dict:
    """device, hardware model and thread count of this process, for a metrics file."""
    if device.startswith("cuda"):
        import torch

        return {"device": "cuda", "hardware": torch.cuda.get_device_name(0), "threads": 0}
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        pass
    return {"device": device, "hardware": cpu_model(), "threads": threads}
