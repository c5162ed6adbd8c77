"""Entry point: `python app.py` (OpenXLab runs this file). Reads settings, checks, starts engines, serves the UI.

Nothing happens at import; everything is in main().
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger("app")


def configure_logging(level: str) -> None:
    """One logging setup for the whole process."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def planned_specs(cfg) -> list:
    """Model shapes for the plan: read from local directories when given, else the default models' shapes."""
    from model_loader.memory import planner
    from model_loader.weights import sources  # noqa: PLC0415

    specs = []
    if cfg.enable_vision:
        local = sources.is_local(cfg.vision_model) and os.path.isfile(os.path.join(cfg.vision_model, "config.json"))
        specs.append(
            planner.spec_from_path(cfg.vision_model, os.path.basename(cfg.vision_model)) if local else planner.LLAVA_1_5_7B
        )
    if cfg.enable_text:
        local = sources.is_local(cfg.text_model) and os.path.isfile(os.path.join(cfg.text_model, "config.json"))
        spec = planner.spec_from_path(cfg.text_model, os.path.basename(cfg.text_model)) if local else None
        if spec is None or spec.weights_mib > planner.INTERNLM2_1_8B_AWQ.weights_mib * 1.5:
            spec = planner.INTERNLM2_1_8B_AWQ  # an fp16 source is served after 4-bit quantization
        specs.append(spec)
    return specs


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


def run_check(cfg, env: Mapping[str, str]) -> int:
    """--check: resolve and validate both models, print the memory plan; 0 when all is well, else 1."""
    from model_loader.errors import AppError  # noqa: PLC0415
    from model_loader.memory import planner  # noqa: PLC0415
    from model_loader.weights.resolve import resolve_text, resolve_vision  # noqa: PLC0415

    ok = True
    for kind, enabled, resolve in (("text", cfg.enable_text, resolve_text), ("vision", cfg.enable_vision, resolve_vision)):
        if not enabled:
            continue
        try:
            if kind == "text":
                r = resolve(cfg, env, log.info, quantize=_no_quantize)
            else:
                r = resolve(cfg, env, log.info)
            print(f"[ok] {kind} model: {r.path} ({r.source})")
        except AppError as e:
            ok = False
            print(f"[FAIL] {kind} model: {e.message}")
            for p in getattr(e, "problems", []):
                print(f"       - {p}")
            if e.hint:
                print(f"       what to do: {e.hint}")
    # without a GPU (and no --gpu-mem), plan for the 24 GB card this app is made for
    gpu_gib = cfg.gpu_mem_gib or (0.0 if _has_gpu() else 24.0)
    plan = make_plan(cfg, gpu_gib)
    if plan is not None:
        print(planner.format_plan(plan))
        ok = ok and plan.fits
    return 0 if ok else 1


def _has_gpu() -> bool:
    from model_loader.memory.gpu import gpu_memory  # noqa: PLC0415

    return gpu_memory() is not None


def _no_quantize(src, progress=None):
    """--check never quantizes: it reports that the fp16 model would be quantized at start-up."""
    from model_loader.weights.quantize import awq_dir_for  # noqa: PLC0415

    dst = awq_dir_for(src)
    print(f"[info] {src} is fp16: it will be quantized to 4-bit AWQ into {dst} at the first start")
    return src


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
    if ns.check:
        return run_check(cfg, env)
    if ns.plan:
        from model_loader.memory import planner  # noqa: PLC0415

        plan = make_plan(cfg, cfg.gpu_mem_gib)
        if plan is None:
            print("No NVIDIA GPU found: pass --gpu-mem GIB (e.g. --gpu-mem 24 for an A10).", file=sys.stderr)
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


def serve(cfg, env: Mapping[str, str]) -> int:
    """Start engines in the background and serve the UI at once."""
    from model_loader.startup import Startup  # noqa: PLC0415
    from ui.page import build_demo, launch_kwargs  # noqa: PLC0415

    startup = Startup(cfg, env)
    startup.start()
    demo, i18n = build_demo(startup.slots, cfg, startup.system_info)
    demo.launch(**launch_kwargs(cfg, i18n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
