"""Capacity on an A10-sized card: a ballast leaves 22.5 GiB free, the app's start-up path builds both engines, and
users hold conversations of 1k and 3k tokens of history over several turns, for each text KV setting.

    python -m bench.a10_capacity [--kv auto,int8] [--vision-kv int8] [--kv-ratio 0.4] [--text-kv-ratio 0.7]
                                 [--users 1,8,16,32] [--history 1024,3072] [--turns 3] [--new-tokens 256]
                                 [--via seam|app [--[no-]engine-process]] [--budget-s 480]

Without flags it runs the app's own defaults (AppConfig): `--kv` lists the text cache's settings (auto is resolved by
the same plan as the app's), LLaVA keeps --vision-kv, and each engine its KV ratio.
Each KV setting runs in a fresh process (the engines restart) beside one ballast process (bench/ballast.py). The
seam mode drives LmdeployEngine.stream, as the UI does; `--via app` starts `python -m bench.serve` and drives it
over Gradio's SSE, one session per user. TurboMind's own report of the KV blocks it allocated (TM_LOG_LEVEL=INFO)
is set beside the planner's count. Writes $OUT/a10_capacity.json, .md and .png; prints a short summary.
Throughput and latency are the big card's compute; only the memory (cache sizes, who waits) is the A10's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from datetime import date

from bench.runs import OUT, TEXT, VISION, ballast, save, stop_app
from bench.workload import blocks_from_log, match_blocks, one_turn, seam_users, summarize

FREE_GIB = 22.5
PORT = 7861


def parse_args(argv: list[str]) -> argparse.Namespace:
    from model_loader.config import AppConfig  # noqa: PLC0415

    d = AppConfig()
    ap = argparse.ArgumentParser(prog="python -m bench.a10_capacity")
    ap.add_argument(
        "--kv", default=d.text_kv_quant, help="text KV settings to run, comma-separated (each ~2 min; default: the app's)"
    )
    ap.add_argument("--vision-kv", default=d.vision_kv_quant, help="LLaVA's KV setting (default: the app's)")
    ap.add_argument("--kv-ratio", type=float, default=d.kv_ratio, help="LLaVA's KV ratio (default: the app's)")
    ap.add_argument("--text-kv-ratio", type=float, default=d.text_kv_ratio, help="the text KV ratio (default: the app's)")
    ap.add_argument("--users", default="1,8,16,32", help="concurrent users, comma-separated")
    ap.add_argument("--history", default="1024,3072", help="tokens of history each conversation starts with")
    ap.add_argument("--turns", type=int, default=3, help="turns each user takes")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens of each reply (ignore_eos)")
    ap.add_argument("--via", choices=("seam", "app"), default="seam")
    ap.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=d.engine_process,
        help="with --via app: the app's engines in a child process (default: the app's); the seam mode drives the "
        "engines in this process",
    )
    ap.add_argument("--budget-s", type=float, default=480, help="stop starting new measurements after this long")
    ap.add_argument("--free-gib", type=float, default=FREE_GIB)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)  # one KV setting, run by the parent
    a = ap.parse_args(argv)
    a.kv_list = [k for k in a.kv.split(",") if k]
    a.users_list = [int(x) for x in a.users.split(",") if x]
    a.history_list = [int(x) for x in a.history.split(",") if x]
    return a


def app_flags(a: argparse.Namespace, kv: str) -> list[str]:
    """The app's flags for this run: the models, the text KV setting `kv`, LLaVA's, and each engine's ratio."""
    return [
        *("--text-model", str(TEXT), "--vision-model", str(VISION), "--text-kv-quant", kv),
        *("--vision-kv-quant", a.vision_kv, "--kv-ratio", str(a.kv_ratio), "--text-kv-ratio", str(a.text_kv_ratio)),
        "--engine-process" if a.engine_process else "--no-engine-process",
    ]


def app_config(a: argparse.Namespace, kv: str):
    """The AppConfig the app builds from app_flags (the seam mode starts engines with it)."""
    from model_loader.config import from_args  # noqa: PLC0415

    return from_args(app_flags(a, kv), {})[0]


def seam_config(a: argparse.Namespace, kv: str):
    """app_config with the engines in this process: the seam mode drives LmdeployEngine itself (and reads its pipe's
    metrics)."""
    return dataclasses.replace(app_config(a, kv), engine_process=False)


