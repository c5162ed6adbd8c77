"""The running app against the raw engine, in one run on a CUDA machine.

Starts the app (`python -m bench.serve`, so every reply is max_new_tokens long, as the raw numbers are) over
the full-size synthetic checkpoints, drives it as a browser would (streaming, one asyncio SSE stream per
user, bench/sse_client.py; gradio_client for the functional checks), then measures the raw lmdeploy pipeline on
the same GPU. Writes $OUT/app.json, a Markdown table ($OUT/bench.md) and a chart ($OUT/bench.png).

    python -m bench.bench_app
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import date

from bench.runs import OUT, TEXT, VISION, save
from bench.sse_client import assistant_text, chat_users, conversations, disconnect_midstream, image_users
from model_loader.memory.gpu import gpu_memory

PORT = 7860
URL = f"http://127.0.0.1:{PORT}/"
STATS = re.compile(r"(\d+) tokens · ([\d.]+) tokens/s · first token (\d+) ms")
R: dict = {}


def user_msg(text):
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def start_app():
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [
        sys.executable,
        "-m",
        "bench.serve",
        "--text-model",
        str(TEXT),
        "--vision-model",
        str(VISION),
        "--host",
        "127.0.0.1",
        "--port",
        str(PORT),
        "--log-level",
        "WARNING",
    ]
    log = open(OUT / "app.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    from gradio_client import Client

    client, ui_s = None, None
    while time.perf_counter() - t0 < 240:
        try:
            client = client or Client(URL, verbose=False)
            ui_s = ui_s or time.perf_counter() - t0
            st = client.predict(api_name="/status")
            if all(v["state"] in ("ready", "failed", "disabled") for v in st.values()):
                R["startup"] = {"ui_up_s": round(ui_s, 1), "ready_s": round(time.perf_counter() - t0, 1), "status": st}
                return proc
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise RuntimeError("the app did not become ready in 240 s")


def chat_once(client, text, max_new=256):
    """One streamed reply through the UI's /chat route: client-side TTFT, tokens and tok/s from the stats line."""
    t0 = time.perf_counter()
    job = client.submit(user_msg(text), "", 0.0, 0.8, 40, max_new, 1.0, 0, api_name="/chat")
    first = None
    for update in job:
        hist = update[0]
        if first is None and hist and hist[-1].get("role") == "assistant":
            content = hist[-1].get("content")
            txt = content[0].get("text", "") if isinstance(content, list) and content else content
            if txt:
                first = time.perf_counter()
    out = job.outputs()[-1]
    end = time.perf_counter()
    m = STATS.search(out[1] or "")
    tokens = int(m.group(1)) if m else 0
    return {
        "client_ttft_ms": round(1000 * ((first or end) - t0), 1),
        "tokens": tokens,
        "engine_ttft_ms": int(m.group(3)) if m else None,
        "total_s": end - t0,
        "client_tok_s": round((tokens - 1) / (end - (first or t0)), 1) if tokens > 1 else 0,
    }


def image_question(client):
    """One image question through /image_chat (after a warm-up one): client first text and total time."""
    from gradio_client import handle_file
    from PIL import Image

    p = OUT / "red.png"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(p)
    client.predict(handle_file(str(p)), [], api_name="/set_image")  # checks and converts the upload
    hist = user_msg("What is in this image?")
    out = {}
    for run in ("cold", "warm"):
        t0 = time.perf_counter()
        job = client.submit(handle_file(str(p)), hist, 0.0, 64, api_name="/image_chat")
        first = None
        for update in job:
            if first is None and assistant_text(update[0]):
                first = time.perf_counter()
        end = time.perf_counter()
        out[run] = {
            "client_ttft_ms": round(1000 * ((first or end) - t0), 1),
            "total_s": round(end - t0, 2),
            "stats": job.outputs()[-1][1],
        }
    out.update(out["warm"])
    return out


def stop_check(client):
    """Start a long reply, press Stop, and see the engine idle again."""
    job = client.submit(user_msg("a long story please"), "", 0.0, 0.8, 40, 4000, 1.0, 0, api_name="/chat")
    time.sleep(1.0)
    client.predict(api_name="/stop")
    time.sleep(1.0)
    return {"status_after_stop": client.predict(api_name="/status"), "job_done": job.done()}


def raw_numbers():
    from lmdeploy import GenerationConfig, TurbomindEngineConfig, pipeline

    pipe = pipeline(
        str(TEXT),
        backend_config=TurbomindEngineConfig(model_format="awq", cache_max_entry_count=0.1, session_len=8192, max_batch_size=32),
        log_level="ERROR",
    )
    gen = GenerationConfig(max_new_tokens=256, ignore_eos=True)
    pipe(["warm up"], gen_config=gen)
    out = {}
    ttfts, rates = [], []
    for _ in range(4):
        t0 = time.perf_counter()
        first = None
        n = 0
        for o in pipe.stream_infer(["Hi, please introduce yourself"], gen_config=gen):
            if first is None and o.generate_token_len > 0:
                first = time.perf_counter()
            n = o.generate_token_len
        end = time.perf_counter()
        ttfts.append(1000 * (first - t0))
        rates.append((n - 1) / (end - first))
    out["b1_ttft_ms"] = round(statistics.median(ttfts[1:]), 1)
    out["b1_tok_s"] = round(statistics.median(rates[1:]), 1)
    for n in (8, 16, 32):
        t0 = time.perf_counter()
        res = pipe([f"user {i}: tell me a story" for i in range(n)], gen_config=gen)
        out[f"b{n}_tok_s"] = round(sum(r.generate_token_len for r in res) / (time.perf_counter() - t0), 1)
    pipe.close()
    return out


