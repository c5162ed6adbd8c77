"""4-bit AWQ quantization of the fp16 InternLM2 with lmdeploy's own `auto_awq`, done once and cached."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from model_loader.errors import QuantizationFailed
from model_loader.weights.validation import ensure_valid, text_model_problems

log = logging.getLogger(__name__)

# lmdeploy 0.11.1 defaults to the 'ptb' calibration set, which no longer loads; wikitext2 does.
CALIB_DATASET = "wikitext2"
COPY_SUFFIXES = (".py", ".model", ".json", ".jinja", ".tiktoken")


def awq_dir_for(src: Path) -> Path:
    """The quantized model is cached beside its source: <src>-awq-w4g128."""
    return src.with_name(src.name + "-awq-w4g128")


def awq_command(src: Path, work_dir: Path) -> list[str]:
    """`lmdeploy lite auto_awq` with 4 bits, group 128 and the wikitext2 calibration set."""
    return [
        sys.executable,
        "-m",
        "lmdeploy",
        "lite",
        "auto_awq",
        str(src),
        "--work-dir",
        str(work_dir),
        "--w-bits",
        "4",
        "--w-group-size",
        "128",
        "--calib-dataset",
        CALIB_DATASET,
        "--calib-samples",
        "128",
        "--calib-seqlen",
        "2048",
        "--batch-size",
        "1",
    ]


def copy_side_files(src: Path, dst: Path) -> None:
    """auto_awq writes weights and tokenizer; the remote-code and template files must come along."""
    for f in src.iterdir():
        if f.suffix in COPY_SUFFIXES and not (dst / f.name).exists() and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)


def ensure_awq(src: Path, progress: Callable[[str], None] = log.info, run: Callable[[list[str]], None] | None = None) -> Path:
    """Return a validated AWQ copy of `src`, quantizing it once if the cache has none."""
    dst = awq_dir_for(src)
    if dst.is_dir() and not text_model_problems(dst, require_awq=True):
        progress(f"Using the 4-bit model quantized earlier at {dst}")
        return dst
    work = dst.with_name(dst.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    cmd = awq_command(src, work)
    progress(f"Quantizing {src.name} to 4-bit AWQ (once; about 5-10 minutes on an A10) ...")
    log.info("running %s", " ".join(cmd))
    try:
        (run or _run_streaming)(cmd, progress)
    except (subprocess.CalledProcessError, OSError) as e:
        shutil.rmtree(work, ignore_errors=True)
        raise QuantizationFailed(
            f"lmdeploy auto_awq failed on {src}: {e}", "Check GPU memory (quantizing needs ~6 GB) or pass a ready AWQ model."
        ) from e
    copy_side_files(src, work)
    ensure_valid(text_model_problems(work, require_awq=True), work)
    shutil.rmtree(dst, ignore_errors=True)
    work.rename(dst)  # only a finished, validated result ever gets the final name
    progress(f"Quantized model saved at {dst}")
    return dst


def _run_streaming(cmd: list[str], progress: Callable[[str], None]) -> None:
    """Run a command, passing its progress lines on, and fail on a non-zero exit."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as p:
        for line in p.stdout:
            line = line.rstrip()
            if line:
                log.info("auto_awq: %s", line)
                if "%" in line or "layer" in line.lower():
                    progress(f"Quantizing: {line[-120:]}")
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, cmd)
