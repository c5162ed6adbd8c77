"""Both engines beside a ballast that leaves FREE_GIB (22.5) free, as on OpenXLab's A10, through the app's
start-up path: the planner's verdict first, then the engines built and asked. Prints one JSON line."""

from __future__ import annotations

import asyncio
import json
import os
import time

import torch
from PIL import Image

from bench.runs import TEXT, VISION, used_mib
from model_loader.config import AppConfig
from model_loader.engines.seam import GenSettings, Stats
from model_loader.memory import planner
from model_loader.memory.gpu import gpu_memory


async def ask(engine, sid, messages, n):
    async for item in engine.stream(sid, messages, GenSettings(temperature=0, max_new_tokens=n, ignore_eos=True)):
        if isinstance(item, Stats):
            return item


def main() -> None:
    free_gib = float(os.environ.get("FREE_GIB", "22.5"))
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(int(free - free_gib * 2**30), dtype=torch.uint8, device="cuda")
    mem = gpu_memory()
    r = {"free_gib": free_gib, "ballast_mib": ballast.numel() // 2**20, "free_mib_smi": mem.free_mib}
    from model_loader.startup import Startup

    st = Startup(AppConfig(text_model=str(TEXT), vision_model=str(VISION), engine_process=False), dict(os.environ))  # one context
    t0 = time.perf_counter()
    st.build_all()
    r["build_s"] = round(time.perf_counter() - t0, 1)
    r["plan"] = planner.format_plan(st.plan) if st.plan else None
    r["plan_fits"] = st.plan.fits if st.plan else None
    r["planned_after_mib"] = [round(st.plan.used_after(i)) for i in range(len(st.plan.engines))] if st.plan else None
    r["slots"] = {
        k: {"state": s.state, "message": s.message[:300], "used_after_mib": s.used_mib_after} for k, s in st.slots.items()
    }
    text, vision = st.slots["text"].engine, st.slots["vision"].engine

    async def load():
        out = {}
        if text:
            t = time.perf_counter()
            res = await asyncio.gather(*[ask(text, i, [{"role": "user", "content": f"hi {i}"}], 128) for i in range(16)])
            out["text16_tok_s"] = round(sum(x.output_tokens for x in res) / (time.perf_counter() - t), 1)
            out["text16_finish"] = sorted({x.finish_reason for x in res})
        if vision:
            img = Image.new("RGB", (1024, 768), (10, 200, 30))
            t = time.perf_counter()
            res = await asyncio.gather(
                *[
                    ask(
                        vision,
                        100 + i,
                        [
                            {
                                "role": "user",
                                "content": [{"type": "text", "text": "what is this"}, {"type": "image", "image": img}],
                            }
                        ],
                        128,
                    )
                    for i in range(4)
                ]
            )
            out["vision4_s"] = round(time.perf_counter() - t, 2)
            out["vision4_finish"] = sorted({x.finish_reason for x in res})
        return out

    try:
        r.update(asyncio.run(load()))
    except Exception as e:  # noqa: BLE001
        r["infer_error"] = repr(e)[:500]
    r["free_mib_end"] = gpu_memory().free_mib
    r["used_end_mib"] = used_mib()
    print("A10", json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
