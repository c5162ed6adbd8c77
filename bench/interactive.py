"""Stateless requests with prefix caching vs lmdeploy's interactive mode, on turn 5 of a long conversation.

Interactive mode keeps each session's KV cache in the engine and sends only the new message each turn; stateless
sends the whole conversation and relies on prefix caching. Prints one JSON line (INTERACTIVE ...).

    python -m bench.interactive
"""

from __future__ import annotations

import asyncio
import json
import time

from bench.runs import TEXT, as_the_app_builds
from model_loader.config import AppConfig
from model_loader.engines.lmdeploy_config import generation_config
from model_loader.engines.seam import GenSettings

LONG = "Shanghai is a city in China. " * 150


def turns(n: int) -> list[str]:
    return [f"Question {i}: {LONG}" for i in range(n)] + ["Next?"]


async def first_token_ms(pipe, messages, session_id, start, end, gen) -> tuple[float, int]:
    t0 = time.perf_counter()
    first, n = None, 0
    async for out in pipe.generate(messages, session_id, gen_config=gen, sequence_start=start, sequence_end=end):
        if first is None and out.generate_token_len > 0:
            first = time.perf_counter()
        n = out.generate_token_len
    return 1000 * ((first or time.perf_counter()) - t0), n


def run_on(pipe, coro):
    return asyncio.run_coroutine_threadsafe(coro, pipe.internal_thread.loop).result()


def main() -> None:
    from model_loader.engines.turbomind import LmdeployEngine
    from tests.synth import write_internlm2

    if not (TEXT / "config.json").is_file():
        write_internlm2(TEXT, "full", "awq")

    r = {}
    gen = generation_config(GenSettings(temperature=0, max_new_tokens=100, ignore_eos=True))
    for mode in ("interactive", "stateless_prefix_caching"):
        cfg = as_the_app_builds(AppConfig(prefix_caching=mode != "interactive"))
        eng = LmdeployEngine.build("text", TEXT, cfg, awq=True)
        pipe = eng.pipe
        run_on(pipe, first_token_ms(pipe, [{"role": "user", "content": "warm up"}], 1, True, True, gen))
        qs = turns(4)
        if mode == "interactive":
            sid = 77
            for i, q in enumerate(qs[:-1]):
                run_on(pipe, first_token_ms(pipe, [{"role": "user", "content": q}], sid, i == 0, False, gen))
            ms, _ = run_on(pipe, first_token_ms(pipe, [{"role": "user", "content": qs[-1]}], sid, False, False, gen))
            r["interactive_turn5_ttft_ms"] = round(ms, 1)
            r["interactive_history_tokens"] = pipe.id2step.get(sid)
            run_on(pipe, pipe.end_session(sid))
        else:
            hist = []
            for q in qs[:-1]:
                hist += [{"role": "user", "content": q}, {"role": "assistant", "content": "An answer. " * 100}]
                run_on(pipe, first_token_ms(pipe, hist[:-1], 80, True, True, gen))  # each turn as the app sends it
            ms, _ = run_on(pipe, first_token_ms(pipe, hist + [{"role": "user", "content": qs[-1]}], 80, True, True, gen))
            r["stateless_turn5_ttft_ms"] = round(ms, 1)
            r["stateless_prompt_tokens"] = eng.count_tokens(hist + [{"role": "user", "content": qs[-1]}])
        eng.close()
        del eng, pipe
        import gc

        gc.collect()
    print("INTERACTIVE", json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
