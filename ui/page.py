"""Build the whole Blocks page from engine slots handed in; engines arrive in the slots, never through globals."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import gradio as gr

from model_loader.config import AppConfig
from model_loader.engines.slot import EngineSlot
from ui.chat_tab import build_chat_tab
from ui.i18n import build_i18n
from ui.image_tab import build_image_tab
from ui.system_tab import STATE_ICONS, build_system_tab

CSS = "#chat-stats, #image-stats {font-size: 0.85em; opacity: 0.8} footer {display: none !important}"


def status_line(slot: EngineSlot) -> str:
    """The banner over a tab: nothing when ready, else what the engine is doing or why it failed."""
    if slot.ready:
        return ""
    return f"{STATE_ICONS.get(slot.state, '')} **{slot.state.capitalize()}** — {slot.message}"


def engine_status(slots: Mapping[str, EngineSlot]) -> dict:
    """Engine states for health checks and scripts (`/status` in the API)."""
    return {
        k: {"state": s.state, "message": s.message, "active": s.engine.active_sessions() if s.engine else 0}
        for k, s in slots.items()
    }


def build_demo(
    slots: Mapping[str, EngineSlot], cfg: AppConfig, system_info: Callable[[], dict] = dict
) -> tuple[gr.Blocks, gr.I18n]:
    """The page: Chat, Image chat and System tabs over engine slots that fill while the page already serves."""
    i18n = build_i18n()
    demo_ref: list = []
    text_slot, vision_slot = slots["text"], slots["vision"]
    with gr.Blocks(title="InternLM2 & LLaVA on LMDeploy") as demo:
        gr.Markdown("## 💬 InternLM2-Chat-1.8B (4-bit AWQ) & 🖼️ LLaVA — served by LMDeploy TurboMind")
        saved = gr.BrowserState([], storage_key="internlm2-chat-history")
        with gr.Tabs():
            with gr.Tab(i18n("chat"), id="chat"):
                chat = build_chat_tab(text_slot, i18n, cfg.text_batch_size, saved)
            with gr.Tab(i18n("image_chat"), id="image"):
                image = build_image_tab(vision_slot, i18n, cfg.vision_batch_size, cfg.max_image_pixels)
            with gr.Tab(i18n("system"), id="system"):
                system = build_system_tab(slots, system_info, i18n, demo_ref)

        def refresh_status():
            return (
                status_line(text_slot),
                gr.update(interactive=text_slot.ready),
                status_line(vision_slot),
                gr.update(interactive=vision_slot.ready),
            )

        outputs = [chat.status, chat.send, image.status, image.ask]
        demo.load(refresh_status, None, outputs, api_name=False, queue=False)
        demo.load(lambda h: h or [], saved, chat.chatbot, api_name=False, queue=False)
        demo.load(system.load_fn, None, system.outputs, api_name=False, queue=False)

        def status() -> dict:
            return engine_status(slots)

        gr.api(status, api_name="status")
        timer = gr.Timer(1.0)
        timer.tick(refresh_status, None, outputs, api_name=False, queue=False, show_progress="hidden")
    demo_ref.append(demo)
    demo.queue(max_size=cfg.max_queue, default_concurrency_limit=max(cfg.text_batch_size, cfg.vision_batch_size))
    return demo, i18n


def launch_kwargs(cfg: AppConfig, i18n) -> dict:
    """Safe launch settings: never a public share link, no extra served paths, bounded uploads, optional login."""
    kw = dict(
        server_name=cfg.host,
        server_port=cfg.port,
        share=False,
        allowed_paths=[],
        max_file_size=f"{cfg.max_file_size_mb}mb",
        i18n=i18n,
        css=CSS,
        show_error=True,
    )
    if cfg.auth:
        kw["auth"] = cfg.auth_pairs()
        kw["auth_message"] = "This deployment is private: please log in."
    return kw
