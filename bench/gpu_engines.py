"""GPU check of the engines, in one run on a CUDA machine.

Writes full-size synthetic checkpoints with the project's writer, builds both TurboMind engines through the
project's own start-up path, and drives them through the engine seam: a text and an image reply, 16 concurrent
sessions with one stopped mid-stream, 64 sessions x 5 turns, 200 stops, raw-pipeline throughput, the planner
against measured memory at ratios 0.01/0.4/0.8, and both engines beside a ballast that leaves 22.5 GiB free.

    python -m bench.gpu_engines [--skip-ratios] [--skip-a10]      (results: $OUT/engines.json)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import traceback

from PIL import Image

from bench.runs import TEXT, VISION, ensure_checkpoints, save, used_mib
from model_loader.config import AppConfig
from model_loader.engines.seam import Delta, GenSettings
from model_loader.memory import planner
from model_loader.weights.validation import text_model_problems, vision_model_problems


def run_stage(results: dict, name: str, fn, *args):
    """Run one measurement into results[name] (its error, if it fails), time it, save, and go on."""
    t0 = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as e:  # noqa: BLE001 - record and go on to the next stage
        traceback.print_exc()
        results[name] = {"error": repr(e)[:600]}
    results.setdefault("stage_s", {})[name] = round(time.perf_counter() - t0, 1)
    save("engines.json", results)
    return results[name]


async def one_reply(engine, sid, messages, settings, stop_after_s=None):
    t0 = time.perf_counter()
    first, text, stats = None, "", None
    agen = engine.stream(sid, messages, settings)
    async for item in agen:
        if isinstance(item, Delta):
            first = first or time.perf_counter()
            text += item.text
            if stop_after_s and time.perf_counter() - t0 > stop_after_s:
                await engine.stop(sid)
                stop_after_s = None
        else:
            stats = item
    return {
        "ttft_ms": round(1000 * ((first or time.perf_counter()) - t0), 1),
        "chars": len(text),
        "tokens": stats.output_tokens if stats else 0,
        "finish": stats.finish_reason if stats else None,
        "error": stats.error if stats else "no stats",
        "total_s": time.perf_counter() - t0,
        "tok_s": round(stats.tokens_per_s, 1) if stats else 0,
    }


def engine_idle(engine) -> dict:
    pipe = engine.pipe
    free = pipe.free_insts.qsize() if pipe.free_insts is not None else None
    return {
        "seam_active": engine.active_sessions(),
        "lmdeploy_running": len(pipe.id2inst),
        "free_instances": free,
        "instances": len(pipe.instances),
    }


def text_seam(text):
    s = GenSettings(temperature=0, max_new_tokens=256, ignore_eos=True)
    asyncio.run(one_reply(text, 1, [{"role": "user", "content": "warm up"}], s))
    runs = [asyncio.run(one_reply(text, 1, [{"role": "user", "content": "Hi, please introduce yourself"}], s)) for _ in range(3)]
    sampled = asyncio.run(
        one_reply(
            text,
            2,
            [{"role": "user", "content": "hi"}],
            GenSettings(temperature=0.8, top_p=0.8, top_k=40, max_new_tokens=32, seed=7),
        )
    )
    return {"batch1": runs, "sampled": sampled}


def image_seam(vision):
    img = Image.new("RGB", (640, 480), (200, 30, 30))
    s = GenSettings(temperature=0, max_new_tokens=64, ignore_eos=True)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"}, {"type": "image", "image": img}]}]
    asyncio.run(one_reply(vision, 3, msgs, s))
    out = [asyncio.run(one_reply(vision, 3, msgs, s)) for _ in range(2)]
    multi = msgs + [{"role": "assistant", "content": "A red square."}, {"role": "user", "content": "What colour is it?"}]
    out.append(asyncio.run(one_reply(vision, 3, multi, s)))
    return {"replies": out, "tokens_counted": vision.count_tokens(msgs)}


def concurrent(text):
    s = GenSettings(temperature=0, max_new_tokens=256, ignore_eos=True)

    async def run():
        t0 = time.perf_counter()
        tasks = [
            one_reply(
                text,
                100 + i,
                [{"role": "user", "content": f"user {i}: tell me a story"}],
                s,
                stop_after_s=0.1 if i == 0 else None,
            )
            for i in range(16)
        ]
        res = await asyncio.gather(*tasks)
        dt = time.perf_counter() - t0
        await asyncio.sleep(0.2)
        return res, dt

    res, dt = asyncio.run(run())
    return {
        "stopped": res[0],
        "others_finish": sorted({r["finish"] for r in res[1:]}),
        "others_tokens": sorted({r["tokens"] for r in res[1:]}),
        "aggregate_tok_s": round(sum(r["tokens"] for r in res) / dt, 1),
        "after": engine_idle(text),
    }


def sessions64(text):
    s = GenSettings(temperature=0.7, max_new_tokens=24)

    async def user(i):
        hist, errors = [], 0
        for turn in range(5):
            hist.append({"role": "user", "content": f"I am user {i}, turn {turn}."})
            r = await one_reply(text, 1000 + i, hist, s)
            errors += r["finish"] not in ("stop", "length") or bool(r["error"])
            hist.append({"role": "assistant", "content": "ok"})
        return errors

    async def everyone():
        return await asyncio.wait_for(asyncio.gather(*[user(i) for i in range(64)]), 300)

    t0 = time.perf_counter()
    errs = asyncio.run(everyone())
    return {
        "sessions": 64,
        "turns": 5,
        "errors": sum(errs),
        "wall_s": round(time.perf_counter() - t0, 1),
        "after": engine_idle(text),
    }


def stops200(text):
    s = GenSettings(temperature=0, max_new_tokens=512, ignore_eos=True)
    base = engine_idle(text)

    async def run():
        async def one(i):
            agen = text.stream(5000 + i, [{"role": "user", "content": f"stop me {i}"}], s)
            async for item in agen:
                if isinstance(item, Delta):
                    break  # the consumer goes away mid-stream, like a closed browser tab
            await agen.aclose()

        for k in range(0, 200, 50):
            await asyncio.gather(*[one(i) for i in range(k, k + 50)])
        await asyncio.sleep(1.0)
        return await one_reply(
            text,
            9999,
            [{"role": "user", "content": "still there?"}],
            GenSettings(temperature=0, max_new_tokens=16, ignore_eos=True),
        )

    nxt = asyncio.run(run())
    return {"before": base, "after": engine_idle(text), "next_request": nxt}


def raw(text):
    from lmdeploy import GenerationConfig

    pipe = text.pipe
    gen = GenerationConfig(max_new_tokens=256, ignore_eos=True)
    out = {}
    pipe(["warm up"], gen_config=gen)
    for n in (1, 8, 16, 32):
        t0 = time.perf_counter()
        res = pipe([f"user {i}: hi, tell me a story" for i in range(n)], gen_config=gen)
        out[f"b{n}_tok_s"] = round(sum(r.generate_token_len for r in res) / (time.perf_counter() - t0), 1)
    return out


def seam_tp(text):
    s = GenSettings(temperature=0, max_new_tokens=256, ignore_eos=True)
    out = {}
    for n in (8, 16, 32):

        async def run():
            t0 = time.perf_counter()
            res = await asyncio.gather(
                *[one_reply(text, 200 + i, [{"role": "user", "content": f"u{i} hi"}], s) for i in range(n)]
            )
            return sum(r["tokens"] for r in res) / (time.perf_counter() - t0)

        out[f"n{n}_tok_s"] = round(asyncio.run(run()), 1)
    return out


def subprocess_json(args, marker, env=None, timeout=240):
    p = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    for line in p.stdout.splitlines():
        if line.startswith(marker + " "):
            return json.loads(line[len(marker) + 1 :])
    return {"error": (p.stderr or p.stdout)[-1500:], "rc": p.returncode}


def ratios():
    out = [subprocess_json(["-m", "bench.one_engine", str(r), "pc"], "ONE") for r in (0.01, 0.4, 0.8)]
    out.append(subprocess_json(["-m", "bench.one_engine", "0.4", "nopc"], "ONE"))
    return out


def a10():
    return subprocess_json(["-m", "bench.a10_probe"], "A10", timeout=400)


def startup_stage(st, used_before: float) -> dict:
    """Both engines through the app's start-up path: states, memory after each, the plan beside it."""
    t1 = time.perf_counter()
    st.build_all()
    return {
        "build_all_s": round(time.perf_counter() - t1, 1),
        "used_before_mib": used_before,
        "slots": {
            k: {
                "state": s.state,
                "message": s.message,
                "used_after_mib": s.used_mib_after,
                "load_s": round(s.engine.info.load_s, 1) if s.engine else None,
                "backend": s.engine.info.backend if s.engine else None,
            }
            for k, s in st.slots.items()
        },
        "plan": planner.format_plan(st.plan) if st.plan else None,
        "planned_after_mib": [round(st.plan.used_after(i)) for i in range(len(st.plan.engines))] if st.plan else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-ratios", action="store_true")
    ap.add_argument("--skip-a10", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    results: dict = {"checkpoint_write_s": ensure_checkpoints()}
    results["validation"] = {"text": text_model_problems(TEXT, True), "vision": vision_model_problems(VISION)}
    if not a.skip_ratios:
        run_stage(results, "ratios", ratios)
    from model_loader.startup import Startup  # noqa: PLC0415

    st = Startup(
        AppConfig(text_model=str(TEXT), vision_model=str(VISION), engine_process=False), dict(os.environ)
    )  # reads the pipe
    run_stage(results, "startup", startup_stage, st, used_mib())
    text, vision = st.slots["text"].engine, st.slots["vision"].engine
    if text:
        run_stage(results, "text_seam", text_seam, text)
    if vision:
        run_stage(results, "image_seam", image_seam, vision)
    if text:
        for name, fn in (
            ("concurrent16_stop1", concurrent),
            ("raw_pipeline", raw),
            ("seam_throughput", seam_tp),
            ("sessions64x5", sessions64),
            ("stops200", stops200),
        ):
            run_stage(results, name, fn, text)
    for s in st.slots.values():
        if s.engine:
            s.engine.close()
    del st, text, vision
    import gc  # noqa: PLC0415

    gc.collect()
    if not a.skip_a10:
        run_stage(results, "a10_ballast", a10)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    save("engines.json", results)


if __name__ == "__main__":
    main()
