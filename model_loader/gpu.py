"""What the GPU has, through nvidia-smi, so that asking needs no CUDA context in this process."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuMemory:
    """MiB as nvidia-smi reports them for GPU 0."""

    name: str
    total_mib: float
    used_mib: float
    free_mib: float


def parse_smi(text: str) -> GpuMemory | None:
    """The first line of `nvidia-smi --query-gpu=name,memory.total,memory.used,memory.free --format=csv,...`."""
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            try:
                return GpuMemory(parts[0], float(parts[1]), float(parts[2]), float(parts[3]))
            except ValueError:
                return None
    return None


def gpu_memory() -> GpuMemory | None:
    """GPU 0's memory, or None when there is no NVIDIA GPU (or no driver)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,memory.free",
                              "--format=csv,noheader,nounits"], check=True, capture_output=True, text=True,
                             timeout=20).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return parse_smi(out)
