"""Stop on the real TurboMind pipeline: pressed 0-300 ms after starting, it must leave lmdeploy idle (issue 12).

Builds both engines through the app's start-up path on full-size synthetic checkpoints, measures batch-1 decode,
then starts 200 text questions (4 waves of 50, more than the 32 instances) and 8 image questions (4000x3000,
each a turn for the one vision thread) with max_new_tokens 2048, and stops each 0-300 ms after it started: half
with the Stop button's call (engine.stop), half by the reader going away (the event cancelled). Afterwards it
reads lmdeploy's own bookkeeping (id2inst, free instances, id2step) and GPU utilisation (pynvml), and measures
batch-1 decode again: it must be within 5% of before.

    python -m bench.gpu_stop          (results: $OUT/stop.json; about 3 minutes with checkpoints to write)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import traceback

from bench.runs import TEXT, VISION, ensure_checkpoints, save, used_mib
from model_loader.config import AppConfig
from model_loader.engines.seam import Delta, GenSettings, Stats
from model_loader.memory.gpu import visible_device

R: dict = {}
LONG = GenSettings(temperature=0, max_new_tokens=2048, ignore_eos=True)  # a lost stop runs for seconds
TOLERANCE = 0.05


def stage(name: str):
    """Record a stage's result or its error in R (and on disk) and go on."""

    def deco(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                R[name] = fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - one failed measurement must not cost the whole call
                traceback.print_exc()
                R[name] = {"error": repr(e)[:800]}
            R.setdefault("stage_s", {})[name] = round(time.perf_counter() - t0, 1)
            save("stop.json", R)
            return R[name]

        return run

    return deco


def stop_delays_ms(n: int, max_ms: float = 300.0) -> list[float]:
    """n delays spread evenly over 0..max_ms, both ends included."""
    return [0.0] if n == 1 else [round(max_ms * i / (n - 1), 1) for i in range(n)]


def bookkeeping(engine) -> dict:
    """lmdeploy's own view of the engine: registered requests, free instances, ids it remembers."""
    pipe = engine.pipe
    free = pipe.free_insts.qsize() if pipe.free_insts is not None else len(pipe.instances)
    return {
        "id2inst": len(pipe.id2inst),
        "free_instances": free,
        "instances": len(pipe.instances),
        "id2step": len(pipe.id2step),
        "seam_active": engine.active_sessions(),
    }


def is_idle(b: dict) -> bool:
    return b["id2inst"] == 0 and b["free_instances"] == b["instances"] and b["seam_active"] == 0


def gpu_util_samples(seconds: float, every_s: float = 0.05) -> list[int] | None:
    """GPU utilisation (%) sampled through NVML; None without a GPU."""
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001
        return None
    try:
        device = visible_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(device)) if device.isdigit() else pynvml.nvmlDeviceGetHandleByUUID(device)
        out, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            out.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            time.sleep(every_s)
        return out
    finally:
        pynvml.nvmlShutdown()


async def reply(engine, sid: int, messages: list[dict], settings: GenSettings) -> dict:
    """One whole reply: its Stats (how many, and the last) and decode speed."""
    stats = [item async for item in engine.stream(sid, messages, settings) if isinstance(item, Stats)]
    s = stats[-1] if stats else None
    return {
        "stats_count": len(stats),
        "finish": s.finish_reason if s else None,
        "tokens": s.output_tokens if s else 0,
        "tok_s": round(s.tokens_per_s, 1) if s else 0.0,
        "ttft_ms": round(1000 * s.ttft_s, 1) if s else None,
        "error": s.error if s else "no stats",
    }


