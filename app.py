"""Entry point: `python app.py` (OpenXLab runs this file). Reads settings, checks, starts engines, serves the UI.

Nothing happens at import; everything is in main().
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Mapping, Sequence

log = logging.getLogger("app")
A10_GIB = 22.5  # what an A10 offers (nvidia-smi: 23,028 MiB), the card OpenXLab lends


def configure_logging(level: str) -> None:
    """One logging setup for the whole process."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Gradio 6.17's queue route names a status code Starlette deprecated: one warning per request otherwise
    warnings.filterwarnings("ignore", message=".*HTTP_422_UNPROCESSABLE_ENTITY.*")


def planned_specs(cfg) -> list:
    """Model shapes for the plan: read from local directories when given, else the default models' shapes."""
    from model_loader.memory import planner  # noqa: PLC0415

    wanted = [("vision", cfg.enable_vision, cfg.vision_model), ("text", cfg.enable_text, cfg.text_model)]
    return [planner.expected_spec(kind, ref) for kind, enabled, ref in wanted if enabled]


def make_plan(cfg, gpu_mem_gib: float):
    """The plan for the configured models on the given (or the present) GPU; None when there is neither."""
    from model_loader.memory import planner  # noqa: PLC0415
    from model_loader.memory.gpu import gpu_memory  # noqa: PLC0415

    if gpu_mem_gib > 0:
        total = free = gpu_mem_gib * 1024
        used = 0.0
    else:
        mem = gpu_memory()
        if mem is None:
            return None
        total, free, used = mem.total_mib, mem.free_mib, mem.used_mib
    return planner.plan_for_config(cfg, planned_specs(cfg), total, free, used)


def run_check(cfg, env: Mapping[str, str], download: bool = False) -> int:
    """--check: resolve and validate both models (fetching nothing unless `download`), print the memory plan;
    0 when all is well, else 1. A model not downloaded yet is reported, not failed: it comes at the first start."""
    from model_loader.errors import AppError, NotDownloaded  # noqa: PLC0415
    from model_loader.memory import planner  # noqa: PLC0415
    from model_loader.weights.resolve import resolve_text, resolve_vision  # noqa: PLC0415

    ok = True
    for kind, enabled in (("text", cfg.enable_text), ("vision", cfg.enable_vision)):
        if not enabled:
            continue
        try:
            if kind == "text":
                r = resolve_text(cfg, env, log.info, quantize=_no_quantize(cfg), download_ok=download)
            else:
                r = resolve_vision(cfg, env, log.info, download_ok=download)
            print(f"[ok] {kind} model: {r.path} ({r.source})")
        except NotDownloaded as e:
            print(f"[--] {kind} model: {e.message}")
            print(f"       {e.hint}")
        except AppError as e:
            ok = False
            print(f"[FAIL] {kind} model: {e.message}")
            for p in getattr(e, "problems", []):
                print(f"       - {p}")
            if e.hint:
                print(f"       what to do: {e.hint}")
    # without a GPU (and no --gpu-mem), plan for the A10 (22.5 GiB) this app is made for
    gpu_gib = cfg.gpu_mem_gib or (0.0 if _has_gpu() else A10_GIB)
    if not cfg.gpu_mem_gib and gpu_gib == A10_GIB:
        print(f"[info] No NVIDIA GPU is visible: this plan is for an A10 ({A10_GIB} GiB), the card this app is made for;")
        print("       pass --gpu-mem GIB to plan for another card.")
    plan = make_plan(cfg, gpu_gib)
    if plan is not None:
        print(planner.format_plan(plan))
        ok = ok and plan.fits
    return 0 if ok else 1


def _has_gpu() -> bool:
    from model_loader.memory.gpu import gpu_memory  # noqa: PLC0415

    return gpu_memory() is not None


def _no_quantize(cfg):
    """--check never quantizes: it says where the fp16 model's 4-bit version is, or will be."""
    from model_loader.weights.quantize import awq_dir_for, source_identity  # noqa: PLC0415
    from model_loader.weights.validation import text_model_problems  # noqa: PLC0415

    def quantize(src, progress=None):
        name = src.repo.rsplit("/", 1)[-1] if src.repo else src.path.name
        dst = awq_dir_for(cfg.cache_path, name, source_identity(src.path, src.revision))
        if dst.is_dir() and not text_model_problems(dst, require_awq=True):
            print(f"[info] {src.path} is fp16; its 4-bit AWQ version, quantized earlier, is at {dst}")
            return dst
        print(f"[info] {src.path} is fp16: it will be quantized to 4-bit AWQ into {dst} at the first start")
        return src.path

    return quantize


