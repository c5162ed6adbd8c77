"""The engine in the page's process or in its own (`--engine-process`), on CPU: an A/B of the mechanism only.

    python -m bench.cpu_engine_process [--users 8,16,32] [--runs 3] [--token-ms 10] [--burn-us 60]

Both sides run the real LmdeployEngine over the faithful FakePipe, which spends `--burn-us` of Python per token per
reply on lmdeploy's loop thread, holding the GIL as lmdeploy's generate loop and detokenizer do (on the H100 they
held it for about a quarter of the wall time at 32 users: docs/throughput.md). Returning users on loaded pages, 2
turns of 256 tokens each; the app runs in a subprocess as in production, and the client shares this machine's
cores with it, so only the difference between the two sides means anything. Writes $OUT/cpu_engine_process.json.
The GPU figures come from `bench.bench_app --app-backend engine-process`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys

from bench.runs import save

PORT = 7873
URL = f"http://127.0.0.1:{PORT}/"
BUILDER = "tests.fakes:fake_lmdeploy_engine"


def serve(mode: str, token_ms: float, burn_us: float) -> None:
    """--serve: the page over one text engine, in this process or in the engine process, until killed."""
    import app  # noqa: PLC0415
    from tests.conftest import fake_startup  # noqa: PLC0415
    from tests.fakes import fake_lmdeploy_engine  # noqa: PLC0415
    from ui.page import build_demo, launch_kwargs  # noqa: PLC0415

    sys.setswitchinterval(app.SWITCH_INTERVAL_S)  # as app.serve does (the engine process takes it too)
    pipe = {"kind": "text", "tokens": 100_000, "delay_s": token_ms / 1000, "burn_s": burn_us / 1e6, "max_batch_size": 64}
    if mode == "engine-process":
        from model_loader.engines.process import EngineProcess  # noqa: PLC0415

        host = EngineProcess("WARNING", switch_interval_s=sys.getswitchinterval())
        host.start()
        engine = host.build("text", BUILDER, pipe)
    else:
        engine = fake_lmdeploy_engine(**pipe)
    st = fake_startup(engine, None, host="127.0.0.1", port=PORT, engine_process=mode == "engine-process")
    demo, i18n = build_demo(st.slots, st.cfg, st.system_info)
    demo.launch(**{**launch_kwargs(st.cfg, i18n), "quiet": True})


def measure(mode: str, users: list[int], runs: int, new_tokens: int) -> dict:
    from bench.pages import users_on_pages  # noqa: PLC0415
    from bench.workload import summarize  # noqa: PLC0415

    out: dict = {}
    for n in users:
        rows = []
        for _ in range(runs):
            turns, wall, _ = asyncio.run(users_on_pages(URL, n, 2, new_tokens))
            s = summarize(turns, wall)
            gaps = sorted(
                t["first_ms"] - t["engine_ttft_ms"] for t in turns if t.get("first_ms") and t.get("engine_ttft_ms") is not None
            )
            rows.append(
                {
                    "tok_s": s["tok_s"],
                    "first_ms": s["first_ms_median"],
                    "gap_ms": gaps[len(gaps) // 2] if gaps else None,
                    "errors": s["errors"],
                }
            )
        out[str(n)] = {
            "tok_s_median": statistics.median(r["tok_s"] for r in rows),
            "first_ms_median": statistics.median(r["first_ms"] for r in rows),
            "first_minus_engine_ms_median": statistics.median(r["gap_ms"] for r in rows if r["gap_ms"] is not None),
            "runs": rows,
        }
        print(mode, n, json.dumps(out[str(n)]["runs"]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_engine_process")
    ap.add_argument("--users", default="8,16,32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--token-ms", type=float, default=10.0, help="fake engine: ms per decode step")
    ap.add_argument("--burn-us", type=float, default=60.0, help="Python per token per reply on lmdeploy's thread")
    ap.add_argument("--serve", choices=("in-process", "engine-process"), help=argparse.SUPPRESS)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.serve:
        serve(a.serve, a.token_ms, a.burn_us)
        return 0
    from bench.pages import wait_ready  # noqa: PLC0415

    users = [int(x) for x in a.users.split(",") if x]
    res: dict = {"machine": f"CPU, {os.cpu_count()} cores", "token_ms": a.token_ms, "burn_us": a.burn_us, "modes": {}}
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": os.getcwd()}
    for mode in ("in-process", "engine-process"):
        cmd = [sys.executable, "-m", "bench.cpu_engine_process", "--serve", mode, "--token-ms", str(a.token_ms)]
        server = subprocess.Popen([*cmd, "--burn-us", str(a.burn_us)], env=env)
        try:
            asyncio.run(wait_ready(URL, 120))
            res["modes"][mode] = measure(mode, users, a.runs, a.new_tokens)
        finally:
            server.terminate()
            server.wait(30)
    print(
        json.dumps(
            {m: {n: {k: v for k, v in r.items() if k != "runs"} for n, r in rows.items()} for m, rows in res["modes"].items()},
            indent=1,
        )
    )
    save("cpu_engine_process.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
