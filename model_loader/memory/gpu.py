"""What the GPU has, through NVML (nvidia-ml-py), so that asking needs no CUDA context in this process."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)
MIB = 2**20


@dataclass(frozen=True)
class GpuMemory:
    """MiB as nvidia-smi reports them for the GPU the engines will use."""

    name: str
    total_mib: float
    used_mib: float
    free_mib: float


def visible_device(env: dict[str, str] | None = None) -> str:
    """The first device CUDA_VISIBLE_DEVICES names (an index or a GPU-/MIG- UUID); '0' when unset."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "0"
    first = visible.split(",")[0].strip()
    return first  # '' or '-1' hide every GPU


def gpu_memory(env: dict[str, str] | None = None) -> GpuMemory | None:
    """The memory of the GPU the engines will use, or None when there is no NVIDIA GPU (or no driver)."""
    device = visible_device(env)
    if device in ("", "-1"):
        return None
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no library, no driver, no GPU: all mean "none here"
        return None
    try:
        if device.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(device))
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(device)
        try:  # v2 counts the driver's reserve apart, as nvidia-smi does; the planner was fitted to that "used"
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        except (AttributeError, TypeError, pynvml.NVMLError):
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        return GpuMemory(name, mem.total / MIB, mem.used / MIB, mem.free / MIB)
    except Exception as e:  # noqa: BLE001
        log.warning("NVML could not read GPU %s: %s", device, e)
        return None
    finally:
        pynvml.nvmlShutdown()
