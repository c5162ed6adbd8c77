"""Tab "System": models and their sources, engine states, the memory plan beside measured memory, load."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import gradio as gr
import pandas as pd

from model_loader.engines.slot import EngineSlot

STATE_ICONS = {"ready": "🟢", "failed": "🔴", "disabled": "⚪", "loading": "🟡", "preparing": "🟡", "waiting": "⏳"}


def engines_markdown(slots: Mapping[str, EngineSlot], kv_tokens: Mapping[str, int], queued: int = 0) -> str:
    """A table of engines: state, backend, source, session length, KV capacity, active users."""
    rows = [
        "| engine | state | backend | model | from | session | batch | KV tokens | active |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    active = 0
    for kind, s in slots.items():
        info = s.engine.info if s.engine else None
        n = s.engine.active_sessions() if s.engine else 0
        active += n
        kv = f"{kv_tokens[kind]:,} (plan)" if kind in kv_tokens else ""
        rows.append(
            f"| {kind} | {STATE_ICONS.get(s.state, '')} {s.state}: {s.message} | {info.backend if info else ''} | "
            f"{info.name if info else ''} | {info.source if info else ''} | {info.session_len if info else ''} | "
            f"{info.batch_size if info else ''} | {kv} | {n} |"
        )
    rows.append("")
    rows.append(f"**Users generating now:** {active} · **waiting in queue:** {queued}")
    return "\n".join(rows)


def plan_text(info: Mapping) -> str:
    """The memory plan as a code block, or why there is none."""
    if info.get("plan_text"):
        return "```\n" + info["plan_text"] + "\n```"
    gpu = info.get("gpu")
    if gpu is None:
        return "No NVIDIA GPU visible from this process (engines run elsewhere, or not at all)."
    return f"GPU {gpu['name']}: {gpu['used_mib']:.0f} / {gpu['total_mib']:.0f} MiB in use. No plan yet."


def queued_count(demo: gr.Blocks) -> int:
    """Events waiting in Gradio's queue (0 when the queue's internals are not what this version exposes)."""
    try:
        return sum(len(q.queue) for q in demo._queue.event_queue_per_concurrency_id.values())
    except AttributeError:
        return 0


def build_system_tab(
    slots: Mapping[str, EngineSlot], system_info: Callable[[], dict], i18n, demo_ref: list, config: dict | None = None
) -> gr.Blocks:
    """The System tab's Blocks; refreshes every 2 seconds while open."""
    with gr.Blocks() as tab:
        engines = gr.Markdown(elem_id="system-engines")
        plan = gr.Markdown(elem_id="system-plan")
        chart = gr.BarPlot(x="engine", y="MiB", color="what", label=i18n("memory"), elem_id="system-chart")
        if config is not None:
            gr.JSON(config, label="Configuration")
        timer = gr.Timer(2.0)

        def refresh():
            q = queued_count(demo_ref[0]) if demo_ref else 0
            info = system_info()
            frame = pd.DataFrame(info.get("memory", []), columns=["engine", "what", "MiB"])
            return engines_markdown(slots, info.get("kv_tokens", {}), q), plan_text(info), frame

        timer.tick(refresh, None, [engines, plan, chart], api_name=False, queue=False, show_progress="hidden")
        tab.load_fn = refresh
        tab.outputs = [engines, plan, chart]
    return tab
