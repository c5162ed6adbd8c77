"""Tab "System": models and their sources, engine states, the memory plan beside measured memory, load."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from model_loader import planner
from model_loader.gpu import gpu_memory
from model_loader.startup import Startup

STATE_ICONS = {"ready": "🟢", "failed": "🔴", "disabled": "⚪", "loading": "🟡", "preparing": "🟡", "waiting": "⏳"}


def engines_markdown(startup: Startup, queued: int = 0) -> str:
    """A table of engines: state, backend, source, session length, KV capacity, active users."""
    rows = ["| engine | state | backend | model | from | session | batch | KV tokens | active |",
            "|---|---|---|---|---|---|---|---|---|"]
    active = 0
    for kind, s in startup.slots.items():
        info = s.engine.info if s.engine else None
        n = s.engine.active_sessions() if s.engine else 0
        active += n
        kv = ""
        if startup.plan:
            for e in startup.plan.engines:
                if e.kind == kind:
                    kv = f"{e.kv_tokens:,} (plan)"
        rows.append(
            f"| {kind} | {STATE_ICONS.get(s.state, '')} {s.state}: {s.message} | {info.backend if info else ''} | "
            f"{info.name if info else ''} | {info.source if info else ''} | {info.session_len if info else ''} | "
            f"{info.batch_size if info else ''} | {kv} | {n} |")
    rows.append("")
    rows.append(f"**Users generating now:** {active} · **waiting in queue:** {queued}")
    return "\n".join(rows)


def memory_frame(startup: Startup) -> pd.DataFrame:
    """Planned vs measured GPU memory in use after each engine, for the bar chart."""
    rows = []
    if startup.plan:
        for i, e in enumerate(startup.plan.engines):
            rows.append({"engine": e.kind, "what": "planned", "MiB": round(startup.plan.used_after(i))})
            measured = startup.slots[e.kind].used_mib_after
            if measured:
                rows.append({"engine": e.kind, "what": "measured", "MiB": round(measured)})
    return pd.DataFrame(rows, columns=["engine", "what", "MiB"])


def plan_text(startup: Startup) -> str:
    """The memory plan as a code block, or why there is none."""
    if startup.plan:
        return "```\n" + planner.format_plan(startup.plan) + "\n```"
    mem = gpu_memory()
    if mem is None:
        return "No NVIDIA GPU visible from this process (engines run elsewhere, or not at all)."
    return f"GPU {mem.name}: {mem.used_mib:.0f} / {mem.total_mib:.0f} MiB in use. No plan yet."


def queued_count(demo: gr.Blocks) -> int:
    """Events waiting in Gradio's queue (0 when the queue's internals are not what this version exposes)."""
    try:
        return sum(len(q.queue) for q in demo._queue.event_queue_per_concurrency_id.values())
    except AttributeError:
        return 0


def build_system_tab(startup: Startup, i18n, demo_ref: list) -> gr.Blocks:
    """The System tab's Blocks; refreshes every 2 seconds while open."""
    with gr.Blocks() as tab:
        engines = gr.Markdown(elem_id="system-engines")
        plan = gr.Markdown(elem_id="system-plan")
        chart = gr.BarPlot(x="engine", y="MiB", color="what", label=i18n("memory"), elem_id="system-chart")
        gr.JSON(startup.cfg.redacted(), label="Configuration")
        timer = gr.Timer(2.0)

        def refresh():
            q = queued_count(demo_ref[0]) if demo_ref else 0
            return engines_markdown(startup, q), plan_text(startup), memory_frame(startup)

        timer.tick(refresh, None, [engines, plan, chart], api_name=False, queue=False, show_progress="hidden")
        tab.load_fn = refresh
        tab.outputs = [engines, plan, chart]
    return tab
