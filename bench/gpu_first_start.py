"""The first start for real, on the GPU machine: quantize the fp16 InternLM2 with lmdeploy's own auto_awq through
the app's start-up path, serve it on TurboMind, and the api_server backend's first request.

    python -m bench.gpu_first_start --mode awq     whole card: write the full-size fp16 InternLM2-Chat-1.8B (with
                                                   its modeling code), Startup with --text-model on it and
                                                   --calib-file (16 x 512 tokens), answer; a second resolve must
                                                   not quantize again
    python -m bench.gpu_first_start --mode a10     beside a ballast that leaves 22.5 GiB free (an A10): quantize
                                                   again (own cache), LLaVA's "download" held back until the Chat
                                                   tab answers, then both answer; memory against the plan
    python -m bench.gpu_first_start --mode api     `lmdeploy serve api_server` on the AWQ model (port 23333), the
                                                   app's ApiServerEngine: its FIRST request, then 16 and 32 users
                                                   (256 new tokens, ignore_eos). Needs the app kit (openai client).

Each mode finishes in a few minutes and writes $OUT/first_start-<mode>.json (OUT defaults to bench/out); one failed
measurement is recorded and the rest go on. Checkpoints and caches live under /tmp (kept while the machine is warm).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

from bench.runs import save

MODELS = Path(os.environ.get("BENCH_MODELS", "/tmp/m"))
FP16 = MODELS / "internlm2-chat-1_8b"
LLAVA = MODELS / "llava-1.5-7b-hf"
SYNTH_AWQ = MODELS / "internlm2-chat-1_8b-awq"
CALIB = MODELS / "calib.txt"
CACHE = Path("/tmp/first-start-cache")
CACHE_A10 = Path("/tmp/first-start-cache-a10")
PORT = 23333
R: dict = {}  # the results, saved after every step
KEEP: dict = {}  # what must outlive a step (the ballast), never saved


def step(name: str):
    """Run one measurement; on failure record the error and go on."""

    def deco(fn):
        @functools.wraps(fn)
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                R[name] = fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - record it, keep measuring
                traceback.print_exc()
                R[name] = {"error": f"{type(e).__name__}: {e}"[:800]}
            R.setdefault("step_s", {})[name] = round(time.perf_counter() - t0, 1)
            save(f"first_start-{R['mode']}.json", R)
            return R[name]

        return run

    return deco


class PeakMemory:
    """Samples the GPU's used memory (nvidia-smi's figure, every process) every 50 ms; `peak_mib` is the highest."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        while not self._stop.is_set():
            try:
                used = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2).used
            except Exception:  # noqa: BLE001
                used = pynvml.nvmlDeviceGetMemoryInfo(h).used
            self.peak_mib = max(self.peak_mib, used / 2**20)
            time.sleep(0.05)
        pynvml.nvmlShutdown()

    def __enter__(self) -> PeakMemory:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(2)


def used_mib() -> float:
    from model_loader.memory.gpu import gpu_memory  # noqa: PLC0415

    m = gpu_memory()
    return round(m.used_mib) if m else 0.0


def folder_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


@step("checkpoints")
def write_checkpoints(llava: bool = False) -> dict:
    """Full-size synthetic fp16 InternLM2 (with the modeling module), a calibration text, optionally LLaVA."""
    from tests.synth import _CORPUS, write_internlm2, write_llava  # noqa: PLC0415

    took = {}
    if not (FP16 / "config.json").is_file():
        t0 = time.perf_counter()
        write_internlm2(FP16, "full", "fp16")
        took["fp16_s"] = round(time.perf_counter() - t0, 1)
    if llava and not (LLAVA / "config.json").is_file():
        t0 = time.perf_counter()
        write_llava(LLAVA, "full")
        took["llava_s"] = round(time.perf_counter() - t0, 1)
    if not CALIB.is_file():
        CALIB.write_text("\n".join(_CORPUS * 400), encoding="utf-8")
    took["fp16_mib"] = folder_mib(FP16)
    return took


def quick_calibration(samples: int, seqlen: int) -> None:
    """The app calibrates on 128 x 2048 tokens; the bench on fewer, through the same code."""
    from model_loader.weights import quantize, resolve  # noqa: PLC0415

    resolve.ensure_awq = functools.partial(quantize.ensure_awq, samples=samples, seqlen=seqlen)