async def stopped_reply(engine, sid: int, messages: list[dict], delay_ms: float, how: str) -> dict:
    """Start a reply, then `how` = 'stop' (the Stop button's engine.stop) or 'leave' (the reader is cancelled)."""
    items: list = []

    async def consume():
        async for item in engine.stream(sid, messages, LONG):
            items.append(item)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)  # the stream has begun: its request is on its way to lmdeploy
    await asyncio.sleep(delay_ms / 1000)
    t_stop = time.perf_counter()
    if how == "stop":
        await engine.stop(sid)
        await asyncio.wait_for(task, 60)
    else:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    stats = [i for i in items if isinstance(i, Stats)]
    return {
        "delay_ms": delay_ms,
        "how": how,
        "stats_count": len(stats),
        "finish": stats[-1].finish_reason if stats else None,
        "tokens": stats[-1].output_tokens if stats else sum(isinstance(i, Delta) for i in items),
        "end_ms": round(1000 * (time.perf_counter() - t_stop), 1),
        "t_stop": t_stop,
    }


async def wait_idle(engine, since: float, timeout_s: float = 20.0) -> dict:
    """Poll lmdeploy's bookkeeping until nothing runs; how long after `since` that was."""
    end = time.perf_counter() + timeout_s
    while True:
        b = bookkeeping(engine)
        if is_idle(b) or time.perf_counter() > end:
            b["idle"] = is_idle(b)
            b["idle_after_last_stop_s"] = round(time.perf_counter() - since, 3)
            return b
        await asyncio.sleep(0.01)


def summarize(results: list[dict]) -> dict:
    """The figures that matter of a batch of stopped replies."""
    stop_reply = [r for r in results if r["how"] == "stop"]
    return {
        "n": len(results),
        "finish": {k: sum(str(r["finish"]) == k for r in results) for k in sorted({str(r["finish"]) for r in results})},
        "stop_not_one_stats": sum(r["stats_count"] != 1 for r in stop_reply),
        "stop_not_abort": sum(r["finish"] != "abort" for r in stop_reply),
        "max_tokens_after_stop": max((r["tokens"] for r in results), default=0),
        "stop_to_stats_ms_p50": round(statistics.median(r["end_ms"] for r in stop_reply), 1) if stop_reply else None,
        "stop_to_stats_ms_max": max((r["end_ms"] for r in stop_reply), default=None),
    }


def decode_speed(engine, messages: list[dict], n: int, runs: int = 3) -> dict:
    """Batch-1 decode tokens/s: one warm-up, then the median of `runs`."""
    s = GenSettings(temperature=0, max_new_tokens=n, ignore_eos=True)
    asyncio.run(reply(engine, 1, messages, s))
    got = [asyncio.run(reply(engine, 1, messages, s)) for _ in range(runs)]
    return {"tok_s": statistics.median(r["tok_s"] for r in got), "runs": got}


def stop_wave(engine, make_messages, n: int, sid0: int) -> dict:
    """n replies started together and stopped 0-300 ms later; then lmdeploy's bookkeeping and the GPU."""
    delays = stop_delays_ms(n)

    async def run():
        results = await asyncio.gather(
            *[stopped_reply(engine, sid0 + i, make_messages(i), delays[i], "stop" if i % 2 == 0 else "leave") for i in range(n)]
        )
        last = max(r["t_stop"] for r in results)
        return results, await wait_idle(engine, last)

    results, after = asyncio.run(run())
    util = gpu_util_samples(1.0)
    for r in results:
        r.pop("t_stop")
    return {
        "summary": summarize(results),
        "after": after,
        "gpu_util_1s_after_idle": {"max": max(util), "mean": round(statistics.mean(util), 1)} if util else None,
        "results": results,
    }


def within(before: float, after: float, tolerance: float = TOLERANCE) -> bool:
    return before > 0 and abs(after - before) / before <= tolerance


