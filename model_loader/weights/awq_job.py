"""lmdeploy's `auto_awq` in a process of its own, calibrated on wikitext2 from the hub or on a local text file.

    python -m model_loader.weights.awq_job SRC WORK_DIR [--calib-file PATH] [--calib-samples N] [--calib-seqlen L]

lmdeploy's command line only takes dataset names, so this module calls `lmdeploy.lite.apis.auto_awq.auto_awq`
itself and, given a file, swaps calibrate's loader for one over that file. When it fails, its last line on stderr
is `awq-job-error: CAUSE: DETAIL` (CAUSE one of CAUSES), so the app names the cause instead of guessing from a
traceback. Nothing happens at import.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

ERROR_MARK = "awq-job-error:"
CAUSES = ("calib-data", "missing-package", "out-of-memory", "model-files", "other")
# lmdeploy 0.11.1 defaults to the 'ptb' calibration set, which no longer loads; wikitext2 does.
CALIB_DATASET = "wikitext2"


class JobError(Exception):
    """An error tagged with the stage it came from."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


@contextlib.contextmanager
def stage(cause: str) -> Iterator[None]:
    """Tag any exception raised inside with `cause` (out of memory and missing packages keep their own cause)."""
    try:
        yield
    except JobError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with its cause named
        raise JobError(cause_of(e, cause), f"{type(e).__name__}: {e}") from e


def cause_of(e: BaseException, default: str) -> str:
    """Out of memory and a missing package are named whatever stage they happen in."""
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError":
        return "out-of-memory"
    if isinstance(e, ModuleNotFoundError):
        return "missing-package"
    return default


def local_text_loader(path: str | Path, tokenizer, nsamples: int, seed: int, seqlen: int) -> tuple[list, None]:
    """`nsamples` windows of `seqlen` tokens from a UTF-8 text file, drawn as lmdeploy draws them from wikitext2.

    A text shorter than one window is repeated until it fills one.
    """
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError(f"{path} holds no text to calibrate on")
    if ids.shape[1] <= seqlen:
        ids = ids.repeat(1, seqlen // ids.shape[1] + 1)
    rng = random.Random(seed)
    loader = []
    for _ in range(nsamples):
        i = rng.randint(0, ids.shape[1] - seqlen)
        inp = ids[:, i : i + seqlen]
        tar = inp.clone()
        tar[:, :-1] = -100
        loader.append((inp, tar))
    return loader, None


def calib_loader(calib_file: str | None, original: Callable) -> Callable:
    """The loader calibrate() calls: lmdeploy's own (wikitext2 from the hub) or one over `calib_file`."""

    def load(name, tokenizer, nsamples=128, seed=0, seqlen=2048):
        with stage("calib-data"):
            if calib_file:
                return local_text_loader(calib_file, tokenizer, nsamples, seed, seqlen)
            return original(name, tokenizer, nsamples=nsamples, seed=seed, seqlen=seqlen)

    return load


class _TaggedLoader:
    """Wraps a `from_pretrained` class so that its failures name the model files."""

    def __init__(self, cls) -> None:
        self._cls = cls

    def from_pretrained(self, *args, **kwargs):
        with stage("model-files"):
            return self._cls.from_pretrained(*args, **kwargs)


def run(src: str, work_dir: str, calib_file: str | None, samples: int, seqlen: int, device: str) -> None:
    """Calibrate and quantize `src` into `work_dir` with lmdeploy's own code, 4 bits, group 128."""
    with stage("missing-package"):
        from lmdeploy.lite.apis import auto_awq as auto_awq_mod  # noqa: PLC0415
        from lmdeploy.lite.apis import calibrate as calibrate_mod  # noqa: PLC0415

    calibrate_mod.get_calib_loaders = calib_loader(calib_file, calibrate_mod.get_calib_loaders)
    calibrate_mod.AutoTokenizer = _TaggedLoader(calibrate_mod.AutoTokenizer)
    load_model = calibrate_mod.load_hf_from_pretrained

    def load_hf(*args, **kwargs):
        with stage("model-files"):
            return load_model(*args, **kwargs)

    calibrate_mod.load_hf_from_pretrained = load_hf
    with stage("other"):
        auto_awq_mod.auto_awq(
            src,
            work_dir=work_dir,
            calib_dataset=CALIB_DATASET,
            calib_samples=samples,
            calib_seqlen=seqlen,
            batch_size=1,
            w_bits=4,
            w_group_size=128,
            device=device,
        )


def command(
    src: Path, work_dir: Path, calib_file: str = "", samples: int = 128, seqlen: int = 2048, device: str = "cuda"
) -> list[str]:
    """The command line that runs this module on `src`."""
    cmd = [sys.executable, "-m", "model_loader.weights.awq_job", str(src), str(work_dir)]
    cmd += ["--calib-samples", str(samples), "--calib-seqlen", str(seqlen), "--device", device]
    if calib_file:
        cmd += ["--calib-file", calib_file]
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("work_dir")
    p.add_argument("--calib-file", default="")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(a.src, a.work_dir, a.calib_file or None, a.calib_samples, a.calib_seqlen, a.device)
    except JobError as e:
        traceback.print_exc()
        print(f"{ERROR_MARK} {e.cause}: {str(e)[:2000]}", file=sys.stderr, flush=True)
        return 3
    except BaseException as e:  # noqa: BLE001 - whatever else ends the job is named too
        traceback.print_exc()
        print(f"{ERROR_MARK} {cause_of(e, 'other')}: {type(e).__name__}: {str(e)[:2000]}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
