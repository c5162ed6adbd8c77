"""Tab "System": models and their engine states, the memory plan beside measured memory (numbers, and a chart only
when there is data), load; the configuration only for a logged-in operator."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import gradio as gr
import pandas as pd

from model_loader.engines.slot import EngineSlot

STATE_ICONS = {"ready": "🟢", "failed": "🔴", "disabled": "⚪", "loading": "🟡", "preparing": "🟡", "waiting": "⏳"}
NO_GPU = (
    "**No NVIDIA GPU is visible to this server**, so there is no GPU memory to show. "
    "The engines run elsewhere (an LMDeploy api_server) or not at all."
)


def engines_markdown(
    slots: Mapping[str, EngineSlot], kv_tokens: Mapping[str, int], queued: int = 0, kv_quant: Mapping[str, str] | None = None
) -> str:
    """A table of engines: state, model, backend, session length, batch, KV capacity (and the precision the plan
    gave it: "auto" resolved), active users."""
    rows = [
        "| tab | state | model | backend | session | batch | conversations at once | KV tokens | generating |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    active = 0
    for kind, s in slots.items():
        info = s.engine.info if s.engine else None
        n = s.engine.active_sessions() if s.engine else 0
        active += n
        quant = (kv_quant or {}).get(kind, "")
        kv = f"{kv_tokens[kind]:,}{' ' + quant if quant else ''} (plan)" if kind in kv_tokens else "–"
        tab = {"text": "Chat", "vision": "Image chat"}.get(kind, kind)
        rows.append(
            f"| {tab} | {STATE_ICONS.get(s.state, '')} {s.state}: {s.message} | {info.name if info else '–'} | "
            f"{info.backend if info else '–'} | {info.session_len or '–' if info else '–'} | "
            f"{info.batch_size or '–' if info else '–'} | {getattr(info, 'capacity', 0) or '–' if info else '–'} | "
            f"{kv} | {n} |"
        )
    rows.append("")
    rows.append(f"**Users generating now:** {active} · **waiting in the queue:** {queued}")
    return "\n".join(rows)


def memory_markdown(info: Mapping) -> str:
    """Planned against measured GPU memory per engine, in numbers; in words when there is no GPU or no plan."""
    gpu = info.get("gpu")
    if gpu is None:
        return NO_GPU
    lines = [f"**GPU:** {gpu['name']} · {gpu['used_mib']:,.0f} of {gpu['total_mib']:,.0f} MiB in use now"]
    rows = info.get("memory") or []
    if not rows:
        lines.append("\nNo memory plan yet (the engines have not been planned on this GPU).")
        return "\n".join(lines)
    by_engine: dict[str, dict[str, float]] = {}
    for r in rows:
        by_engine.setdefault(r["engine"], {})[r["what"]] = r["MiB"]
    lines += ["", "| engine | planned (MiB, GPU in use after it) | measured (MiB) | difference |", "|---|---|---|---|"]
    for engine, v in by_engine.items():
        planned, measured = v.get("planned"), v.get("measured")
        diff = f"{(measured - planned) / planned:+.1%}" if planned and measured else "–"
        lines.append(
            f"| {engine} | {planned:,.0f} | {f'{measured:,.0f}' if measured else 'not loaded yet'} | {diff} |"
            if planned
            else f"| {engine} | – | {measured:,.0f} | – |"
        )
    return "\n".join(lines)


def plan_text(info: Mapping) -> str:
    """The planner's own report as a code block, or nothing."""
    return "```\n" + info["plan_text"] + "\n```" if info.get("plan_text") else "No memory plan (no GPU was planned for)."


def queued_count(demo: gr.Blocks) -> int:
    """Events waiting in Gradio's queue (0 when the queue's internals are not what this version exposes)."""
    try:
        return sum(len(q.queue) for q in demo._queue.event_queue_per_concurrency_id.values())
    except AttributeError:
        return 0


def build_system_tab(
    slots: Mapping[str, EngineSlot],
    system_info: Callable[[], dict],
    i18n,
    demo_ref: list,
    config: dict | None = None,
) -> gr.Blocks:
    """The System tab's Blocks; refreshes every 2 seconds while it is the tab in view (`tab.timer`, switched by the
    page). `config` is shown only to a logged-in user (APP_AUTH)."""
    with gr.Blocks() as tab:
        engines = gr.Markdown(elem_id="system-engines")
        memory = gr.Markdown(elem_id="system-memory")
        chart = gr.BarPlot(  # one bar per engine and kind, side by side (a colour alone would stack them)
            x="bar",
            y="MiB",
            color="what",
            x_title=" ",
            label=i18n("memory"),
            elem_id="system-chart",
            visible=False,
            height=260,
        )
        with gr.Accordion("Memory plan", open=False):
            plan = gr.Markdown(elem_id="system-plan")
        cfg_box = gr.JSON(label=i18n("config"), visible=False, elem_id="system-config")
        timer = gr.Timer(2.0, active=False)  # an open page that shows another tab costs the server nothing

        def refresh(request: gr.Request):
            q = queued_count(demo_ref[0]) if demo_ref else 0
            info = system_info()
            rows = info.get("memory") or []
            frame = pd.DataFrame(rows, columns=["engine", "what", "MiB"])
            frame["bar"] = frame["engine"] + " · " + frame["what"]
            operator = config is not None and bool(getattr(request, "username", None))
            return (
                engines_markdown(
                    slots, info.get("kv_tokens", {}), q, {k: c["kv_quant"] for k, c in info.get("capacity", {}).items()}
                ),
                memory_markdown(info),
                gr.update(value=frame, visible=bool(rows) and info.get("gpu") is not None),
                plan_text(info),
                gr.update(value=config if operator else None, visible=operator),
            )

        outputs = [engines, memory, chart, plan, cfg_box]
        timer.tick(refresh, None, outputs, api_visibility="private", queue=False, show_progress="hidden")
        tab.load_fn = refresh
        tab.outputs = outputs
        tab.timer = timer
    return tab
