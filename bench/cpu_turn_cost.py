"""Where the app's time goes per turn, measured on CPU with the fake engine (no GPU): a new session's set-up, the
events a turn runs, the streamed updates' count and size, and returning users at 1-32 at once against the same
engine driven directly. Optionally a py-spy profile of the server during the 32-user run.

    python -m bench.cpu_turn_cost [--users 1,8,16,32] [--new-tokens 256] [--token-ms 3] [--profile]

The app runs in a child process (`--serve PORT`), as in production; the measuring client shares the machine's
cores with it, so absolute times are upper bounds. Writes $OUT/cpu_turn_cost.json and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter

from bench.runs import OUT, save

PORT = 7871
URL = f"http://127.0.0.1:{PORT}/"


def fake_engines(token_ms: float):
    """Fake engines whose replies are as long as asked (ignore_eos), one token every `token_ms`."""
    from tests.fakes import FakeEngine  # noqa: PLC0415

    class LongReplies(FakeEngine):
        def reply_for(self, messages: list[dict]) -> str:
            return " ".join(["word"] * 8192)

    return LongReplies("text", delay_s=token_ms / 1000), FakeEngine("vision", delay_s=token_ms / 1000)


def build(token_ms: float):
    """The real page over fake engines, as app.py builds it."""
    from tests.conftest import fake_startup  # noqa: PLC0415
    from ui.page import build_demo, launch_kwargs  # noqa: PLC0415

    text, vision = fake_engines(token_ms)
    st = fake_startup(text, vision, host="127.0.0.1", port=PORT)
    demo, i18n = build_demo(st.slots, st.cfg, st.system_info)
    return demo, launch_kwargs(st.cfg, i18n), text


def serve(token_ms: float) -> None:
    """--serve: the app over fake engines on PORT until killed."""
    demo, kw, _ = build(token_ms)
    demo.launch(**{**kw, "quiet": True})


def new_session_cost(token_ms: float, n: int = 50) -> dict:
    """Gradio's per-session set-up (SessionState: config_for_block of every block), timed in this process."""
    from gradio.state_holder import SessionState  # noqa: PLC0415

    demo, _, _ = build(token_ms)
    demo.default_config  # noqa: B018 - built lazily at launch; get_config_file fills it below
    demo.get_config_file()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        SessionState(demo)
        times.append(1000 * (time.perf_counter() - t0))
    return {"blocks": len(demo.blocks), "session_state_ms_median": round(statistics.median(times), 2)}


async def http_new_vs_returning(n: int = 30) -> dict:
    """The same cheap queue=False event (the page's 1 s status tick) with a new session hash vs a returning one."""
    import httpx  # noqa: PLC0415

    from bench.pages import Page, deps_where, input_defaults  # noqa: PLC0415

    async with httpx.AsyncClient(timeout=60) as http:
        config = (await http.get(URL + "config")).json()
        tick = next(d for d in deps_where(config, "tick") if not d.get("inputs"))
        returning = Page(http, URL, config)
        await returning.predict(tick["id"], [])
        out = {}
        for label in ("returning", "new"):
            times = []
            for _ in range(n):
                page = returning if label == "returning" else Page(http, URL, config)
                t0 = time.perf_counter()
                await page.predict(tick["id"], input_defaults(config, tick))
                times.append(1000 * (time.perf_counter() - t0))
            out[f"{label}_ms_median"] = round(statistics.median(times), 2)
        loads = []
        for _ in range(10):
            loads.append(1000 * await Page(http, URL, config).load())
        out["page_load_ms_median"] = round(statistics.median(loads), 1)
    return out


async def turn_anatomy() -> dict:
    """What one press of Enter runs: the events of the chain and whether each goes through the queue."""
    import httpx  # noqa: PLC0415

    from bench.pages import then_steps
    from bench.sse_client import fn_index  # noqa: PLC0415

    async with httpx.AsyncClient(timeout=60) as http:
        config = (await http.get(URL + "config")).json()
    add = fn_index(config, "add_message")
    chain = [next(d for d in config["dependencies"] if d["id"] == add), *then_steps(config, add)]
    return {
        "events_per_turn": len(chain),
        "queued": sum(bool(d.get("queue")) for d in chain),
        "http_requests_per_turn": sum(1 if not d.get("queue") else 2 for d in chain),  # queued: join + SSE stream
        "components": len(config["components"]),
        "dependencies": len(config["dependencies"]),
        "timers": len(config and [d for d in config["dependencies"] if any(t[1] == "tick" for t in d["targets"] or [])]),
    }


async def payload(new_tokens: int, turns: int) -> dict:
    """One user: updates and SSE bytes per turn as the conversation grows (does an update's cost grow with it?)."""
    import httpx  # noqa: PLC0415

    from bench.pages import Page, gradio_phases  # noqa: PLC0415

    rows = []
    async with httpx.AsyncClient(timeout=120) as http:
        config = (await http.get(URL + "config")).json()
        page = Page(http, URL, config)
        await page.load()
        history: list = []
        await gradio_phases(http, URL)
        for t in range(turns):
            r = await page.turn(history, f"turn {t}: tell me more", new_tokens)
            history = r.pop("history")
            r["gradio"] = await gradio_phases(http, URL)
            rows.append(
                {
                    "turn": t,
                    "updates": r["updates"],
                    "bytes": r["bytes"],
                    "first_ms": r["first_ms"],
                    "history_words": sum(len(str(m["content"]).split()) for m in history),
                    "server_ms_per_update": r["gradio"].get("postprocess_and_diff_ms_per_update"),
                }
            )
    # the first update and the completion carry the whole history; the updates between them carry the new text
    return {"first": rows[0], "last": rows[-1]}