def image_message(image, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image", "image": image}]}]


def run_all(text, vision, text_waves: int = 4, per_wave: int = 50, images: int = 8, big=(4000, 3000)) -> dict:
    """Every stage on built engines (the CPU test passes engines over FakePipe, with small numbers)."""
    from PIL import Image  # noqa: PLC0415

    small = Image.new("RGB", (640, 480), (200, 30, 30))
    large = Image.linear_gradient("L").resize(big).convert("RGB")
    hello = [{"role": "user", "content": "Hi, please introduce yourself"}]

    @stage("before")
    def before():
        out = {"text_decode": decode_speed(text, hello, 256)}
        if vision:
            out["vision_decode"] = decode_speed(vision, image_message(small, "What is in this image?"), 128)
        out["text_bookkeeping"] = bookkeeping(text)
        return out

    @stage("text_stops")
    def text_stops():
        waves = []
        for w in range(text_waves):
            ask = lambda i, w=w: [{"role": "user", "content": f"wave {w}, user {i}: tell me a long story"}]  # noqa: E731
            waves.append(stop_wave(text, ask, per_wave, 10_000 + 1000 * w))
        return {"waves": waves}

    @stage("image_stops")
    def image_stops():
        return stop_wave(vision, lambda i: image_message(large, f"Describe this image in detail ({i})."), images, 20_000)

    @stage("after")
    def after():
        out = {"text_decode": decode_speed(text, hello, 256), "text_bookkeeping": bookkeeping(text)}
        if vision:
            out["vision_decode"] = decode_speed(vision, image_message(small, "What is in this image?"), 128)
            out["vision_bookkeeping"] = bookkeeping(vision)
        return out

    before()
    text_stops()
    if vision:
        image_stops()
    after()
    R["verdict"] = verdict(R, {"text": per_wave, "vision": images})
    save("stop.json", R)
    return R


def verdict(r: dict, peak: dict) -> dict:
    """Pass/fail per claim of the issue from the stages' results (a stage that failed fails its claims).

    `peak`: the most requests in flight at once per engine; reused ids keep lmdeploy's id2step within it.
    """
    out: dict = {}
    waves = r.get("text_stops", {}).get("waves", [])
    batches = [*waves, r["image_stops"]] if "summary" in r.get("image_stops", {}) else waves
    out["every_stop_one_stats_abort"] = bool(batches) and all(
        b["summary"]["stop_not_one_stats"] == 0 and b["summary"]["stop_not_abort"] == 0 for b in batches
    )
    out["idle_after_every_batch"] = bool(batches) and all(b["after"]["idle"] for b in batches)
    out["max_idle_after_last_stop_s"] = max((b["after"]["idle_after_last_stop_s"] for b in batches), default=None)
    utils = [b["gpu_util_1s_after_idle"]["max"] for b in batches if b.get("gpu_util_1s_after_idle")]
    out["gpu_util_max_after_idle"] = max(utils) if utils else None
    b4, af = r.get("before", {}), r.get("after", {})
    for kind in ("text", "vision"):
        key = f"{kind}_decode"
        if key in b4 and key in af:
            out[f"{kind}_decode_tok_s_before_after"] = [b4[key]["tok_s"], af[key]["tok_s"]]
            out[f"{kind}_decode_within_5pct"] = within(b4[key]["tok_s"], af[key]["tok_s"])
        ids = af.get(f"{kind}_bookkeeping", {}).get("id2step")
        if ids is not None:
            out[f"{kind}_id2step_size"] = ids
            out[f"{kind}_id2step_within_peak"] = ids <= peak[kind]
    return out


def main() -> None:
    t0 = time.perf_counter()
    R["checkpoint_write_s"] = ensure_checkpoints()
    from model_loader.startup import Startup  # noqa: PLC0415

    st = Startup(
        AppConfig(text_model=str(TEXT), vision_model=str(VISION), engine_process=False), dict(os.environ)
    )  # reads the pipe
    u0 = used_mib()
    t1 = time.perf_counter()
    st.build_all()
    R["startup"] = {
        "build_all_s": round(time.perf_counter() - t1, 1),
        "used_before_mib": u0,
        "used_after_mib": used_mib(),
        "slots": {k: {"state": s.state, "message": s.message} for k, s in st.slots.items()},
    }
    save("stop.json", R)
    text, vision = st.slots["text"].engine, st.slots["vision"].engine
    if text is None:
        raise SystemExit("the text engine did not start: " + st.slots["text"].message)
    run_all(text, vision)
    R["total_s"] = round(time.perf_counter() - t0, 1)
    save("stop.json", R)
    print("VERDICT", R["verdict"], flush=True)
    for s in st.slots.values():
        if s.engine:
            s.engine.close()


if __name__ == "__main__":
    main()
