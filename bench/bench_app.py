"""The running app against the raw engine, like for like, on one GPU.

    python -m bench.bench_app [--runs 5] [--users 1,8,16,32] [--turns 3] [--new-tokens 256] [--burst 32]
                              [--api-server] [--no-image]

1. The app (`python -m bench.serve`: every reply is --new-tokens long) over the full-size synthetic checkpoints,
   with users as browsers (bench/sse_client.py Page): each opens the page once, which makes its session, then takes
   --turns turns on it. Median and range over --runs runs for each user count.
2. A burst of --burst brand-new visitors at once: page load, then the first message.
3. The raw reference in a fresh process (bench/raw_reference.py): the app's engine config and the same
   conversations as N concurrent async `generate` streams in one process.
4. With --api-server, `lmdeploy serve api_server` with the same engine settings, driven by the app's own async
   client (ApiServerEngine) with the same conversations.
Writes $OUT/app.json, $OUT/bench.md and $OUT/bench.png, and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import date

from bench.pages import gradio_phases, users_in_browsers, users_on_pages, wait_ready
from bench.runs import OUT, TEXT, VISION, as_the_app_builds, engine_processes, host, save, stop_app
from bench.sse_client import image_in_page, image_users
from bench.timeline import events_for, joined, segments
from bench.workload import seam_users, spread, summarize

PORT = 7860
URL = f"http://127.0.0.1:{PORT}/"
API_PORT = 23333


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_app")
    ap.add_argument("--runs", type=int, default=5, help="repeats of every figure (median and range)")
    ap.add_argument("--users", default="1,8,16,32", help="concurrent returning users, comma-separated")
    ap.add_argument("--turns", type=int, default=3, help="turns per user after the page load")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--burst", type=int, default=32, help="brand-new visitors at once (0: skip)")
    ap.add_argument("--api-server", action="store_true", help="also measure `lmdeploy serve api_server`")
    ap.add_argument("--no-image", action="store_true", help="skip the image question")
    ap.add_argument(
        "--app-backend",
        choices=("engine-process", "in-process", "api_server"),
        default="engine-process",
        help="engine-process (the app's default): its TurboMind engines in a child process; in-process: in the web "
        "server's process (--no-engine-process); api_server: the app's text engine in its own process (`lmdeploy "
        "serve api_server`, the app's engine settings), the app as its client; text only",
    )
    ap.add_argument("--gradio-profile", action="store_true", help="GRADIO_PROFILING=1: Gradio's per-event timings too")
    ap.add_argument("--idle-pages", type=int, default=0, help="also: --case-users users with this many idle pages open")
    ap.add_argument("--history-tokens", type=int, default=0, help="also: --case-users users with conversations this long")
    ap.add_argument("--case-users", type=int, default=16, help="users for the idle-page and long-history cases")
    ap.add_argument("--timeline", action="store_true", help="where each turn's first-text wait goes (bench/timeline.py)")
    ap.add_argument("--no-raw", action="store_true", help="skip the raw reference (app-side experiments)")
    ap.add_argument("--settle-s", type=float, default=0.0, help="returning users: pause between page load and first press")
    ap.add_argument(
        "--users-per-client",
        type=int,
        default=0,
        help="users per measuring process, as people have browsers of their own (0: all in one process; 8 per process "
        "measured no better in round 8, 4 per process worse in round 11, on an H100: docs/throughput.md)",
    )
    ap.add_argument(
        "--py-spy", action="store_true", help="py-spy the app (all threads, and GIL holders) in the first run at most users"
    )
    a = ap.parse_args(argv)
    a.users_list = [int(x) for x in a.users.split(",") if x]
    return a


TIMELINE = OUT / "timeline.jsonl"


def start_app(
    log_path, gradio_profile: bool = False, server_url: str = "", timeline: bool = False, engine_process: bool = True
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.serve", "--text-model", str(TEXT), "--vision-model", str(VISION)]
    cmd += ["--host", "127.0.0.1", "--port", str(PORT), "--log-level", "WARNING"]
    cmd += ["--engine-process" if engine_process else "--no-engine-process"]
    if server_url:
        cmd += ["--backend", "api_server", "--text-server-url", server_url, "--no-enable-vision"]
    with open(log_path, "w") as log:
        return subprocess.Popen(
            cmd,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **({"BENCH_TIMELINE": str(TIMELINE)} if timeline else {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def client_minus_engine(turns: list[dict]) -> float | None:
    """Median of (first text at the client - the engine's first token), ms: what the app adds to the wait."""
    d = sorted(t["first_ms"] - t["engine_ttft_ms"] for t in turns if t.get("first_ms") and t.get("engine_ttft_ms") is not None)
    return round(d[len(d) // 2], 1) if d else None


def py_spy(pid: int, name: str, gil: bool = False) -> subprocess.Popen | None:
    """py-spy recording the app's threads (or only the GIL's holder) as collapsed stacks into $OUT/name."""
    import shutil  # noqa: PLC0415

    exe = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable)) or ".venv/bin/py-spy"
    if not os.path.exists(exe) and not shutil.which(exe):
        return None
    cmd = [exe, "record", "-r", "200", "-f", "raw", "--threads", "--nonblocking", "-o", str(OUT / name), "--pid", str(pid)]
    return subprocess.Popen(cmd + (["--gil"] if gil else []), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def app_runs(a: argparse.Namespace, pid: int = 0) -> dict:
    """Returning users: --runs runs of every user count, interleaved; each run's summary kept."""
    runs: dict[str, list] = {str(n): [] for n in a.users_list}
    # warm-up at the largest batch: the first run at a new batch size was the slowest of every call, app and raw alike
    asyncio.run(users_on_pages(URL, max(a.users_list), 1, a.new_tokens))
    extra = cases(a)
    for kw in extra.values():
        if kw.get("histories"):  # a long chat's history was its previous turn's prompt: in the prefix cache already
            users_in_browsers(URL, a.case_users, a.turns, a.new_tokens, a.users_per_client, **kw)
    if a.gradio_profile:
        asyncio.run(phases())  # clears the warm-up's timings
    for run in range(a.runs):
        for n in a.users_list:
            spies = []
            if a.py_spy and run == 0 and n == max(a.users_list):
                spies = [py_spy(pid, f"spy-{n}.txt"), py_spy(pid, f"spy-{n}-gil.txt", gil=True)]
                spies += [py_spy(c, f"spy-{n}-engines.txt") for c in engine_processes(pid)]
                spies = [s for s in spies if s]
            t_spy, cpu = time.perf_counter(), client_cpu_s()
            settle = {"settle_s": a.settle_s} if a.settle_s else {}
            turns, wall, loads = users_in_browsers(URL, n, a.turns, a.new_tokens, a.users_per_client, **settle)
            client_cpu = (client_cpu_s() - cpu) / (time.perf_counter() - t_spy)
            for spy in spies:
                spy.send_signal(2)
                spy.wait(30)
            if spies:
                print("SPY seconds", round(time.perf_counter() - t_spy, 2), flush=True)
            s = summarize(turns, wall)
            if a.gradio_profile:
                s["gradio"] = asyncio.run(phases())
            s["client_minus_engine_ms"] = client_minus_engine(turns)
            s["updates_median"] = sorted(t["updates"] for t in turns)[len(turns) // 2]
            s["sse_bytes_median"] = sorted(t["bytes"] for t in turns)[len(turns) // 2]
            s["client_cpu_pct"] = round(100 * client_cpu, 1)  # the measuring client's load (its processes, % of one core)
            if a.timeline:
                marks = joined(turns, events_for(TIMELINE, turns))
                s["timeline"] = segments(marks)
                with (OUT / "timeline-joined.jsonl").open("a") as f:  # every turn's marks, for tails and plots
                    f.writelines(json.dumps({"users": n, "run": run, **m}) + "\n" for m in marks)
            runs[str(n)].append(s)
            print("APP", n, json.dumps(s), flush=True)
        for name, kw in extra.items():
            turns, wall, loads = users_in_browsers(URL, a.case_users, a.turns, a.new_tokens, a.users_per_client, **kw)
            s = summarize(turns, wall)
            s["client_minus_engine_ms"] = client_minus_engine(turns)
            s["idle_ticks"] = loads.get("idle_ticks", 0)
            if a.timeline:
                s["timeline"] = segments(joined(turns, events_for(TIMELINE, turns)))
            runs.setdefault(name, []).append(s)
            print("APP", name, json.dumps(s), flush=True)
    return runs


def client_cpu_s() -> float:
    """CPU seconds of the measuring client: this process and its ended browser processes."""
    import resource  # noqa: PLC0415

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def cases(a: argparse.Namespace) -> dict[str, dict]:
    """The extra cases at --case-users users: idle pages open beside them, and long conversations."""
    from bench.pages import text_history  # noqa: PLC0415
    from bench.workload import history_of, token_counter  # noqa: PLC0415

    out: dict[str, dict] = {}
    if a.idle_pages:
        out[f"{a.case_users} + {a.idle_pages} idle pages"] = {"idle_pages": a.idle_pages}
    if a.history_tokens:
        count = token_counter(str(TEXT))
        histories = [text_history(history_of(u, a.history_tokens, count)) for u in range(a.case_users)]
        out[long_case(a)] = {"histories": histories}
    return out


def long_case(a: argparse.Namespace) -> str:
    return f"{a.case_users}, {a.history_tokens:,}-token conversations"


def raw_key(name: str) -> str:
    """The raw run an app row compares with: idle pages change nothing on the raw side."""
    return name.split(" + ")[0]


async def phases() -> dict:
    import httpx  # noqa: PLC0415

    async with httpx.AsyncClient(timeout=60) as http:
        return await gradio_phases(http, URL)


def burst_runs(a: argparse.Namespace) -> list[dict]:
    """Brand-new visitors at once: each loads the page (a new session) and sends its first message."""
    out = []
    for _ in range(a.runs):
        turns, wall, loads = users_in_browsers(URL, a.burst, 1, a.new_tokens, a.users_per_client, new_visitors=True)
        s = summarize(turns, wall)
        s["page_load_ms_median"] = loads["page_load_ms"][len(loads["page_load_ms"]) // 2] if loads["page_load_ms"] else None
        s["client_minus_engine_ms"] = client_minus_engine(turns)
        if a.timeline:
            s["timeline"] = segments(joined(turns, events_for(TIMELINE, turns)))
        out.append(s)
        print("BURST", json.dumps(s), flush=True)
    return out


def image_question() -> dict:
    """A warm image question at 640x480 and at 6000x6000 (a PNG the app must shrink before LLaVA sees it)."""
    from PIL import Image  # noqa: PLC0415

    small = OUT / "red.png"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(small)
    big = OUT / "big.png"
    ramp = Image.radial_gradient("L").resize((6000, 6000))
    Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM))).save(
        big
    )
    out = {}
    for name, path in (("640x480", small), ("6000x6000", big)):
        runs = [asyncio.run(image_users(URL, 1, str(path))) for _ in range(3)]
        warm = runs[-1]["users"][0]
        out[name] = {
            "cold": runs[0]["users"][0],
            "client_ttft_ms": warm["client_ttft_ms"],
            "total_s": warm["total_s"],
            "warm_runs_ttft_ms": [r["users"][0]["client_ttft_ms"] for r in runs[1:]],
            "errors": [r.get("errors") for r in runs],
            "file_mib": round(path.stat().st_size / 2**20, 1),
        }
    page = asyncio.run(image_in_page(URL, str(big)))  # dropped into the page first, then asked about
    warm = [q["client_ttft_ms"] for q in page.get("questions", [])[1:]]
    out["6000x6000 in the page"] = {
        **page,
        "client_ttft_ms": min(warm) if warm else None,
        "warm_runs_ttft_ms": warm,
        "total_s": page.get("questions", [{}])[-1].get("total_s"),
    }
    return out


def raw_reference(a: argparse.Namespace) -> dict:
    """bench/raw_reference.py in a fresh process (the app is gone by then: the GPU is the raw engine's alone)."""
    cmd = [sys.executable, "-m", "bench.raw_reference", "--runs", str(a.runs), "--users", a.users]
    cmd += ["--turns", str(a.turns), "--new-tokens", str(a.new_tokens)]
    if a.history_tokens:
        cmd += ["--history-tokens", str(a.history_tokens), "--history-users", str(a.case_users), "--history-name", long_case(a)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    for line in p.stdout.splitlines():
        if line.startswith("RAW "):
            return json.loads(line[4:])
    return {"error": (p.stderr or p.stdout)[-1500:], "rc": p.returncode}


def start_api_server(log_path) -> subprocess.Popen:
    """`lmdeploy serve api_server` over the text checkpoint with the app's text engine settings."""
    from model_loader.config import AppConfig  # noqa: PLC0415
    from model_loader.engines.lmdeploy_config import turbomind_config  # noqa: PLC0415

    e = turbomind_config(as_the_app_builds(AppConfig(text_model=str(TEXT))), "text", awq=True)
    cmd = [sys.executable, "-m", "lmdeploy", "serve", "api_server", str(TEXT), "--backend", "turbomind"]
    cmd += ["--model-format", "awq", "--cache-max-entry-count", str(e.cache_max_entry_count), "--enable-prefix-caching"]
    cmd += ["--max-batch-size", str(e.max_batch_size), "--session-len", str(e.session_len), "--quant-policy", str(e.quant_policy)]
    cmd += ["--server-name", "127.0.0.1", "--server-port", str(API_PORT), "--log-level", "WARNING"]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_api_server(url: str, timeout_s: float = 240) -> None:
    import httpx  # noqa: PLC0415

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"no api_server at {url} after {timeout_s} s")


def api_server_reference(a: argparse.Namespace) -> dict:
    """`lmdeploy serve api_server` with the app's engine settings, and the app's own client over it."""
    from model_loader.engines.api_server import ApiServerEngine  # noqa: PLC0415

    url = f"http://127.0.0.1:{API_PORT}"
    t0 = time.perf_counter()
    proc = start_api_server(OUT / "api_server.log")
    try:
        wait_api_server(url)

        async def everything() -> dict:
            eng = ApiServerEngine("text", url)
            await eng.connect()
            await seam_users(eng, 1, 0, 1, 16, 60)
            runs: dict[str, list] = {str(n): [] for n in a.users_list}
            for _ in range(a.runs):
                for n in a.users_list:
                    runs[str(n)].append(await seam_users(eng, n, 0, a.turns, a.new_tokens, 300))
            return runs

        return {"runs": asyncio.run(everything()), "start_s": round(time.perf_counter() - t0, 1)}
    finally:
        proc.terminate()
        proc.wait(60)


def figures(runs: dict[str, list]) -> dict[str, dict]:
    """Median and range of tok/s and first text per user count."""
    return {
        n: {
            "tok_s": spread([r.get("tok_s") for r in rs]),
            "first_ms": spread([r.get("first_ms_median") for r in rs]),
            "client_minus_engine_ms": spread([r.get("client_minus_engine_ms") for r in rs]),
            "errors": sum(r.get("errors", 0) for r in rs),
        }
        for n, rs in runs.items()
    }


def fmt(s: dict, unit: str = "") -> str:
    if not s or s.get("median") is None:
        return ""
    return f"{s['median']:,.0f}{unit} ({s['min']:,.0f}–{s['max']:,.0f})"


def change(x: float | None, base: float | None) -> str:
    """x against base, in % of base; "?" where either is unknown."""
    return f"{100 * (x - base) / abs(base):+.1f} %".replace("-", "−") if x is not None and base else "?"


def shown(x: float | None, spec: str) -> str:
    return "?" if x is None else format(x, spec)


def against_plain(app: dict[str, dict], raw: dict[str, dict], plain: str) -> list[str]:
    """Each case against the same users' plain run, `plain` (issue 14: within 10 %): a case the raw side has no run
    of (idle pages) by the app's tok/s, one it runs too (long conversations) by the app's share of the raw engine;
    for both, what the app adds to the engine's first token."""

    def median(table: dict, name: str, key: str) -> float | None:
        return (table.get(name) or {}).get(key, {}).get("median")

    names = [n for n in app if not n.isdigit()]
    if not names:
        return []
    if plain not in app:
        return ["", f"No plain run at {plain} users to set the cases against."]
    out = [""]
    for name in names:
        gap, gap0 = median(app, name, "client_minus_engine_ms"), median(app, plain, "client_minus_engine_ms")
        first = f"app − engine first token {shown(gap, '.0f')} vs {shown(gap0, '.0f')} ms ({change(gap, gap0)})"
        x, x0 = median(app, name, "tok_s"), median(app, plain, "tok_s")
        if raw_key(name) != name:  # the raw side has no pages: the app against itself
            out.append(f"{name} against {plain} users alone: app tok/s {change(x, x0)}; {first}.")
            continue
        r, r0 = median(raw, name, "tok_s"), median(raw, plain, "tok_s")
        share, share0 = (x / r if x and r else None), (x0 / r0 if x0 and r0 else None)
        shares = f"{shown(share, '.2f')} vs {shown(share0, '.2f')} ({change(share, share0)})"
        out.append(f"{name} against {plain} users' new ones: app / raw {shares}; {first}.")
    return out


def write_report(results: dict) -> str:
    """The Markdown table (bench.md) and the chart (bench.png); returns the table."""
    a = results["args"]
    app, raw = figures(results.get("app", {})), figures((results.get("raw") or {}).get("runs", {}))
    api = figures((results.get("api_server") or {}).get("runs", {}))
    lines = [
        f"Measured {date.today()} on {results['gpu']}, lmdeploy 0.11.1 TurboMind, synthetic full-size InternLM2-Chat-1.8B "
        f"AWQ; {a['turns']} turns of {a['new_tokens']} new tokens per user after one page load (returning sessions); "
        f"median (range) of {a['runs']} runs. Raw: the app's engine config, concurrent async generate streams in one "
        "process, same conversations.",
        "",
        "| users | raw tok/s | app tok/s | app / raw (medians) | app first text, ms | app − engine first token, ms | errors |"
        + (" api_server tok/s |" if api else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if api else ""),
    ]
    for n in app:
        r, x = raw.get(raw_key(n), {}).get("tok_s", {}), app[n]["tok_s"]
        ratio = f"{x['median'] / r['median']:.2f}" if r.get("median") and x.get("median") else ""
        row = (
            f"| {n} | {fmt(r)} | {fmt(x)} | {ratio} | {fmt(app[n]['first_ms'])} | "
            f"{fmt(app[n]['client_minus_engine_ms'])} | {app[n]['errors']} |"
        )
        lines.append(row + (f" {fmt(api.get(n, {}).get('tok_s', {}))} |" if api else ""))
    lines += against_plain(app, raw, str(a.get("case_users", 16)))
    burst = results.get("burst") or []
    if burst:
        lines += [
            "",
            f"{a['burst']} brand-new visitors at once (page load, then the first message): first text "
            f"{fmt(spread([b.get('first_ms_median') for b in burst]), ' ms')}, page load "
            f"{fmt(spread([b.get('page_load_ms_median') for b in burst]), ' ms')} (medians over visitors; range over runs).",
        ]
    img, st = results.get("image") or {}, results.get("startup") or {}
    for size, r in img.items():
        if isinstance(r, dict) and r.get("client_ttft_ms"):
            lines.append(f"Image question ({size} PNG, warm): first text {r['client_ttft_ms']} ms, total {r['total_s']} s.")
    if st:
        lines.append(f"Start-up with weights on disk: UI up {st.get('ui_up_s')} s, both engines ready {st.get('ready_s')} s.")
    table = "\n".join(lines) + "\n"
    (OUT / "bench.md").write_text(table)
    try:
        from bench.chart import draw_app  # noqa: PLC0415

        draw_app(app, {n: raw.get(raw_key(n), {}) for n in app}, api, results["gpu"], OUT / "bench.png")
    except Exception as e:  # noqa: BLE001 - the table still stands
        results["chart_error"] = repr(e)
    return table


def main(argv: list[str] | None = None) -> None:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", "from bench.runs import ensure_checkpoints as e; print(e())"], check=True)
    from model_loader.memory.gpu import gpu_memory  # noqa: PLC0415

    mem = gpu_memory()
    results: dict = {"gpu": mem.name if mem else "no GPU", "host": host()}
    results["args"] = {k: v for k, v in vars(a).items() if k != "users_list"}
    server = None
    if a.app_backend == "api_server":
        a.no_image = True
        server = start_api_server(OUT / "app_api_server.log")
        wait_api_server(f"http://127.0.0.1:{API_PORT}")
    TIMELINE.unlink(missing_ok=True)  # marks of this invocation only
    (OUT / "timeline-joined.jsonl").unlink(missing_ok=True)
    server_url = f"http://127.0.0.1:{API_PORT}" if server else ""
    proc = start_app(OUT / "app.log", a.gradio_profile, server_url, a.timeline, a.app_backend == "engine-process")
    try:
        results["startup"] = asyncio.run(wait_ready(URL, 300))
        results["app"] = app_runs(a, proc.pid)
        save("app.json", results)
        if a.burst:
            results["burst"] = burst_runs(a)
        if not a.no_image:
            try:
                results["image"] = image_question()
            except Exception as e:  # noqa: BLE001
                results["image"] = {"error": repr(e)[:300]}
        save("app.json", results)
    finally:
        for p in (proc, server):
            if p is not None:
                stop_app(p)
    if a.no_raw:
        save("app.json", results)
        return
    results["raw"] = raw_reference(a)
    save("app.json", results)
    if a.api_server:
        try:
            results["api_server"] = api_server_reference(a)
        except Exception as e:  # noqa: BLE001
            results["api_server"] = {"error": repr(e)[:600]}
    print(write_report(results), flush=True)
    save("app.json", results)


if __name__ == "__main__":
    main()