async def ask(engine, sid: int, text: str, n: int = 64, ignore_eos: bool = True):
    """One reply through the engine seam: (text, Stats)."""
    from model_loader.engines.seam import Delta, GenSettings, Stats  # noqa: PLC0415

    out, stats = "", None
    async for item in engine.stream(
        sid, [{"role": "user", "content": text}], GenSettings(max_new_tokens=n, ignore_eos=ignore_eos)
    ):
        if isinstance(item, Delta):
            out += item.text
        elif isinstance(item, Stats):
            stats = item
    return out, stats


def stats_dict(s) -> dict:
    if s is None:
        return {"stats": None}
    return {
        "finish": s.finish_reason,
        "error": s.error,
        "in": s.input_tokens,
        "out": s.output_tokens,
        "ttft_s": round(s.ttft_s, 3),
    }


@step("first_start")
def first_start(cache: Path, vision: bool = False) -> dict:
    """`python app.py --text-model FP16 --calib-file CALIB --cache-dir CACHE` as Startup runs it (UI aside)."""
    from model_loader.config import AppConfig  # noqa: PLC0415
    from model_loader.memory import planner  # noqa: PLC0415
    from model_loader.startup import Startup  # noqa: PLC0415

    cfg = AppConfig(
        text_model=str(FP16),
        vision_model=str(LLAVA),
        enable_vision=vision,
        calib_file=str(CALIB),
        cache_dir=str(cache),
    )
    said: list[tuple[float, str, str]] = []
    st = Startup(cfg, dict(os.environ))
    t0 = time.perf_counter()
    for kind, slot in st.slots.items():  # record what the banner said, with the time
        orig = slot.say
        slot.say = lambda m, k=kind, o=orig: (said.append((round(time.perf_counter() - t0, 1), k, m)), o(m))[-1]
    r: dict = {"used_before_mib": used_mib()}
    with PeakMemory() as peak:
        th = st.start()
        th.join(600)
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    r["peak_gpu_mib"] = round(peak.peak_mib)
    r["used_after_mib"] = used_mib()
    r["slots"] = {
        k: {"state": s.state, "message": s.message[:400], "used_after_mib": s.used_mib_after} for k, s in st.slots.items()
    }
    r["ratios"] = st.ratios
    if st.plan:
        r["plan"] = planner.format_plan(st.plan)
        r["planned_used_after_mib"] = round(st.plan.used_after(len(st.plan.engines) - 1))
        r["measured_vs_plan"] = round(r["used_after_mib"] / r["planned_used_after_mib"] - 1, 4)
    r["banner"] = [m for m in said if "Quantiz" in m[2] or "Loading" in m[2] or "Ready" in m[2]][:60]
    awq = [p for p in (cache / "awq").iterdir() if p.is_dir() and not p.name.startswith(".")] if (cache / "awq").is_dir() else []
    r["awq_dirs"] = [str(p) for p in awq]
    r["awq_mib"] = folder_mib(awq[0]) if awq else None
    text = st.slots["text"].engine
    if text is not None:
        reply, stats = asyncio.run(ask(text, 1, "Please introduce yourself.", 64, ignore_eos=False))
        r["answer"] = {"text": reply[:200], **stats_dict(stats), "engine_source": text.info.source}
    return r


@step("second_resolve")
def second_resolve(cache: Path) -> dict:
    """A second start resolves the same fp16 folder: the cached 4-bit model, no quantization."""
    from model_loader.config import AppConfig  # noqa: PLC0415
    from model_loader.weights.resolve import resolve_text  # noqa: PLC0415

    said: list[str] = []
    t0 = time.perf_counter()
    r = resolve_text(AppConfig(text_model=str(FP16), calib_file=str(CALIB), cache_dir=str(cache)), dict(os.environ), said.append)
    return {
        "s": round(time.perf_counter() - t0, 2),
        "path": str(r.path),
        "source": r.source,
        "quantized_again": any(m.startswith("Quantizing") for m in said),
        "messages": said,
    }


