"""Realistic chat workloads for the GPU benches: conversations of a given length, users driving any ChatEngine
through the seam (tested on CPU with the fake engine), and the summary of what users saw (throughput, first text
median and p90, errors) with its spread over runs."""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import statistics
import time
from collections.abc import Callable

from bench.runs import percentile

FILLER = (
    "Shanghai is a city in China with a long history of trade, a busy port on the Huangpu river, and many "
    "museums, parks and restaurants that visitors like. "
)
BLOCK_SIZE = re.compile(r"\[BlockManager\] block_size = ([\d.]+) MB")
BLOCK_COUNT = re.compile(r"\[BlockManager\] max_block_count = (\d+)")
SESSION_CUT = re.compile(r"No enough blocks for `session_len` \((\d+)\), `session_len` truncated to (\d+)")


def history_of(user: int, tokens: int, count_tokens: Callable[[list[dict]], int], turn_tokens: int = 250) -> list[dict]:
    """A conversation of user/assistant turns of ~turn_tokens each, at least `tokens` long once templated; each
    user's text is their own from the first token, so users share no prefix in the KV cache."""
    if tokens <= 0:
        return []
    per = max(1, count_tokens([{"role": "user", "content": FILLER}]) - 4)
    reps = max(1, turn_tokens // per)
    history: list[dict] = []
    i = 0
    while not history or count_tokens(history) < tokens:
        role = "user" if i % 2 == 0 else "assistant"
        history.append({"role": role, "content": f"[user {user}, message {i}] " + FILLER * reps})
        i += 1
    if history[-1]["role"] == "user":  # the history ends with an answer; the next turn's question follows
        history.append({"role": "assistant", "content": "Noted."})
    return history


@functools.lru_cache(maxsize=4)
def token_counter(model_path: str) -> Callable[[list[dict]], int]:
    """Tokens of a conversation as the model's own tokenizer counts them (plus a few per message for the template):
    what history_of needs to build the same long conversations for the app and the raw engine."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    return lambda messages: sum(len(tok.encode(m["content"], add_special_tokens=False)) + 8 for m in messages)


def question(user: int, turn: int) -> dict:
    """The message a bench user sends on a turn (the same text through the app, the seam and the raw engine)."""
    return {"role": "user", "content": f"User {user}, turn {turn}: tell me more about the city, in detail."}


_sessions = itertools.count(1_000_000)


async def one_turn(engine, sid: int, messages: list[dict], settings) -> dict:
    """One reply through the engine seam: first text (ms), tokens, engine first token (ms), error, the reply."""
    from model_loader.engines.seam import Delta  # noqa: PLC0415

    t0 = time.perf_counter()
    first, text, stats = None, "", None
    try:
        async for item in engine.stream(sid, messages, settings):
            if isinstance(item, Delta):
                first = first or time.perf_counter()
                text += item.text
            else:
                stats = item
    except Exception as e:  # noqa: BLE001 - a failed turn is a result, not the end of the bench
        return {"first_ms": None, "tokens": 0, "engine_ttft_ms": None, "error": repr(e)[:200], "text": ""}
    ok = stats is not None and stats.finish_reason in ("length", "stop")
    return {
        "first_ms": None if first is None else 1000 * (first - t0),
        "tokens": stats.output_tokens if stats else 0,
        "engine_ttft_ms": round(1000 * stats.ttft_s, 1) if stats else None,
        "error": "" if ok else ((stats.error if stats else "no stats") or stats.finish_reason),
        "text": text,
    }


async def seam_users(engine, users: int, history_tokens: int, turns: int, new_tokens: int, timeout_s: float) -> dict:
    """`users` people at once through the seam, each with their own conversation of `history_tokens` (0: a new
    one), taking `turns` turns with replies of `new_tokens`; their summary, and the first turn's prompt length."""
    from model_loader.engines.seam import GenSettings  # noqa: PLC0415

    settings = GenSettings(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    histories = [history_of(u, history_tokens, engine.count_tokens) for u in range(users)]

    async def user(u: int) -> list[dict]:
        hist, out, sid = histories[u], [], next(_sessions)
        for t in range(turns):
            hist = hist + [question(u, t)]
            r = await one_turn(engine, sid, hist, settings)
            hist = hist + [{"role": "assistant", "content": r.pop("text") or "..."}]
            out.append({**r, "turn": t})
        return out

    t0 = time.perf_counter()
    per_user = await asyncio.wait_for(asyncio.gather(*[user(u) for u in range(users)]), timeout_s)
    wall = time.perf_counter() - t0
    flat = [t for ts in per_user for t in ts]
    res = summarize(flat, wall)
    res["first_ms_median_turn1"] = summarize([t for t in flat if t["turn"] == 0], wall)["first_ms_median"]
    res["prompt_tokens_turn1"] = engine.count_tokens(histories[0] + [question(0, 0)])
    return res


def summarize(turns: list[dict], wall_s: float) -> dict:
    """Users' view of one run: aggregate tokens/s over the wall time, first text median/p90/max in ms, errors.

    `turns` holds one dict per turn: first_ms (None when no text came), tokens, error ('' when none)."""
    firsts = [t["first_ms"] for t in turns if t.get("first_ms") is not None]
    errors = [t["error"] for t in turns if t.get("error")]
    tokens = sum(t.get("tokens", 0) for t in turns)
    engine = [t["engine_ttft_ms"] for t in turns if t.get("engine_ttft_ms") is not None]
    prompts = [t["prompt_tokens"] for t in turns if t.get("prompt_tokens")]
    return {
        "turns": len(turns),
        "tokens": tokens,
        "engine_ttft_ms_median": round(statistics.median(engine), 1) if engine else None,
        "wall_s": round(wall_s, 2),
        "tok_s": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        "first_ms_median": round(statistics.median(firsts), 1) if firsts else None,
        "first_ms_p90": round(percentile(firsts, 90), 1) if firsts else None,
        "first_ms_max": round(max(firsts), 1) if firsts else None,
        "errors": len(errors),
        "first_errors": errors[:3],
        **critical_path(turns),
        **({"prompt_tokens_median": statistics.median(prompts)} if prompts else {}),  # app and raw: the same prompts?
    }


def critical_path(turns: list[dict]) -> dict:
    """Where a run's wall time goes, from the turns' `start_s` and `end_s` (seconds after the run began) and
    `turn` (0, 1, ...): each round of turns' last start and last end (ms), and the median reply's decode time,
    first text to end (ms). A run ends with its last user's last turn, so the late starts are the app's cost."""
    timed = [t for t in turns if t.get("start_s") is not None and t.get("end_s") is not None]
    if not timed:
        return {}
    rounds = sorted({t.get("turn", 0) for t in timed})
    decode = [t["end_s"] - t["start_s"] - t["first_ms"] / 1000 for t in timed if t.get("first_ms") is not None]
    return {
        "last_start_ms": [round(1000 * max(t["start_s"] for t in timed if t.get("turn", 0) == r), 1) for r in rounds],
        "last_end_ms": [round(1000 * max(t["end_s"] for t in timed if t.get("turn", 0) == r), 1) for r in rounds],
        "decode_ms_median": round(1000 * statistics.median(decode), 1) if decode else None,
    }


def blocks_from_log(text: str) -> list[dict]:
    """TurboMind's own report of each KV cache it allocated (TM_LOG_LEVEL=INFO), in build order:
    block size in MiB and block count, and the session length it had to cut, if any."""
    sizes = [float(m.group(1)) for m in BLOCK_SIZE.finditer(text)]
    counts = [int(m.group(1)) for m in BLOCK_COUNT.finditer(text)]
    out = [{"block_mib": s, "blocks": c} for s, c in zip(sizes, counts)]
    cuts = [(int(m.group(1)), int(m.group(2))) for m in SESSION_CUT.finditer(text)]
    for entry, (asked, got) in zip(out, cuts):
        entry["session_cut"] = {"asked": asked, "got": got}  # order is only a guess when one of two is cut
    return out


def match_blocks(reported: list[dict], planned: dict[str, dict]) -> dict[str, dict]:
    """Pair TurboMind's reports with the planner's engines by block size (each engine's block differs)."""
    out = {}
    for kind, p in planned.items():
        best = min(reported, key=lambda r: abs(r["block_mib"] - p["block_mib"]), default=None)
        if best is None or abs(best["block_mib"] - p["block_mib"]) > 0.01 * p["block_mib"] + 0.002:
            out[kind] = {"planned_blocks": p["blocks"], "turbomind_blocks": None, "error_pct": None}
            continue
        err = 100 * (p["blocks"] - best["blocks"]) / best["blocks"] if best["blocks"] else None
        out[kind] = {
            "planned_blocks": p["blocks"],
            "turbomind_blocks": best["blocks"],
            "error_pct": None if err is None else round(err, 2),
            "block_mib": best["block_mib"],
        }
    return out


def spread(values: list[float]) -> dict:
    """Median and range of one figure over repeated runs."""
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "runs": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)}