def planned(a: argparse.Namespace, kv: str) -> dict:
    """The planner's view of this card now, for this KV setting: blocks and tokens per engine, and the plan text."""
    from model_loader.memory import kv_cache, planner  # noqa: PLC0415
    from model_loader.memory.gpu import gpu_memory  # noqa: PLC0415

    cfg = app_config(a, kv)
    mem = gpu_memory()
    specs = [planner.spec_from_path(VISION, VISION.name), planner.spec_from_path(TEXT, TEXT.name)]
    plan = planner.plan_for_config(cfg, specs, mem.total_mib, mem.free_mib, mem.used_mib)
    engines = {
        e.kind: {
            "blocks": e.kv_blocks,
            "tokens": e.kv_tokens,
            "block_mib": round(e.kv_bytes_per_token * kv_cache.CACHE_BLOCK_SEQ_LEN / 2**20, 3),
            "used_after_mib": round(plan.used_after(i)),
            **kv_cache.capacity(e),
        }
        for i, e in enumerate(plan.engines)
    }
    return {
        "free_mib": mem.free_mib,
        "used_mib": mem.used_mib,
        "fits": plan.fits,
        "engines": engines,
        "text": planner.format_plan(plan),
    }


def grid(a: argparse.Namespace, kv: str, deadline: float, measure) -> list[dict]:
    """Every history length x user count, each `measure(history, users) -> dict`, until the deadline; a failed
    measurement is recorded and the next one runs."""
    runs = []
    for hist in a.history_list:
        for n in a.users_list:
            key = {"history": hist, "users": n}
            if time.perf_counter() > deadline:
                runs.append({**key, "skipped": "time budget"})
                continue
            try:
                runs.append({**key, **measure(hist, n)})
            except Exception as e:  # noqa: BLE001 - record and go on
                traceback.print_exc()
                runs.append({**key, "error": repr(e)[:300]})
            print("RUN", kv, json.dumps(runs[-1]), flush=True)
    return runs


def turbomind_metrics(engine) -> dict:
    """The engine's own block counts (lmdeploy 0.11.1 TurboMind.get_schedule_metrics)."""
    try:
        m = engine.pipe.engine.get_schedule_metrics()
        return {"total_blocks": m.total_blocks, "free_blocks": m.free_blocks, "active_blocks": m.active_blocks}
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)[:200]}


def vision_users(vision, users: int, new_tokens: int = 64) -> dict:
    """LLaVA too: `users` image questions at once, then a follow-up turn each."""
    from PIL import Image  # noqa: PLC0415

    from model_loader.engines.seam import GenSettings  # noqa: PLC0415

    img = Image.new("RGB", (640, 480), (200, 30, 30))
    settings = GenSettings(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)

    async def user(u: int) -> list[dict]:
        hist = [
            {"role": "user", "content": [{"type": "text", "text": f"user {u}: what is here?"}, {"type": "image", "image": img}]}
        ]
        a = await one_turn(vision, 900_000 + u, hist, settings)
        hist += [{"role": "assistant", "content": a.pop("text") or "..."}, {"role": "user", "content": "And the colour?"}]
        b = await one_turn(vision, 900_000 + u, hist, settings)
        b.pop("text")
        return [a, b]

    async def run() -> dict:
        t0 = time.perf_counter()
        res = await asyncio.wait_for(asyncio.gather(*[user(u) for u in range(users)]), 120)
        return summarize([t for ts in res for t in ts], time.perf_counter() - t0)

    return asyncio.run(run())


def run_setting_seam(a: argparse.Namespace, kv: str, deadline: float) -> dict:
    """One KV setting in this (fresh) process: plan, build through Startup, read the blocks, run the users."""
    from model_loader.memory.gpu import gpu_memory  # noqa: PLC0415
    from model_loader.startup import Startup  # noqa: PLC0415

    r: dict = {"kv": kv, "plan": planned(a, kv)}
    st = Startup(seam_config(a, kv), dict(os.environ))
    t0 = time.perf_counter()
    st.build_all()
    r["build_s"] = round(time.perf_counter() - t0, 1)
    r["slots"] = {
        k: {"state": s.state, "message": s.message[:300], "used_after_mib": s.used_mib_after} for k, s in st.slots.items()
    }
    text, vision = st.slots["text"].engine, st.slots["vision"].engine
    if text is None:
        r["error"] = "the text engine did not start"
        return r
    asyncio.run(seam_users(text, 1, 64, 1, 8, 60))  # warm-up, and the metrics get their first update
    r["metrics"] = {"text": turbomind_metrics(text)}
    r["runs"] = grid(a, kv, deadline, lambda hist, n: asyncio.run(seam_users(text, n, hist, a.turns, a.new_tokens, 240)))
    if vision and time.perf_counter() < deadline:
        try:
            r["vision"] = {n: vision_users(vision, n) for n in (1, 8)}
        except Exception as e:  # noqa: BLE001
            r["vision"] = {"error": repr(e)[:300]}
        r["metrics"]["vision"] = turbomind_metrics(vision)  # after it ran: the metrics update with each step
    mem = gpu_memory()
    r["free_mib_end"] = mem.free_mib if mem else None
    return r