@step("ballast")
def ballast(free_gib: float = 22.5) -> dict:
    """Allocate GPU memory so that `free_gib` stay free, as on OpenXLab's A10."""
    import torch  # noqa: PLC0415

    free, _ = torch.cuda.mem_get_info()
    KEEP["ballast"] = torch.empty(int(free - free_gib * 2**30), dtype=torch.uint8, device="cuda")
    from model_loader.memory.gpu import gpu_memory  # noqa: PLC0415

    return {"free_gib": free_gib, "free_mib_smi": round(gpu_memory().free_mib)}


@step("early_chat")
def early_chat(cache: Path, hold_s: float = 15.0) -> dict:
    """LLaVA's download held back until the Chat tab answers (then `hold_s` more): chat first, then both."""
    from model_loader.config import AppConfig  # noqa: PLC0415
    from model_loader.memory import planner  # noqa: PLC0415
    from model_loader.startup import Startup  # noqa: PLC0415
    from model_loader.weights import resolve  # noqa: PLC0415

    real_vision = resolve.resolve_vision
    cfg = AppConfig(text_model=str(FP16), vision_model=str(LLAVA), calib_file=str(CALIB), cache_dir=str(cache))
    st = Startup(cfg, dict(os.environ))
    text_ready = threading.Event()

    def slow_vision(c, env, progress=None, **kw):
        for pct in range(0, 100, 5):
            if text_ready.is_set():
                break
            progress(f"Downloading llava-1.5-7b-hf: {pct}% (held back by the bench)")
            text_ready.wait(10)
        time.sleep(hold_s)
        return real_vision(c, env, progress, **kw)

    resolve.resolve_vision = slow_vision
    r: dict = {}
    t0 = time.perf_counter()
    with PeakMemory() as peak:
        th = st.start()
        while not st.slots["text"].ready and th.is_alive() and time.perf_counter() - t0 < 400:
            time.sleep(0.1)
        r["text_ready_s"] = round(time.perf_counter() - t0, 1)
        r["vision_banner_then"] = f"{st.slots['vision'].state}: {st.slots['vision'].message}"
        if st.slots["text"].ready:
            reply, stats = asyncio.run(ask(st.slots["text"].engine, 1, "Hello, who are you?", 64))
            r["text_answer_while_vision_downloads"] = {"text": reply[:120], **stats_dict(stats)}
            r["vision_ready_while_text_answered"] = st.slots["vision"].ready
        text_ready.set()
        th.join(400)
    resolve.resolve_vision = real_vision
    r["both_ready_s"] = round(time.perf_counter() - t0, 1)
    r["peak_gpu_mib"] = round(peak.peak_mib)
    r["slots"] = {
        k: {"state": s.state, "message": s.message[:400], "used_after_mib": s.used_mib_after} for k, s in st.slots.items()
    }
    r["ratios"] = st.ratios
    r["used_after_mib"] = used_mib()
    if st.plan:
        r["plan"] = planner.format_plan(st.plan)
        r["planned_used_after_mib"] = round(st.plan.used_after(len(st.plan.engines) - 1))
        r["measured_vs_plan"] = round(r["used_after_mib"] / r["planned_used_after_mib"] - 1, 4)
        r["within_5pct"] = abs(r["measured_vs_plan"]) <= 0.05
    if st.slots["vision"].ready:
        from PIL import Image  # noqa: PLC0415

        from model_loader.engines.seam import GenSettings, Stats  # noqa: PLC0415

        async def image_question():
            img = Image.new("RGB", (640, 480), (10, 200, 30))
            msg = [
                {"role": "user", "content": [{"type": "text", "text": "What is in this image?"}, {"type": "image", "image": img}]}
            ]
            async for item in st.slots["vision"].engine.stream(2, msg, GenSettings(max_new_tokens=32, ignore_eos=True)):
                if isinstance(item, Stats):
                    return item

        r["vision_answer"] = stats_dict(asyncio.run(image_question()))
        reply, stats = asyncio.run(ask(st.slots["text"].engine, 3, "And now?", 32))
        r["text_answer_after_both"] = stats_dict(stats)
    return r