def quantize_only(cfg, env: Mapping[str, str], push_repo: str | None) -> int:
    """--quantize-only: get the text model as 4-bit AWQ (quantizing it once), print where it is, optionally upload."""
    from model_loader.weights.publish import push_to_hub  # noqa: PLC0415
    from model_loader.weights.resolve import resolve_text  # noqa: PLC0415

    def say(message: str) -> None:
        print(message, flush=True)

    r = resolve_text(cfg, env, say, quantize=None if _has_gpu() else _needs_gpu, download_ok=True)
    print(f"4-bit AWQ model: {r.path}")
    if push_repo:
        calib = f"the local file {os.path.basename(cfg.calib_file)}" if cfg.calib_file else "wikitext2"
        url = push_to_hub(r.path, push_repo, env, source=r.repo or cfg.text_model, calib=calib)
        print(f"Uploaded to {url}")
        print(f"Deploy with it: APP_TEXT_AWQ_REPO={push_repo} (the app downloads it instead of quantizing)")
    return 0


def _needs_gpu(src, progress=None):
    from model_loader.errors import NoGPU  # noqa: PLC0415

    raise NoGPU(
        f"{src.path} is fp16, and quantizing it with lmdeploy's auto_awq needs an NVIDIA GPU; none is visible.",
        "Run --quantize-only on a machine with a GPU (any with 8 GB), then --push-to-hub and set APP_TEXT_AWQ_REPO.",
    )


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Parse settings, handle --check/--plan, then start the engines in the background and serve the UI."""
    env = dict(os.environ if env is None else env)
    from model_loader.config import from_args  # noqa: PLC0415
    from model_loader.errors import AppError, NoGPU  # noqa: PLC0415

    try:
        cfg, ns = from_args(sys.argv[1:] if argv is None else argv, env)
    except AppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level)
    log.info("settings: %s", cfg.redacted())
    if ns.push_to_hub and not ns.quantize_only:
        print("error: --push-to-hub goes with --quantize-only.", file=sys.stderr)
        return 2
    if ns.check:
        return run_check(cfg, env, download=ns.download)
    if ns.quantize_only:
        try:
            return quantize_only(cfg, env, ns.push_to_hub)
        except AppError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if ns.plan:
        from model_loader.memory import planner  # noqa: PLC0415

        plan = make_plan(cfg, cfg.gpu_mem_gib)
        if plan is None:
            print(f"No NVIDIA GPU found: pass --gpu-mem GIB (e.g. --gpu-mem {A10_GIB} for an A10).", file=sys.stderr)
            return 2
        print(planner.format_plan(plan))
        return 0 if plan.fits else 1
    try:
        if cfg.backend == "turbomind":
            plan = make_plan(cfg, cfg.gpu_mem_gib)
            if plan is None:
                raise NoGPU(
                    "No NVIDIA GPU is visible, and LMDeploy's TurboMind engine needs one.",
                    "Run on a machine with an NVIDIA GPU (OpenXLab: choose an A10), or serve the models "
                    "elsewhere with `lmdeploy serve api_server` and start this app with "
                    "--backend api_server --server-url URL.",
                )
            if not plan.fits:
                from model_loader.memory import planner  # noqa: PLC0415

                print(planner.format_plan(plan), file=sys.stderr)
                print("error: the models do not fit on this GPU; ways out are listed above.", file=sys.stderr)
                return 1
    except AppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return serve(cfg, env)


# lmdeploy turns tokens into text in Python, on its own thread, and keeps the interpreter for up to the switch
# interval each time (5 ms by default): whatever shares its interpreter (the web server's loop with
# --no-engine-process, the engine process's own loop and pipe otherwise; it is passed on there) then waits that long
# at every step. A shorter interval hands it back sooner (bench/results: first text at 32 users).
SWITCH_INTERVAL_S = 0.0005


def freeze_heap_after(startup: threading.Thread | None) -> None:
    """Once the engines are built, freeze the heap (model_loader.heap says why). Sessions opened later stay
    collectable; the few opened while the engines load are frozen with them, so their cyclic garbage (not the rest)
    stays until exit."""
    from model_loader.heap import freeze_long_lived  # noqa: PLC0415

    def freeze() -> None:
        if startup is not None:
            startup.join()
        log.info("%d objects left out of garbage collection from now on", freeze_long_lived())

    threading.Thread(target=freeze, name="freeze-heap", daemon=True).start()


def serve(cfg, env: Mapping[str, str]) -> int:
    """Start engines in the background and serve the UI at once."""
    from model_loader.startup import Startup  # noqa: PLC0415
    from ui.page import build_demo, launch_kwargs  # noqa: PLC0415

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    startup = Startup(cfg, env)
    freeze_heap_after(startup.start())
    demo, i18n = build_demo(startup.slots, cfg, startup.system_info)
    try:
        demo.launch(**launch_kwargs(cfg, i18n))  # returns when the server stops (Ctrl+C)
    finally:
        startup.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
