"""The bench chart: throughput raw vs app by users, and the KV ratio's effect on memory (measured vs planner).

python -m bench.chart   (redraws bench/results/bench-h100.png from the saved results)
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def draw(app: dict, raw: dict, ratios: list[dict], gpu: str, out: Path) -> None:
    """Two panels: tokens/s by concurrent users, and GPU memory by KV ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["1", "8", "16", "32"]
    rawv = [raw.get("b1_tok_s", 0)] + [raw.get(f"b{n}_tok_s", 0) for n in (8, 16, 32)]
    appv = [app.get("b1_tok_s", 0)] + [app.get(f"n{n}", {}).get("agg_tok_s", 0) for n in (8, 16, 32)]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(labels))
    ax[0].bar([i - 0.2 for i in x], rawv, 0.4, label="raw lmdeploy pipeline")
    ax[0].bar([i + 0.2 for i in x], appv, 0.4, label="through the app (streaming)")
    ax[0].set_xticks(list(x), labels)
    ax[0].set_xlabel("concurrent users")
    ax[0].set_ylabel("tokens/s")
    ax[0].legend()
    ax[0].set_title("InternLM2-1.8B AWQ throughput")
    if ratios:
        rs = [r["ratio"] for r in ratios]
        ax[1].plot(rs, [r["measured_delta_mib"] / 1024 for r in ratios], "o-", label="measured (nvidia-smi)")
        ax[1].plot(rs, [r["planned_delta_mib"] / 1024 for r in ratios], "x--", label="planner")
        ax[1].set_xlabel("cache_max_entry_count (KV ratio)")
        ax[1].set_ylabel("GPU memory of the text engine, GiB")
        ax[1].legend()
        ax[1].set_title("KV ratio vs GPU memory")
    fig.suptitle(f"{gpu}, lmdeploy 0.11.1 TurboMind")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> None:
    r = json.loads((RESULTS / "app-h100.json").read_text())
    ratios = [
        json.loads(line[4:]) for line in (RESULTS / "planner-ratios-h100.txt").read_text().splitlines() if line.startswith("ONE ")
    ]
    draw(r["app"], r["raw"], ratios, r["gpu"], RESULTS / "bench-h100.png")


if __name__ == "__main__":
    main()


def draw_app(app: dict, raw: dict, api: dict, gpu: str, out: Path) -> None:
    """Tokens/s of the app against the raw engine (and the api_server), medians with their range, by users; and
    the app's first text against the engine's first token."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    users = list(app)
    x = range(len(users))
    names = [textwrap.fill(n, 14) for n in users]  # the cases' long names side by side
    series = [("raw engine (async streams)", raw), ("through the app", app)] + ([("api_server", api)] if api else [])
    width = 0.8 / len(series)
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for k, (label, data) in enumerate(series):
        med = [data.get(n, {}).get("tok_s", {}).get("median") or 0 for n in users]
        lo = [m - (data.get(n, {}).get("tok_s", {}).get("min") or m) for m, n in zip(med, users)]
        hi = [(data.get(n, {}).get("tok_s", {}).get("max") or m) - m for m, n in zip(med, users)]
        ax[0].bar([i + (k - (len(series) - 1) / 2) * width for i in x], med, width, yerr=[lo, hi], capsize=3, label=label)
    ax[0].set_xticks(list(x), names)
    ax[0].set_xlabel("concurrent users (returning sessions)")
    ax[0].set_ylabel("tokens/s (median, range of runs)")
    ax[0].legend()
    first = [app[n]["first_ms"].get("median") or 0 for n in users]
    gap = [app[n]["client_minus_engine_ms"].get("median") or 0 for n in users]
    ax[1].plot(list(x), first, "o-", label="first text at the client")
    ax[1].plot(list(x), gap, "x--", label="client − engine first token")
    ax[1].set_xticks(list(x), names)
    ax[1].set_xlabel("concurrent users")
    ax[1].set_ylabel("ms (median of runs)")
    ax[1].legend()
    fig.suptitle(f"{gpu}, lmdeploy 0.11.1 TurboMind, InternLM2-1.8B AWQ")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
