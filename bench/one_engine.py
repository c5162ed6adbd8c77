"""One InternLM2 engine at a given KV ratio in a fresh process: measured vs planned memory, TTFT with a long
conversation (prefix caching on or off). Called by gpu_engines.py; prints one JSON line.

    python -m bench.one_engine RATIO [pc|nopc] [FREE_GIB_BALLAST]
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time

from bench.runs import TEXT, used_mib
from model_loader.config import AppConfig
from model_loader.engines.seam import GenSettings, Stats
from model_loader.memory import planner
from model_loader.memory.gpu import gpu_memory


async def ttft(engine, messages, n=64) -> float:
    async for item in engine.stream(1, messages, GenSettings(temperature=0, max_new_tokens=n, ignore_eos=True)):
        if isinstance(item, Stats):
            return item.ttft_s
    return -1.0


def main() -> None:
    ratio = float(sys.argv[1])
    pc = (sys.argv[2] if len(sys.argv) > 2 else "pc") == "pc"
    mem0 = gpu_memory()
    spec = dataclasses.replace(planner.spec_from_path(TEXT, "text"), kv_quant="int8")  # the precision it is built with
    plan = planner.plan_order([spec], mem0.total_mib, mem0.free_mib, ratio, used_mib=mem0.used_mib)
    from model_loader.engines.turbomind import LmdeployEngine

    cfg = AppConfig(text_kv_ratio=ratio, text_kv_quant="int8", prefix_caching=pc, enable_vision=False)
    t0 = time.perf_counter()
    eng = LmdeployEngine.build("text", TEXT, cfg, awq=True)
    r = {
        "ratio": ratio,
        "prefix_caching": pc,
        "load_s": round(time.perf_counter() - t0, 1),
        "used_before_mib": mem0.used_mib,
        "free_before_mib": mem0.free_mib,
        "used_after_mib": used_mib(),
        "planned_after_mib": round(plan.used_after(0)),
        "planned_kv_tokens": plan.engines[0].kv_tokens,
        "weights_mib_planned": round(spec.weights_mib),
    }
    r["measured_delta_mib"] = r["used_after_mib"] - r["used_before_mib"]
    r["planned_delta_mib"] = round(plan.used_after(0) - mem0.used_mib)
    r["error_pct"] = round(100 * (r["planned_delta_mib"] - r["measured_delta_mib"]) / r["measured_delta_mib"], 2)
    # a growing conversation: 4 earlier turns of ~1,000 tokens, then a new question
    hist = []
    for i in range(4):
        hist += [
            {"role": "user", "content": f"Question {i}: " + "Shanghai is a city in China. " * 150},
            {"role": "assistant", "content": "An answer. " * 100},
        ]
    asyncio.run(ttft(eng, [{"role": "user", "content": "warm up"}]))
    r["long_prompt_tokens"] = eng.count_tokens(hist + [{"role": "user", "content": "Next?"}])
    r["ttft_turn5_first_ms"] = round(1000 * asyncio.run(ttft(eng, hist + [{"role": "user", "content": "Next?"}])), 1)
    r["ttft_turn5_again_ms"] = round(1000 * asyncio.run(ttft(eng, hist + [{"role": "user", "content": "And?"}])), 1)
    print("ONE", json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
