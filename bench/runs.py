"""Helpers shared by the GPU scripts: synthetic checkpoints, GPU memory, a ballast, results files, percentiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from model_loader.memory.gpu import gpu_memory

MODELS = Path(os.environ.get("BENCH_MODELS", "/tmp/m"))
TEXT = MODELS / "internlm2-chat-1_8b-awq"
VISION = MODELS / "llava-1.5-7b-hf"
OUT = Path(os.environ.get("OUT", "bench/out"))


def ensure_checkpoints() -> dict:
    """Full-size synthetic checkpoints from the project's own writer (skipped when already there)."""
    from tests.synth import write_internlm2, write_llava

    took = {}
    for path, write in ((TEXT, lambda: write_internlm2(TEXT, "full", "awq")), (VISION, lambda: write_llava(VISION))):
        if not (path / "config.json").is_file():
            t0 = time.perf_counter()
            write()
            took[path.name] = round(time.perf_counter() - t0, 1)
    return took


def as_the_app_builds(cfg):
    """`cfg` as the app's start-up builds its engines on this GPU: both models planned, "auto" KV resolved by that
    plan (the raw references build the text engine with exactly the app's engine config)."""
    from model_loader.memory import planner  # noqa: PLC0415

    mem = gpu_memory()
    known = ((VISION, planner.LLAVA_1_5_7B), (TEXT, planner.INTERNLM2_1_8B_AWQ))  # the checkpoints, or their shapes
    specs = [planner.spec_from_path(p, p.name) if (p / "config.json").is_file() else spec for p, spec in known]
    plan = planner.plan_for_config(cfg, specs, mem.total_mib, mem.free_mib, mem.used_mib) if mem else None
    return planner.engine_config(cfg, plan)


def host(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The host's CPU model and count: H100 hosts differ in CPU, where the app spends its time (docs/throughput.md)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return {"cpu": None, "cpus": None}
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return {"cpu": models[0] if models else None, "cpus": sum(line.startswith("processor") for line in lines) or None}


def used_mib() -> float:
    m = gpu_memory()
    return m.used_mib if m else 0.0


def save(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(data, indent=1, default=str))
    print("RESULT", name, json.dumps(data, default=str)[:3000], flush=True)


@contextmanager
def ballast(free_gib: float = 22.5):
    """Another process holds all but `free_gib` of the GPU while the block runs; yields what it reported."""
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.ballast", str(free_gib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        line = p.stdout.readline()
        if not line.startswith("BALLAST "):
            raise RuntimeError(f"the ballast did not start: {line!r}")
        info = json.loads(line[len("BALLAST ") :])
        mem = gpu_memory()
        info["nvml_free_mib"] = mem.free_mib if mem else None
        yield info
    finally:
        p.stdin.close()
        p.wait(60)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def engine_processes(pid: int) -> list[int]:
    """The app's engine process (--engine-process), if it has one: its child started by multiprocessing's spawn."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    out = []
    for k in kids:
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(int(k))
        except OSError:
            pass
    return out


def stop_app(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """End a launched app and wait until its engine process has gone too (it exits once the app's pipe closes), so
    the next measurement finds the GPU free."""
    children = engine_processes(proc.pid)
    proc.terminate()
    proc.wait(timeout_s)
    end = time.monotonic() + timeout_s
    while any(os.path.exists(f"/proc/{c}") and _running(c) for c in children) and time.monotonic() < end:
        time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
