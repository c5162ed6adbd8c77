"""The raw engine as the app runs it, for bench_app's like-for-like reference: the app's TurbomindEngineConfig (the
text engine's KV ratio and its KV setting as the app resolves it on this GPU, prefix caching, batch 32), N concurrent
async `generate` streams in one process, the same conversations and reply lengths (ignore_eos) as the app's users.
Prints one line, `RAW {json}`.

    python -m bench.raw_reference --runs 5 --users 1,8,16,32 --turns 3 --new-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

from bench.runs import TEXT, as_the_app_builds
from bench.workload import history_of, question, summarize, token_counter

_sessions = itertools.count(1)


async def raw_user(pipe, gen, user: int, turns: int, history: list[dict], began: float = 0.0) -> list[dict]:
    """One user's turns straight on lmdeploy's loop from `history`: the whole conversation each turn, as the app
    sends it; each turn's start and end in seconds after `began` (a perf_counter reading)."""
    out: list[dict] = []
    for t in range(turns):
        history = history + [question(user, t)]
        t0 = time.perf_counter()
        first = token = None
        text, n, prompt, error = "", 0, 0, ""
        async for o in pipe.generate(
            history, next(_sessions), gen_config=gen, stream_response=True, sequence_start=True, sequence_end=True
        ):
            if token is None and o.generate_token_len > 0:
                token = time.perf_counter()
            if o.response:
                first = first or time.perf_counter()
                text += o.response
            n, prompt = o.generate_token_len, o.input_token_len
            if o.finish_reason == "error":
                error = o.response or "error"
        out.append(
            {
                "first_ms": None if first is None else 1000 * (first - t0),
                "engine_ttft_ms": None if token is None else round(1000 * (token - t0), 1),
                "tokens": n,
                "prompt_tokens": prompt,
                "error": error,
                "turn": t,
                "start_s": t0 - began,
                "end_s": time.perf_counter() - began,
            }
        )
        history = history + [{"role": "assistant", "content": text or "..."}]
    return out


def measure(pipe, gen, users: int, turns: int, history_tokens: int = 0) -> dict:
    """`users` concurrent streams in lmdeploy's own loop; the same summary as the app's users get. The conversations
    are built first, as the app's users have theirs before they press Enter (counting a long one's tokens takes
    the tokenizer tens of ms)."""
    count = token_counter(str(TEXT)) if history_tokens > 0 else None  # the tokenizer, for long chats only
    histories = [history_of(u, history_tokens, count) for u in range(users)]

    async def everyone():
        t0 = time.perf_counter()
        per_user = await asyncio.gather(*[raw_user(pipe, gen, u, turns, histories[u], t0) for u in range(users)])
        return [t for ts in per_user for t in ts], time.perf_counter() - t0

    turns_out, wall = asyncio.run_coroutine_threadsafe(everyone(), pipe.internal_thread.loop).result(600)
    return summarize(turns_out, wall)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--users", default="1,8,16,32")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--history-tokens", type=int, default=0, help="also: --history-users users with long conversations")
    ap.add_argument("--history-users", type=int, default=16)
    ap.add_argument("--history-name", default="long")
    a = ap.parse_args()
    from lmdeploy import pipeline  # noqa: PLC0415

    from model_loader.config import AppConfig  # noqa: PLC0415
    from model_loader.engines.lmdeploy_config import generation_config, turbomind_config  # noqa: PLC0415
    from model_loader.engines.seam import GenSettings  # noqa: PLC0415
    from model_loader.engines.turbomind import keep_special_ids  # noqa: PLC0415

    cfg = as_the_app_builds(AppConfig(text_model=str(TEXT)))  # the app's text engine: its ratio, "auto" resolved
    engine_cfg = turbomind_config(cfg, "text", awq=True)
    pipe = pipeline(str(TEXT), backend_config=engine_cfg, log_level="WARNING")
    keep_special_ids(pipe.tokenizer)  # as the app's engine does: like for like
    gen = generation_config(GenSettings(temperature=0, max_new_tokens=a.new_tokens, ignore_eos=True))
    users = [int(x) for x in a.users.split(",") if x]
    measure(pipe, gen, max(users), 1)  # warm-up at the largest batch, as bench_app warms the app
    if a.history_tokens:  # the long chats' histories in the prefix cache, as bench_app warms the app's
        measure(pipe, gen, a.history_users, a.turns, a.history_tokens)
    runs = {str(n): [] for n in users}
    for _ in range(a.runs):
        for n in users:  # interleaved, so drift over the run touches every user count alike
            runs[str(n)].append(measure(pipe, gen, n, a.turns))
        if a.history_tokens:
            runs.setdefault(a.history_name, []).append(measure(pipe, gen, a.history_users, a.turns, a.history_tokens))
    config = {
        k: getattr(engine_cfg, k)
        for k in ("cache_max_entry_count", "enable_prefix_caching", "max_batch_size", "quant_policy", "session_len")
    }
    print("RAW", json.dumps({"engine_config": config, "runs": runs}), flush=True)
    pipe.close()


if __name__ == "__main__":
    main()