def write_report():
    app, raw = R.get("app", {}), R.get("raw", {})
    gpu = R.get("gpu", "GPU")
    rows = [
        ("batch-1 decode tokens/s", raw.get("b1_tok_s"), app.get("b1_tok_s"), "≥ 0.95"),
        ("time to first token, ms", raw.get("b1_ttft_ms"), app.get("b1_client_ttft_ms"), "< raw + 50 ms"),
    ]
    for n in (8, 16, 32):
        rows.append(
            (
                f"{n} users, aggregate tokens/s",
                raw.get(f"b{n}_tok_s"),
                app.get(f"n{n}", {}).get("agg_tok_s"),
                "≥ 0.8" if n == 16 else "",
            )
        )
    lines = [
        f"Measured {date.today()} on {gpu}, lmdeploy 0.11.1 TurboMind, synthetic full-size InternLM2-Chat-1.8B "
        "AWQ (256 new tokens per reply); app = `python app.py`, one browser-like SSE stream per user "
        "(bench/sse_client.py).",
        "",
        "| measure | raw pipeline | through the app | app / raw | target |",
        "|---|---|---|---|---|",
    ]
    for name, r, a, target in rows:
        ratio = f"{a / r:.2f}" if r and a and "ms" not in name else (f"+{a - r:.0f} ms" if r and a else "")
        lines.append(f"| {name} | {r} | {a} | {ratio} | {target} |")
    img = R.get("image", {})
    lines.append(
        f"| image question (640x480, 64 tokens, warm): first text at the client / total | | "
        f"{img.get('client_ttft_ms')} ms / {img.get('total_s')} s | | |"
    )
    st = R.get("startup", {})
    lines.append(
        f"| start-up, weights on disk: UI up / both engines ready | | {st.get('ui_up_s')} s / {st.get('ready_s')} s | | |"
    )
    (OUT / "bench.md").write_text("\n".join(lines) + "\n")
    try:
        from bench.chart import draw

        draw(app, raw, R.get("engines_ratios") or [], gpu, OUT / "bench.png")
    except Exception as e:  # noqa: BLE001
        R["chart_error"] = repr(e)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    mem = gpu_memory()
    R["gpu"] = mem.name if mem else "no GPU"
    eng = OUT / "engines.json"
    if eng.is_file():
        R["engines_ratios"] = [r for r in json.loads(eng.read_text()).get("ratios", []) if r.get("prefix_caching")]
    proc = start_app()
    try:
        from gradio_client import Client

        c = Client(URL, verbose=False)
        chat_once(c, "warm up")
        R["app_gradio_client_b1"] = chat_once(c, "Hi, please introduce yourself")  # the library's own overhead
        asyncio.run(chat_users(URL, 1))
        b1 = [asyncio.run(chat_users(URL, 1))["users"][0] for _ in range(3)]
        R["app"] = {
            "b1": b1,
            "b1_tok_s": statistics.median(x["client_tok_s"] for x in b1),
            "b1_server_tok_s": statistics.median(x["server_tok_s"] for x in b1),
            "b1_client_ttft_ms": statistics.median(x["client_ttft_ms"] for x in b1),
        }
        for n in (8, 16, 32):
            r = asyncio.run(chat_users(URL, n))
            users = r.pop("users")
            r["median_client_ttft_ms"] = statistics.median(u["client_ttft_ms"] for u in users)
            r["median_server_tok_s"] = statistics.median(u["server_tok_s"] for u in users)
            r["tokens"] = sorted({u["tokens"] for u in users})
            r["client_ttft_ms"] = sorted(u["client_ttft_ms"] for u in users)
            r["engine_ttft_ms"] = sorted(u["engine_ttft_ms"] or 0 for u in users)
            R["app"][f"n{n}"] = r
        save("app.json", R)
        R["image_gradio_client"] = image_question(c)
        img = str(OUT / "red.png")
        runs = [asyncio.run(image_users(URL, 1, img)) for _ in range(3)]
        warm = runs[-1]["users"][0]
        R["image"] = {
            "cold": runs[0]["users"][0],
            "client_ttft_ms": warm["client_ttft_ms"],
            "total_s": warm["total_s"],
            "engine_ttft_ms": warm["engine_ttft_ms"],
        }
        four = asyncio.run(image_users(URL, 4, img))
        R["image"]["four_users_wall_s"], R["image"]["four_users_errors"] = four["wall_s"], four["errors"]
        R["stop"] = stop_check(c)
        R["conversations_64x5"] = asyncio.run(conversations(URL, 64, 5))
        asyncio.run(disconnect_midstream(URL, 16))
        time.sleep(1.5)
        R["after_16_disconnects"] = c.predict(api_name="/status")
        save("app.json", R)
    finally:
        proc.terminate()
        proc.wait(30)
    R["raw"] = raw_numbers()
    write_report()
    save("app.json", R)


if __name__ == "__main__":
    main()
