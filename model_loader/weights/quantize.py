"""4-bit AWQ quantization of the fp16 InternLM2 with lmdeploy's own `auto_awq`, done once per source and cached.

The result lives under the cache directory, keyed by the source's identity (its hub revision; for a local folder,
the names, sizes and modification times of its files), so a changed source is quantized again and a read-only
source is fine. It is written to a hidden temporary folder and renamed only when complete and valid. The job runs
in a child process (model_loader.weights.awq_job) with a time limit, and dies with the app.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from model_loader.errors import (
    AppError,
    CalibrationDataUnavailable,
    QuantizationFailed,
    QuantizationOutOfMemory,
    WeightsInvalid,
)
from model_loader.weights import awq_job
from model_loader.weights.validation import ensure_valid, text_model_problems

log = logging.getLogger(__name__)

AWQ_SUFFIX = "awq-w4g128"
COPY_SUFFIXES = (".py", ".model", ".json", ".jinja", ".tiktoken")
CALIB_SAMPLES, CALIB_SEQLEN = 128, 2048
# An A10 quantizes the 1.8B model in about 5-10 minutes; a job still running after this is stuck.
TIMEOUT_S = 3600.0
ROOT = Path(__file__).resolve().parents[2]  # the project, so the child finds model_loader

Progress = Callable[[str], None]
Runner = Callable[[list[str], Progress], None]


def source_identity(path: Path, revision: str = "") -> str:
    """What makes a source the same one: its hub revision, else the names, sizes and mtimes of its files."""
    if revision:
        return f"revision:{revision}"
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue  # .git, .cache, download markers: not the model
        st = f.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "files:" + h.hexdigest()


def awq_dir_for(cache: Path, name: str, identity: str) -> Path:
    """Where the 4-bit model of one source identity is kept: <cache>/awq/<name>-awq-w4g128-<key>."""
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return cache / "awq" / f"{name}-{AWQ_SUFFIX}-{key}"


def copy_side_files(src: Path, dst: Path) -> None:
    """auto_awq writes weights and tokenizer; the remote-code and template files must come along."""
    for f in src.iterdir():
        if f.suffix in COPY_SUFFIXES and not (dst / f.name).exists() and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)


def num_layers(src: Path) -> int:
    """Decoder layers of the model at `src` (0 when unreadable), for progress messages."""
    try:
        return int(json.loads((src / "config.json").read_text(encoding="utf-8")).get("num_hidden_layers", 0))
    except (OSError, ValueError):
        return 0


def ensure_awq(
    src: Path,
    cache: Path,
    progress: Progress = log.info,
    *,
    name: str = "",
    revision: str = "",
    calib_file: str = "",
    run: Runner | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = TIMEOUT_S,
    device: str = "cuda",
    samples: int = CALIB_SAMPLES,
    seqlen: int = CALIB_SEQLEN,
) -> Path:
    """Return a validated AWQ copy of `src` under `cache`, quantizing it once per source identity.

    `device`, `samples` and `seqlen` are for tests and the GPU bench (the CPU runs the tiny model's job).
    """
    dst = awq_dir_for(cache, name or src.name, source_identity(src, revision))
    if dst.is_dir() and not text_model_problems(dst, require_awq=True):
        progress(f"Using the 4-bit model quantized earlier at {dst}")
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.partial-*"):  # an earlier run that died midway
        shutil.rmtree(stale, ignore_errors=True)
    work = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    cmd = awq_job.command(src, work, calib_file, samples, seqlen, device)
    data = f"the local file {calib_file}" if calib_file else "wikitext2 from the hub"
    progress(f"Quantizing {name or src.name} to 4-bit AWQ, calibrating on {data} (once; about 5-10 minutes on an A10) ...")
    log.info("running %s", " ".join(cmd))
    try:
        if run is not None:
            run(cmd, progress)
        else:
            run_job(cmd, progress, timeout_s=timeout_s, layers=num_layers(src), env=env, src=src)
        copy_side_files(src, work)
        for stats in work.glob("*_stats.pth"):  # calibration statistics, not part of the model
            stats.unlink()
        ensure_valid(text_model_problems(work, require_awq=True), work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(dst, ignore_errors=True)
    work.rename(dst)  # only a finished, validated result ever gets the final name
    progress(f"Quantized model saved at {dst}")
    return dst


# --- the child process ------------------------------------------------------------------------------------------

_children: set[subprocess.Popen] = set()
_atexit_registered = False


def _death_signal_setter() -> Callable[[], None] | None:
    """A preexec_fn that asks Linux to SIGKILL the child when the thread that started it dies (PR_SET_PDEATHSIG).

    libc is looked up here, in the parent: the child between fork and exec must not load libraries.
    """
    if not sys.platform.startswith("linux"):
        return None  # elsewhere the atexit handler still stops it when the app exits normally
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _kill_children() -> None:
    for p in list(_children):
        if p.poll() is None:
            p.kill()


def _track(p: subprocess.Popen) -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_kill_children)
        _atexit_registered = True
    _children.add(p)


_LAYER_CALIBRATED = re.compile(r"^model\.layers\.(\d+), samples")
_LAYER_SMOOTHED = re.compile(r"^model\.layers\.(\d+) smooth weight done")
_LAYER_PACKED = re.compile(r"^model\.layers\.(\d+)\.\S+ weight packed")


def progress_line(line: str, layers: int) -> str | None:
    """What to show for one line of auto_awq's output (None: nothing new)."""
    of = f"/{layers}" if layers else ""
    if line.startswith("Loading calibrate dataset"):
        return "Quantizing: loading the calibration text ..."
    for pattern, what in ((_LAYER_CALIBRATED, "calibrating"), (_LAYER_SMOOTHED, "smoothing"), (_LAYER_PACKED, "packing")):
        m = pattern.match(line)
        if m:
            return f"Quantizing: {what} layer {int(m.group(1)) + 1}{of}"
    return None


def job_error(
    returncode: int, lines: list[str], timed_out: bool, timeout_s: float, src: Path, endpoint: str, calib_file: str = ""
) -> AppError:
    """The named error for a failed job, from its `awq-job-error:` line, else from how it ended."""
    tail = " | ".join(lines[-5:])[-600:]
    if timed_out:
        return QuantizationFailed(
            f"Quantizing {src.name} took longer than {timeout_s / 60:.0f} minutes and was stopped.",
            "Pass a ready AWQ model (--text-awq-repo or a local AWQ folder), or quantize once elsewhere with "
            "`python app.py --quantize-only`.",
        )
    marked = [line for line in lines if line.startswith(awq_job.ERROR_MARK)]
    cause, _, detail = marked[-1][len(awq_job.ERROR_MARK) :].strip().partition(": ") if marked else ("", "", tail)
    if cause == "calib-data" and calib_file:
        return CalibrationDataUnavailable(
            f"The calibration file {calib_file} could not be read for 4-bit quantization: {detail}",
            "Pass a readable UTF-8 text file with --calib-file (APP_CALIB_FILE), or leave it empty for wikitext2.",
        )
    if cause == "calib-data":
        return CalibrationDataUnavailable(
            f"The calibration text for 4-bit quantization could not be loaded (wikitext2 from {endpoint}): {detail}",
            "Pass a local UTF-8 text file with --calib-file PATH (APP_CALIB_FILE), set HF_ENDPOINT to a reachable "
            "mirror (e.g. https://hf-mirror.com), or use a ready AWQ model (--text-awq-repo).",
        )
    if cause == "out-of-memory" or returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return QuantizationOutOfMemory(
            f"Quantizing {src.name} ran out of memory: {detail or 'the job was killed (the system ran out of RAM)'}",
            "Quantizing the 1.8B model needs about 6 GB of GPU memory and 8 GB of RAM: stop other GPU programs, or "
            "quantize once on a bigger machine (`python app.py --quantize-only --push-to-hub REPO`) and set "
            "APP_TEXT_AWQ_REPO.",
        )
    if cause == "model-files":
        return WeightsInvalid([f"transformers could not load it for quantization: {detail}"], str(src))
    if cause == "missing-package":
        return QuantizationFailed(
            f"A package that quantization needs is missing: {detail}",
            "Install the app's requirements: pip install -r requirements.txt",
        )
    return QuantizationFailed(
        f"lmdeploy auto_awq failed on {src} (exit {returncode}): {detail}",
        "See the log above for the full error, or pass a ready AWQ model (--text-awq-repo).",
    )


def run_job(
    cmd: list[str],
    progress: Progress,
    *,
    timeout_s: float = TIMEOUT_S,
    layers: int = 0,
    env: Mapping[str, str] | None = None,
    src: Path = Path("."),
) -> None:
    """Run the job, passing its progress on; raise the named error when it fails or overruns `timeout_s`."""
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), child_env.get("PYTHONPATH", "")]))
    child_env["PYTHONUNBUFFERED"] = "1"
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        env=child_env,
        preexec_fn=_death_signal_setter(),  # noqa: PLW1509 - only a prctl call between fork and exec
    )
    _track(p)
    timed_out = threading.Event()

    def overrun() -> None:
        timed_out.set()
        p.kill()

    timer = threading.Timer(timeout_s, overrun)
    timer.daemon = True
    timer.start()
    lines: collections.deque[str] = collections.deque(maxlen=200)
    last = ""
    try:
        for raw in p.stdout:
            line = raw.rstrip()
            if not line:
                continue
            lines.append(line)
            log.info("auto_awq: %s", line)
            shown = progress_line(line, layers)
            if shown and shown != last:
                progress(shown)
                last = shown
        p.wait()
    finally:
        timer.cancel()
        if p.poll() is None:
            p.kill()
            p.wait()
        _children.discard(p)
    if p.returncode or timed_out.is_set():
        endpoint = child_env.get("HF_ENDPOINT", "https://huggingface.co")
        calib = cmd[cmd.index("--calib-file") + 1] if "--calib-file" in cmd else ""
        raise job_error(p.returncode, list(lines), timed_out.is_set(), timeout_s, src, endpoint, calib)
