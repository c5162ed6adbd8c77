"""GPU probing through NVML: the device CUDA_VISIBLE_DEVICES names, nvidia-smi's "used", and no GPU at all."""

from __future__ import annotations

import sys
import types

from model_loader.memory.gpu import gpu_memory


def fake_nvml(devices: dict[str, tuple[str, int, int]]):
    """A stand-in pynvml module over {index-or-uuid: (name, total bytes, used bytes)}."""
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    m.NVMLError, m.nvmlMemory_v2 = NVMLError, 2
    m.nvmlInit = m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetHandleByIndex = lambda i: str(i)
    m.nvmlDeviceGetHandleByUUID = lambda u: u
    m.nvmlDeviceGetName = lambda h: devices[h][0]

    def info(h, version=None):
        name, total, used = devices[h]
        return types.SimpleNamespace(total=total, used=used, free=total - used - 500 * 2**20)

    m.nvmlDeviceGetMemoryInfo = info
    return m


def test_reads_the_device_cuda_visible_devices_names(monkeypatch):
    gib = 2**30
    devs = {
        "0": ("NVIDIA H100", 80 * gib, 1 * gib),
        "1": ("NVIDIA A10", 24 * gib, 2 * gib),
        "GPU-abc": ("NVIDIA L4", 24 * gib, 3 * gib),
    }
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devs))
    assert gpu_memory({}).name == "NVIDIA H100"
    m = gpu_memory({"CUDA_VISIBLE_DEVICES": "1,0"})
    assert (m.name, m.total_mib, m.used_mib) == ("NVIDIA A10", 24 * 1024, 2 * 1024)
    assert gpu_memory({"CUDA_VISIBLE_DEVICES": "GPU-abc"}).name == "NVIDIA L4"
    assert gpu_memory({"CUDA_VISIBLE_DEVICES": ""}) is None
    assert gpu_memory({"CUDA_VISIBLE_DEVICES": "-1"}) is None


def test_no_driver_means_no_gpu(monkeypatch):
    m = types.ModuleType("pynvml")

    def fail():
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    m.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", m)
    assert gpu_memory({}) is None