def run_setting_app(a: argparse.Namespace, kv: str, deadline: float) -> dict:
    """One KV setting through the launched app (`python -m bench.serve`), users over SSE, one session each."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from bench.pages import app_conversations, wait_ready  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(str(TEXT), trust_remote_code=True)

    def count_tokens(messages: list[dict]) -> int:  # close enough to the template's count for sizing histories
        return sum(len(tok.encode(m["content"])) + 5 for m in messages)

    r: dict = {"kv": kv, "via": "app", "plan": planned(a, kv)}
    url = f"http://127.0.0.1:{PORT}/"
    cmd = [sys.executable, "-m", "bench.serve", *app_flags(a, kv), "--host", "127.0.0.1", "--port", str(PORT)]
    log_path = OUT / f"a10_capacity-app-{kv}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        r["startup"] = asyncio.run(wait_ready(url, 300))

        def measure(hist: int, n: int) -> dict:
            turns, wall = asyncio.run(app_conversations(url, n, hist, a.turns, a.new_tokens, count_tokens))
            return summarize(turns, wall)

        r["runs"] = grid(a, kv, deadline, measure)
    finally:
        stop_app(proc)
    r["turbomind_reported"] = blocks_from_log(log_path.read_text(errors="replace"))
    return r


def child(a: argparse.Namespace) -> int:
    """One KV setting; writes $OUT/a10_capacity-KV.json."""
    deadline = time.perf_counter() + a.budget_s
    run = run_setting_app if a.via == "app" else run_setting_seam
    try:
        r = run(a, a.child, deadline)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        r = {"kv": a.child, "error": repr(e)[:600]}
    save(f"a10_capacity-{a.child}.json", r)
    os._exit(0)  # lmdeploy's threads can hold the interpreter at exit; the results are written


def compare_blocks(r: dict, log_text: str) -> None:
    """TurboMind's reported blocks (log, and its metrics) against the planner's, per engine."""
    engines = (r.get("plan") or {}).get("engines") or {}
    reported = r.get("turbomind_reported") or blocks_from_log(log_text)
    r["turbomind_reported"] = reported
    r["blocks"] = match_blocks(reported, engines)
    metrics = r.get("metrics") or {}
    for kind, m in metrics.items():
        if m and "total_blocks" in m and kind in r["blocks"]:
            r["blocks"][kind]["metrics_total_blocks"] = m["total_blocks"]


def kv_label(r: dict) -> str:
    """The text KV setting run, with what the plan resolved "auto" to: 'auto -> int4'."""
    resolved = ((r.get("plan") or {}).get("engines") or {}).get("text", {}).get("kv_quant", r["kv"])
    return r["kv"] if resolved == r["kv"] else f"{r['kv']} -> {resolved}"


def report(results: list[dict], a: argparse.Namespace, gpu: str, ball: dict) -> None:
    """a10_capacity.md (tables) and a10_capacity.png (throughput and first text by users, per KV setting)."""
    lines = [
        f"Measured {date.today()} on {gpu} with a ballast leaving {a.free_gib} GiB free (an A10's memory, this GPU's "
        f"compute); lmdeploy 0.11.1 TurboMind, synthetic full-size LLaVA-1.5-7B then InternLM2-1.8B AWQ, KV ratio "
        f"{a.kv_ratio:g} (LLaVA) and {a.text_kv_ratio:g} (text), LLaVA's KV {a.vision_kv}; KV below is the text cache's; "
        f"through {'the launched app (SSE)' if a.via == 'app' else 'the engine seam (LmdeployEngine.stream)'}; "
        f"{a.turns} turns per user, {a.new_tokens} new tokens per reply. Ballast: {json.dumps(ball)}.",
        "",
        "| KV | history | users | tok/s | first text median | p90 | max | errors | 4k conversations held |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        held = ((r.get("plan") or {}).get("engines") or {}).get("text", {}).get("conversations", {}).get("4k")
        kv = kv_label(r)
        for x in r.get("runs", []):
            if "tok_s" not in x:
                lines.append(f"| {kv} | {x['history']} | {x['users']} | {x.get('skipped') or x.get('error')} | | | | | |")
                continue
            lines.append(
                f"| {kv} | {x['history']} | {x['users']} | {x['tok_s']:,.0f} | {x['first_ms_median']} ms | "
                f"{x['first_ms_p90']} ms | {x['first_ms_max']} ms | {x['errors']} | {held} |"
            )
    lines += ["", "| KV | engine | planner: blocks (tokens) | TurboMind: blocks | planner error |", "|---|---|---|---|---|"]
    for r in results:
        for kind, b in (r.get("blocks") or {}).items():
            tokens = r["plan"]["engines"][kind]["tokens"]
            lines.append(
                f"| {r['kv']} | {kind} | {b['planned_blocks']} ({tokens:,}) | {b.get('turbomind_blocks')} | "
                f"{b.get('error_pct')}% |"
            )
    (OUT / "a10_capacity.md").write_text("\n".join(lines) + "\n")
    try:
        draw(results, gpu, a.free_gib)
    except Exception as e:  # noqa: BLE001
        print("chart failed:", repr(e))


def draw(results: list[dict], gpu: str, free_gib: float) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    histories = sorted({x["history"] for r in results for x in r.get("runs", [])})
    fig, ax = plt.subplots(2, max(1, len(histories)), figsize=(5.5 * max(1, len(histories)), 7), squeeze=False)
    for j, h in enumerate(histories):
        for r in results:
            xs = [x for x in r.get("runs", []) if x["history"] == h and "tok_s" in x]
            users = [x["users"] for x in xs]
            ax[0][j].plot(users, [x["tok_s"] for x in xs], "o-", label=f"KV {kv_label(r)}")
            ax[1][j].plot(users, [x["first_ms_median"] for x in xs], "o-", label=f"KV {kv_label(r)} median")
            ax[1][j].plot(users, [x["first_ms_p90"] for x in xs], "x--", label=f"KV {kv_label(r)} p90")
        ax[0][j].set_title(f"{h:,} tokens of history")
        ax[0][j].set_ylabel("aggregate tokens/s")
        ax[1][j].set_ylabel("first text, ms")
        ax[1][j].set_xlabel("concurrent users")
        ax[0][j].legend()
        ax[1][j].legend(fontsize=7)
    fig.suptitle(f"{gpu}, {free_gib} GiB free (A10 memory), lmdeploy 0.11.1 TurboMind")
    fig.tight_layout()
    fig.savefig(OUT / "a10_capacity.png", dpi=90)


def child_args(a: argparse.Namespace) -> list[str]:
    """The parent's choices, for a child that runs one KV setting."""
    return [
        *("--users", a.users, "--history", a.history, "--turns", str(a.turns), "--new-tokens", str(a.new_tokens)),
        *("--via", a.via, "--free-gib", str(a.free_gib), "--vision-kv", a.vision_kv),
        *("--kv-ratio", str(a.kv_ratio), "--text-kv-ratio", str(a.text_kv_ratio)),
        "--engine-process" if a.engine_process else "--no-engine-process",
    ]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.child:
        return child(a)
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # checkpoints in their own process, so this one never holds a CUDA context beside the ballast
    subprocess.run([sys.executable, "-c", "from bench.runs import ensure_checkpoints as e; print(e())"], check=True)
    from model_loader.memory.gpu import gpu_memory  # noqa: PLC0415

    mem = gpu_memory()
    gpu = mem.name if mem else "no GPU"
    results = []
    with ballast(a.free_gib) as ball:
        print("ballast:", ball, flush=True)
        for i, kv in enumerate(a.kv_list):
            left = (a.budget_s - (time.perf_counter() - t0)) / (len(a.kv_list) - i)  # this setting's share
            if left < 60:
                results.append({"kv": kv, "skipped": "time budget"})
                continue
            log_path = OUT / f"a10_capacity-{kv}.log"
            cmd = [sys.executable, "-m", "bench.a10_capacity", *child_args(a), "--child", kv, "--budget-s", str(left - 45)]
            try:
                with open(log_path, "w") as log:
                    env = {**os.environ, "TM_LOG_LEVEL": "INFO"}
                    rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=left + 60).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            path = OUT / f"a10_capacity-{kv}.json"
            r = (
                json.loads(path.read_text())
                if path.is_file()
                else {"kv": kv, "error": f"no result (rc {rc}); see {log_path.name}"}
            )
            compare_blocks(r, log_path.read_text(errors="replace"))
            results.append(r)
            save("a10_capacity.json", {"gpu": gpu, "ballast": ball, "args": vars(a), "settings": results})
    report(results, a, gpu, ball)
    for r in results:
        print(r["kv"], "blocks:", json.dumps(r.get("blocks")), flush=True)
        for x in r.get("runs", []):
            print(
                f"  {r['kv']:>5} hist {x['history']:>5} users {x['users']:>3}: {x.get('tok_s')} tok/s, first text "
                f"{x.get('first_ms_median')} / p90 {x.get('first_ms_p90')} ms, errors {x.get('errors', x.get('error'))}"
            )
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {OUT}/a10_capacity.json, .md, .png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