async def clear_phases() -> dict:
    """Gradio's timings of the chat event since the last call (and clear them)."""
    import httpx  # noqa: PLC0415

    from bench.pages import gradio_phases  # noqa: PLC0415

    async with httpx.AsyncClient(timeout=60) as http:
        return await gradio_phases(http, URL)


def concurrency(users: list[int], new_tokens: int, token_ms: float) -> dict:
    """Returning users through the app against the same fake engine driven directly (the seam), at once."""
    from bench.pages import users_on_pages  # noqa: PLC0415
    from bench.workload import seam_users, summarize  # noqa: PLC0415

    out = {}
    for n in users:
        asyncio.run(clear_phases())
        turns, wall, _ = asyncio.run(users_on_pages(URL, n, 2, new_tokens))
        app = summarize(turns, wall)
        phases = asyncio.run(clear_phases())
        gaps = sorted(
            t["first_ms"] - t["engine_ttft_ms"] for t in turns if t.get("first_ms") and t.get("engine_ttft_ms") is not None
        )
        text, _ = fake_engines(token_ms)
        seam = asyncio.run(seam_users(text, n, 0, 2, new_tokens, 300))
        out[str(n)] = {
            "app_tok_s": app["tok_s"],
            "seam_tok_s": seam["tok_s"],
            "app_over_seam": round(app["tok_s"] / seam["tok_s"], 2) if seam["tok_s"] else None,
            "app_first_ms_median": app["first_ms_median"],
            "client_minus_engine_ms_median": round(gaps[len(gaps) // 2], 1) if gaps else None,
            "updates_median": sorted(t["updates"] for t in turns)[len(turns) // 2],
            "errors": app["errors"],
            "gradio": phases,
        }
        print("USERS", n, json.dumps(out[str(n)]), flush=True)
    return out


def burst(n: int, new_tokens: int) -> dict:
    from bench.pages import users_on_pages  # noqa: PLC0415
    from bench.workload import summarize  # noqa: PLC0415

    turns, wall, loads = asyncio.run(users_on_pages(URL, n, 1, new_tokens, new_visitors=True))
    s = summarize(turns, wall)
    return {"users": n, "first_ms_median": s["first_ms_median"], "page_load_ms_median": statistics.median(loads["page_load_ms"])}


def profile_summary(raw_path) -> dict:
    """Share of the server's samples in the frames that matter, from py-spy's collapsed stacks."""
    watch = {
        "SessionState.__init__ (new session set-up)": "__init__ (gradio/state_holder.py",
        "config_for_block": "config_for_block",
        "queue: process_events": "process_events",
        "postprocess_data": "postprocess_data",
        "Chatbot postprocess": "chatbot.py",
        "diff of updates": "diff (gradio/utils.py",
        "orjson/json encoding": "dumps",
        "run/predict route": "predict (gradio/routes.py",
        "fake engine": "tests/fakes.py",
        "asyncio select (idle)": "select (selectors.py",
    }
    total, hits = 0, Counter()
    for line in open(raw_path, encoding="utf-8", errors="replace"):
        stack, _, count = line.rpartition(" ")
        if not count.strip().isdigit():
            continue
        c = int(count)
        total += c
        for label, needle in watch.items():
            if needle in stack:
                hits[label] += c
    return {"samples": total, "share_pct": {k: round(100 * v / total, 1) for k, v in hits.most_common()} if total else {}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_turn_cost")
    ap.add_argument("--users", default="1,8,16,32")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--token-ms", type=float, default=3.0, help="fake engine: ms per token per user")
    ap.add_argument("--profile", action="store_true", help="py-spy the server during the 32-user run")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.serve:
        serve(a.token_ms)
        return 0
    from bench.pages import wait_ready  # noqa: PLC0415

    res: dict = {"machine": f"CPU, {os.cpu_count()} cores, FakeEngine at {a.token_ms} ms/token per user"}
    res["new_session_in_process"] = new_session_cost(a.token_ms)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_PROFILING": "1", "PYTHONPATH": os.getcwd()}
    server = subprocess.Popen([sys.executable, "-m", "bench.cpu_turn_cost", "--serve", "--token-ms", str(a.token_ms)], env=env)
    try:
        asyncio.run(wait_ready(URL, 120))
        res["turn_anatomy"] = asyncio.run(turn_anatomy())
        res["new_vs_returning_http"] = asyncio.run(http_new_vs_returning())
        res["payload_1_turn_vs_20"] = asyncio.run(payload(a.new_tokens, 20))
        users = [int(x) for x in a.users.split(",") if x]
        spy = None
        pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
        if a.profile and pyspy:
            OUT.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "-r",
                    "100",
                    "-f",
                    "raw",
                    "-o",
                    str(OUT / "cpu_profile.txt"),
                    "--pid",
                    str(server.pid),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        res["returning_users"] = concurrency(users, a.new_tokens, a.token_ms)
        res["burst_new_visitors"] = burst(max(users), a.new_tokens)
        if spy:
            spy.send_signal(2)
            spy.wait(30)
            res["profile"] = profile_summary(OUT / "cpu_profile.txt")
    finally:
        server.terminate()
        server.wait(30)
    save("cpu_turn_cost.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