def awq_model() -> Path:
    """The AWQ model the awq mode wrote, else a synthetic AWQ checkpoint."""
    found = sorted((CACHE / "awq").glob("internlm2-chat-1_8b-awq-w4g128-*")) if (CACHE / "awq").is_dir() else []
    if found:
        return found[0]
    if not (SYNTH_AWQ / "config.json").is_file():
        from tests.synth import write_internlm2  # noqa: PLC0415

        write_internlm2(SYNTH_AWQ, "full", "awq")
    return SYNTH_AWQ


@step("api_server")
def api_server() -> dict:
    """A real `lmdeploy serve api_server`; the app's ApiServerEngine connects under asyncio.run as Startup does,
    then its FIRST request runs on another loop (as Gradio's), then 16 and 32 users."""
    from model_loader.config import AppConfig  # noqa: PLC0415
    from model_loader.startup import Startup  # noqa: PLC0415

    model = awq_model()
    r: dict = {"model": str(model)}
    cmd = [sys.executable, "-m", "lmdeploy", "serve", "api_server", str(model), "--model-format", "awq"]
    cmd += ["--server-port", str(PORT), "--cache-max-entry-count", "0.4", "--max-batch-size", "64", "--log-level", "WARNING"]
    log = open("/tmp/api_server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{PORT}"
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 240 and server.poll() is None:
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as resp:
                    r["models"] = [m["id"] for m in json.load(resp)["data"]]
                    break
            except OSError:
                time.sleep(1)
        r["server_up_s"] = round(time.perf_counter() - t0, 1)
        if "models" not in r:
            r["server_log_tail"] = Path("/tmp/api_server.log").read_text()[-3000:]
            raise RuntimeError("api_server did not come up")
        st = Startup(AppConfig(backend="api_server", text_server_url=url, enable_vision=False), {})
        st.build_all()  # connect() under asyncio.run, as the app does
        eng = st.slots["text"].engine
        r["connect"] = st.slots["text"].message
        if eng is None:
            raise RuntimeError(st.slots["text"].message)

        async def users(n: int) -> dict:
            t = time.perf_counter()
            res = await asyncio.gather(*[ask(eng, 1000 + i, f"Tell me a story number {i}.", 256) for i in range(n)])
            wall = time.perf_counter() - t
            stats = [s for _, s in res]
            errors = [s.error for s in stats if s is None or s.finish_reason == "error"]
            out = sum(s.output_tokens for s in stats if s)
            return {
                "users": n,
                "wall_s": round(wall, 2),
                "tok_s": round(out / wall, 1),
                "errors": errors[:5],
                "n_errors": len(errors),
                "finish": sorted({s.finish_reason for s in stats if s}),
                "ttft_p50_s": round(sorted(s.ttft_s for s in stats if s)[len(stats) // 2], 3),
            }

        def on_gradio_like_loop(coro_fn):
            box: dict = {}
            th = threading.Thread(target=lambda: box.update(v=asyncio.run(coro_fn())))
            th.start()
            th.join(300)
            return box.get("v")

        first = on_gradio_like_loop(lambda: ask(eng, 1, "Hello! Please introduce yourself.", 64, ignore_eos=False))
        r["first_request"] = {"text": first[0][:200], **stats_dict(first[1])} if first else {"error": "no answer"}
        r["users16"] = on_gradio_like_loop(lambda: users(16))
        r["users32"] = on_gradio_like_loop(lambda: users(32))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["awq", "a10", "api"], default="awq")
    p.add_argument("--samples", type=int, default=16, help="calibration samples (the app uses 128)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration tokens per sample (the app uses 2048)")
    a = p.parse_args(argv)
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    R["mode"] = a.mode
    R["calibration"] = {"samples": a.samples, "seqlen": a.seqlen}
    quick_calibration(a.samples, a.seqlen)
    t0 = time.perf_counter()
    if a.mode == "awq":
        write_checkpoints()
        first_start(CACHE)
        second_resolve(CACHE)
    elif a.mode == "a10":
        write_checkpoints(llava=True)
        ballast(22.5)
        early_chat(CACHE_A10)
        second_resolve(CACHE_A10)
    else:
        api_server()
    R["total_s"] = round(time.perf_counter() - t0, 1)
    save(f"first_start-{a.mode}.json", R)
    summary = {k: v for k, v in R.items() if k not in ("step_s",)}
    print("SUMMARY", json.dumps(summary, default=str)[:4000], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
