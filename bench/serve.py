"""`python -m bench.serve [app flags]`: the app as `python app.py` runs it, but every reply is max_new_tokens long.

Benchmarks compare the app with the raw engine at fixed lengths, so generation ignores EOS here; the product has
no such switch.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import threading
import time


def log_gc_pauses(every_s: float = 10.0) -> None:
    """Every `every_s`, one log line: collections per generation, their total and longest pause (ms), and the
    objects tracked and frozen (bench_app reads them from the app's log)."""
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    began = [0.0]

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - began[0])

    out = logging.getLogger("bench.gc")  # its own handler: lmdeploy and transformers change the root logger
    out.addHandler(logging.StreamHandler())
    out.setLevel(logging.INFO)
    out.propagate = False

    def report() -> None:
        while True:
            time.sleep(every_s)
            summary = {g: [len(p), round(1000 * sum(p), 1), round(1000 * max(p, default=0), 1)] for g, p in pauses.items()}
            out.info("GC %s tracked=%d frozen=%d", json.dumps(summary), len(gc.get_objects()), gc.get_freeze_count())

    gc.callbacks.append(timed)
    threading.Thread(target=report, name="gc-report", daemon=True).start()


def main() -> int:
    import app  # noqa: PLC0415
    from model_loader.engines import api_server, process, turbomind  # noqa: PLC0415

    fixed = turbomind.generation_config
    turbomind.generation_config = lambda s: fixed(dataclasses.replace(s, ignore_eos=True))
    stream = process.ProcessEngine.stream  # the engine process is spawned, so it is told with each request
    process.ProcessEngine.stream = lambda self, sid, messages, s: stream(
        self, sid, messages, dataclasses.replace(s, ignore_eos=True)
    )
    payload = api_server.openai_payload  # the same for the app over an api_server (bench_app --app-backend)
    api_server.openai_payload = lambda s: payload(dataclasses.replace(s, ignore_eos=True))
    if os.environ.get("BENCH_GC_LOG"):
        log_gc_pauses()
    if os.environ.get("BENCH_GC_FREEZE") == "0":  # A/B of freezing the heap once the engines are built
        app.freeze_heap_after = lambda startup: None
    if os.environ.get("BENCH_TIMELINE"):  # where each turn's first-text wait goes (bench/timeline.py)
        from bench.timeline import record_timeline  # noqa: PLC0415

        record_timeline(os.environ["BENCH_TIMELINE"], (turbomind.LmdeployEngine, process.ProcessEngine))
    if os.environ.get("BENCH_NO_HTTPTOOLS"):  # A/B: uvicorn falls back to h11 (the GPU image has uvloop already)
        import sys  # noqa: PLC0415

        sys.modules["httptools"] = None
    if os.environ.get("BENCH_UI_INTERVAL"):  # A/B of the streamed updates' pacing: "base,streams per step,max" (s)
        from ui import streaming  # noqa: PLC0415

        base, per_step, most = os.environ["BENCH_UI_INTERVAL"].split(",")
        streaming.UI_INTERVAL_S, streaming.BUSY_STREAMS_PER_STEP = float(base), float(per_step)
        streaming.MAX_UI_INTERVAL_S = float(most)
    if os.environ.get("BENCH_COUNT_ONE_BY_ONE"):  # A/B: trimming asks the engine process once per turn, as before
        del process.ProcessEngine.count_tokens_each
    if os.environ.get("BENCH_EXTRA_UPDATES"):  # A/B: a turn's updates as before round 9 (the question alone first,
        from ui import chat_tab  # noqa: PLC0415  # and the save after the answer's end, each an update of its own)

        reply = chat_tab.stream_reply

        async def as_before(slot, history, *args):
            yield history, "…"
            async for update in reply(slot, history, *args):
                yield tuple(update)  # not a FinalUpdate: the save follows in an update of its own

        chat_tab.stream_reply = as_before
    if os.environ.get("BENCH_COUNT_EVERY_TURN"):  # A/B: the fit check ignores the engine's counts of earlier prompts
        from ui import prompt_sizes  # noqa: PLC0415

        prompt_sizes.PromptSizes.upper_bound = lambda self, messages: None
    if os.environ.get("BENCH_SWITCH_INTERVAL_S"):  # A/B of the interpreter's switch interval while serving
        app.SWITCH_INTERVAL_S = float(os.environ["BENCH_SWITCH_INTERVAL_S"])
    return app.main()


if __name__ == "__main__":
    raise SystemExit(main())
