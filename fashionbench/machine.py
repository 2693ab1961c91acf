"""What a result ran on, recorded beside every training metric."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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
