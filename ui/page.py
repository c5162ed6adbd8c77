"""Build the whole Blocks page from engine slots handed in; engines arrive in the slots, never through globals."""

from __future__ import annotations

import atexit
import html
import inspect
import logging
import os
from collections.abc import Callable, Mapping

import gradio as gr

from model_loader.config import AppConfig
from model_loader.engines.slot import EngineSlot
from ui import streaming
from ui.chat_tab import BROWSER_SECRET, build_chat_tab
from ui.files import Scratch
from ui.i18n import build_i18n, server_text
from ui.image_tab import build_image_tab
from ui.queue_analytics import keep_queue_analytics_small
from ui.system_tab import STATE_ICONS, build_system_tab

log = logging.getLogger(__name__)
ASSETS = os.path.join(os.path.dirname(__file__), "assets")
# System fonts only: nothing is fetched (deployments may be offline), and every glyph of the heading comes from
# one face (Gradio's bundled font has a SemiBold subset without most capitals).
FONTS = [
    "system-ui",
    "-apple-system",
    "Segoe UI",
    "Roboto",
    "Noto Sans",
    "Helvetica Neue",
    "Arial",
    "PingFang SC",
    "Hiragino Sans GB",
    "Microsoft YaHei",
    "Noto Sans CJK SC",
    "sans-serif",
]
MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "DejaVu Sans Mono", "monospace"]
NICE_NAMES = {"internlm2-chat-1_8b": "InternLM2-Chat-1.8B", "llava-1.5-7b-hf": "LLaVA-1.5-7B"}
STATE_WORDS = {
    "en": {"ready": "ready", "loading": "loading", "preparing": "preparing", "waiting": "waiting", "failed": "failed",
           "disabled": "off"},
    "zh": {"ready": "就绪", "loading": "加载中", "preparing": "准备中", "waiting": "等待中", "failed": "失败",
           "disabled": "已关闭"},
}  # fmt: skip
TAB_WORDS = {"en": {"text": "Chat", "vision": "Image"}, "zh": {"text": "对话", "vision": "图片"}}

# Gradio scopes this CSS: rules inside @media only reach elements inside its `.contain` element.
CSS = """
footer {display: none !important}
#app-header {display: flex; flex-wrap: wrap; align-items: center; justify-content: space-between; gap: 6px 16px;
  padding: 4px 2px 2px}
#app-header h1 {font-size: 1.3rem; font-weight: 700; margin: 0; line-height: 1.25; letter-spacing: -0.01em}
#app-header .brand {display: flex; align-items: center; gap: 8px; min-width: 0}
#app-header .logo {display: inline-grid; place-items: center; width: 28px; height: 28px; border-radius: 8px;
  flex: none; background: linear-gradient(135deg, var(--primary-500), var(--secondary-400)); color: white;
  font-weight: 700; font-size: 15px}
#app-header .badges {display: flex; flex-wrap: wrap; gap: 6px}
.badge {display: inline-flex; align-items: center; gap: 6px; padding: 2px 10px; border-radius: 999px;
  font-size: 0.78rem; line-height: 1.6; border: 1px solid var(--border-color-primary);
  background: var(--background-fill-secondary); color: var(--body-text-color); white-space: nowrap}
.badge small {opacity: 0.7; font-size: 0.72rem}
.badge .dot {width: 8px; height: 8px; border-radius: 50%; background: var(--neutral-400); flex: none}
.badge.state-ready .dot {background: #16a34a}
.badge.state-loading .dot, .badge.state-preparing .dot, .badge.state-waiting .dot {background: #f59e0b}
.badge.state-failed .dot {background: #dc2626}
.badge.engine {background: var(--primary-50); border-color: var(--primary-200); color: var(--primary-700)}
/* Gradio floats the chat's own Clear/Copy icons over its top right, where scrolled messages and their icons passed
   under them: the icons get a line of their own, above the scrolled area */
#chatbot > .wrapper {display: flex !important; flex-direction: column}
#chatbot .top-panel {position: static !important; align-self: flex-end; margin: 4px 6px 0 !important}
#chatbot .bubble-wrap {flex: 1 1 0 !important; min-height: 0 !important; height: auto !important}
#chat-stats, #image-stats {font-size: 0.82em; opacity: 0.85; min-height: 1.2em}
#chat-status:empty, #image-status:empty {display: none}
#chat-busy-note:not(.shown) {display: none !important}
#chat-busy-note {font-size: 0.85em; color: var(--body-text-color-subdued)}
/* a picture in the image chat has Gradio's Share, which only works on Hugging Face Spaces ("Must be on Spaces") */
#image-chatbot button[aria-label='Share'] {display: none !important}
#chat-input textarea, #image-question textarea {border: 1px solid var(--input-border-color);
  border-radius: 10px; padding: 9px 12px; background: var(--input-background-fill); box-shadow: var(--input-shadow)}
#chat-input textarea:focus, #image-question textarea:focus {border-color: var(--input-border-color-focus)}
.compose-buttons {gap: 6px !important}
#chat-stop:not(:disabled), #image-stop:not(:disabled) {background: #dc2626 !important; color: white !important;
  border-color: #dc2626 !important}
.compose-buttons button {min-height: 38px}
#chat-compose, #image-compose {align-items: stretch}
.tool-row {gap: 6px !important}
.tool-row button {flex: 0 1 auto !important; min-width: 0 !important}
#image-examples .grid-wrap {max-height: none !important; min-height: 0 !important; height: auto !important;
  overflow: visible !important}
#image-examples .grid-container {grid-template-columns: repeat(3, minmax(0, 200px)) !important; gap: 10px !important}
#image-examples .thumbnail-item {aspect-ratio: 4 / 3 !important}
#image-chatbot .message-row img {max-height: 180px; width: auto; object-fit: contain}
#system-engines table, #system-memory table {display: block; overflow-x: auto; white-space: nowrap; max-width: 100%}
.example-chips {flex-wrap: wrap !important; gap: 6px !important}
.example-chips button.example-chip {flex: 0 1 auto !important; min-width: 0 !important; max-width: 100% !important;
  display: block !important; font-weight: 400; white-space: nowrap !important; overflow: hidden !important;
  text-overflow: ellipsis}
@media (max-width: 640px) {
  #app-header .detail {display: none}
  #app-header h1 {font-size: 1.05rem}
  .badge {font-size: 0.7rem; padding: 1px 8px}
  #chat-compose, #image-compose {flex-direction: column !important; gap: 6px !important}
  #chat-compose > *, #image-compose > * {width: 100% !important; min-width: 0 !important; flex: 1 1 auto !important}
  .compose-buttons {flex-direction: row !important}
  .compose-buttons button {flex: 1 1 0 !important; min-height: 36px}
  .tabs button[role="tab"] {padding: 6px 10px}
  #image-layout {flex-direction: column !important}
  #image-layout > * {min-width: 0 !important; width: 100% !important}
  #image-input {height: 220px !important}
  #image-chatbot {height: 300px !important}
  #chatbot {height: max(180px, calc(100dvh - 365px)) !important}  /* the box and Send in view as the page opens */
  #chat-input textarea, #image-question textarea {min-height: 58px}  /* the two-line hint whole */
}
"""

# The page frame around `.contain` (Gradio's own padding is 32 px a side, too much for a phone), unscoped in <head>.
HEAD = """<style>
.gradio-container .main.app {max-width: 1180px; padding-top: 10px}
@media (max-width: 640px) { .gradio-container .main.app {padding: 6px 8px} }
</style>"""

# Enter sends and Shift+Enter adds a line (Gradio does this for a one-line box; the guard does it for a message's Edit
# box, whose Enter only added a line: new-user trials); this guard keeps Enter from sending
# while the tab's send button is locked (a reply is streaming) or while an input method is composing (pinyin). Enter
# held back while a reply streams shows the tab's note saying why (its words come localised in the page, hidden by
# CSS until then), until the send button is back.
# It goes into <head>: Gradio 6.17's `js=` launch argument is never run.
ENTER_GUARD = """<script>
(() => {
  const tabs = [["#chat-input", "#chat-send", "#chat-stop", "#chat-busy-note"], ["#image-question", "#image-ask"]];
  const explain = (send, stop, note) => {
    const shown = note && document.querySelector(note);
    const streaming = document.querySelector(stop);
    if (!shown || !streaming || streaming.disabled) return;  // Send is off for another reason (the engine's banner)
    if (shown.classList.contains("shown")) return;
    shown.classList.add("shown");
    shown.setAttribute("role", "status");
    const back = setInterval(() => {
      const b = document.querySelector(send);
      if (b && !b.disabled) { shown.classList.remove("shown"); clearInterval(back); }
    }, 200);
  };
  const guard = (e) => {
    if (e.key !== "Enter" || e.shiftKey || !(e.target instanceof HTMLTextAreaElement)) return;
    const chat = e.target.closest("#chatbot");  // the Edit box of a message: Enter saves it, as Enter sends a message
    if (chat) {
      if (e.isComposing || e.keyCode === 229) return;
      e.stopImmediatePropagation();
      e.preventDefault();
      if (e.type === "keydown") chat.querySelector("button[aria-label='Submit']")?.click();
      return;
    }
    for (const [box, button, stop, note] of tabs) {
      if (!e.target.closest(box)) continue;
      const composing = e.isComposing || e.keyCode === 229;
      const b = document.querySelector(button);
      if (composing || !b || b.disabled) {
        e.stopImmediatePropagation();
        if (!composing) e.preventDefault();
        if (!composing && e.type === "keydown" && stop) explain(button, stop, note);
      } else if (box === "#chat-input" && e.type === "keydown") {
        window.chatSentText = e.target.value;  // what this Enter sends: the box lets go of it alone (ui/chat_tab.py)
      }
    }
  };
  window.addEventListener("keydown", guard, true);
  window.addEventListener("keypress", guard, true);
  window.addEventListener("click", (e) => {
    if (e.target instanceof Element && e.target.closest("#chat-send:not([disabled])"))
      window.chatSentText = document.querySelector("#chat-input textarea")?.value || "";
  }, true);
})();
</script>"""


# A user's message sits in the chat escaped for Markdown and marked with U+2060 (ui/user_text.py), so that it shows
# literally. Gradio's Copy buttons and Edit box take the message as held; this gives them the text as typed (the
# inverse of user_text.shown, as user_text.typed does). "Copy conversation" writes each message as "role: text",
# joined by blank lines: a user's marked message runs to the next such line (or the end), so one that itself holds
# a blank line and "assistant: " keeps its escapes after it. Marks anywhere else are only dropped.
LITERAL_TEXT = r"""<script>
(() => {
  const MARK = "\u2060";
  const typed = (t) => t.slice(1).replace(/\\([!-\/:-@\[-`{-~])|&nbsp;|&#9;/g, (m, c) => c || (m === "&nbsp;" ? " " : "\t"));
  const users = /(^|\n\n)user: (\u2060[\s\S]*?)(?=\n\n(?:user|assistant|system): |$)/g;
  const each = (t) => t.replace(users, (m, before, text) => before + "user: " + typed(text));
  const clip = navigator.clipboard;
  if (clip && clip.writeText) {
    const write = clip.writeText.bind(clip);
    const unmarked = (t) => t.split(MARK).join("");
    clip.writeText = (t) => write(typeof t !== "string" ? t : t.startsWith(MARK) ? typed(t) : unmarked(each(t)));
  }
  document.addEventListener("focusin", (e) => {  // the Edit box takes the focus as it opens
    const box = e.target;
    if (box instanceof HTMLTextAreaElement && box.closest("#chatbot, #image-chatbot") && box.value.startsWith(MARK)) {
      box.value = typed(box.value);
      box.dispatchEvent(new Event("input", {bubbles: true}));
    }
  });
})();
</script>"""


# The chat's settings as this browser left them (a kept value of another shape is ignored), put back once their
# components are in the page, and their panel closed. Gradio 6.17 loads a closed panel's components only when it
# opens, and a chat whose settings got values at load before they were in the page normalised its whole history
# hundreds of times per streamed update (tests/test_browser.py says what that did to the page). So the panel is
# built open, kept out of sight and out of reach by SETTINGS_HIDDEN until this has run.
SETTINGS_CONTENT = "#chat-settings > [data-testid='accordion-content']"
RESTORE_SETTINGS = f"""async (kept, ...now) => {{
  try {{
    const inputs = () => document.querySelectorAll("{SETTINGS_CONTENT} input, {SETTINGS_CONTENT} textarea").length;
    const frame = () => new Promise((r) => requestAnimationFrame(r));
    // until every setting has its input and their number holds for 3 frames; 5 s at most
    for (let t0 = performance.now(), last = -1, same = 0; same < 3 && performance.now() - t0 < 5000; ) {{
      await frame();
      const n = inputs();
      same = n >= now.length && n === last ? same + 1 : 0;
      last = n;
    }}
    return [...(Array.isArray(kept) && kept.length === now.length ? kept : now), {{__type__: "update", open: false}}];
  }} finally {{
    document.documentElement.dataset.settingsRestored = "";
  }}
}}"""
SETTINGS_HIDDEN = f"""<style>
html:not([data-settings-restored]) {SETTINGS_CONTENT} {{display: none !important}}
html:not([data-settings-restored]) #chat-settings > button {{pointer-events: none}}
</style>"""

SETTLED_TICK_S = 10.0  # with --engine-process: how often a page with settled engines still asks for their state
CHAT_KEY = "internlm2-chat-history"  # where the browser keeps the chat (gr.BrowserState)

# gr.BrowserState keeps the chat in localStorage, which every tab of the browser shares: reloading one tab brought
# back whichever tab wrote last, and its own chat was gone (new-user trial). Each tab also keeps its chat in its own
# sessionStorage (kept across reloads, not shared) and reads that first; a new tab has none and opens the latest chat.
OWN_CHAT_PER_TAB = f"""<script>
(() => {{
  const KEY = "{CHAT_KEY}", get = Storage.prototype.getItem, set = Storage.prototype.setItem;
  Storage.prototype.getItem = function (k) {{
    const own = this === localStorage && k === KEY ? get.call(sessionStorage, k) : null;
    return own !== null ? own : get.call(this, k);
  }};
  Storage.prototype.setItem = function (k, v) {{
    if (this === localStorage && k === KEY) {{
      try {{ set.call(sessionStorage, k, v); }} catch (e) {{ sessionStorage.removeItem(k); }}  // full: the shared copy comes back
    }}
    return set.call(this, k, v);
  }};
}})();
</script>"""


def build_theme() -> gr.themes.Base:
    """Indigo on slate, system fonts."""
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="sky", neutral_hue="slate", font=FONTS, font_mono=MONO).set(
        button_large_radius="10px", button_small_radius="8px", block_radius="12px"
    )


def nice_name(model: str) -> str:
    """'internlm/internlm2-chat-1_8b' -> 'InternLM2-Chat-1.8B'; other names as their last path part."""
    base = os.path.basename(model.rstrip("/")) or model
    return NICE_NAMES.get(base.lower(), base)


def language(request: gr.Request | None) -> str:
    """'zh' for a browser that asks for Chinese first, else 'en'."""
    accept = ""
    try:
        accept = (request.headers.get("accept-language") or "") if request is not None else ""
    except AttributeError:
        pass
    return "zh" if accept.lower().startswith("zh") else "en"


def header_html(slots: Mapping[str, EngineSlot], cfg: AppConfig, lang: str = "en") -> str:
    """The compact header: title, one badge per model with its tab's engine state, and the engine."""
    words, tabs = STATE_WORDS[lang], TAB_WORDS[lang]
    models = {"text": (nice_name(cfg.text_model), "4-bit AWQ"), "vision": (nice_name(cfg.vision_model), "")}
    badges = []
    for kind, slot in slots.items():
        name, detail = models.get(kind, (kind, ""))
        detail_text = " · ".join(x for x in (tabs.get(kind, kind), detail) if x) + " ·"
        state = words.get(slot.state, slot.state)
        badges.append(
            f'<span class="badge state-{html.escape(slot.state)}" id="badge-{kind}" title="{html.escape(slot.message)}">'
            f'<i class="dot"></i>{html.escape(name)} <small class="detail">{html.escape(detail_text)}</small>'
            f'<small class="state">{html.escape(state)}</small></span>'
        )
    engine = "LMDeploy TurboMind" if cfg.backend == "turbomind" else "LMDeploy api_server"
    badges.append(f'<span class="badge engine">{engine}</span>')
    return (
        '<header id="app-header"><div class="brand"><span class="logo">L</span>'
        "<h1>InternLM2 &amp; LLaVA Chat</h1></div>"
        f'<div class="badges">{"".join(badges)}</div></header>'
    )


def status_line(slot: EngineSlot) -> str:
    """The banner over a tab: nothing when ready, else what the engine is doing or why it failed."""
    if slot.ready:
        return ""
    return f"{STATE_ICONS.get(slot.state, '')} **{slot.state.capitalize()}** — {slot.message}"


def settled(slots: Mapping[str, EngineSlot]) -> bool:
    """No engine is still on its way: each is ready, failed or disabled."""
    return all(s.state in ("ready", "failed", "disabled") for s in slots.values())


def engine_status(slots: Mapping[str, EngineSlot]) -> dict:
    """Engine states for health checks and scripts (`/status` in the API)."""
    return {
        k: {"state": s.state, "message": s.message, "active": s.engine.active_sessions() if s.engine else 0}
        for k, s in slots.items()
    }


def build_demo(
    slots: Mapping[str, EngineSlot],
    cfg: AppConfig,
    system_info: Callable[[], dict] = dict,
    concurrency: Mapping[str, int] | None = None,
) -> tuple[gr.Blocks, gr.I18n]:
    """The page: Chat, Image chat and System tabs over engine slots that fill while the page already serves.

    `concurrency` ({"text": n, "vision": m}) caps the replies each engine runs at once (default: its batch size).
    """
    i18n = build_i18n()
    demo_ref: list = []
    text_slot, vision_slot = slots["text"], slots["vision"]
    limits = {"text": cfg.text_batch_size, "vision": cfg.vision_batch_size, **(concurrency or {})}
    replies, scratch = streaming.Replies(), Scratch()
    # Gradio's own cache (uploads, files returned to the page): files older than a day go, checked hourly
    with gr.Blocks(title="InternLM2 & LLaVA Chat", delete_cache=(3600, 86400)) as demo:
        header = gr.HTML(header_html(slots, cfg), elem_id="header")
        saved = gr.BrowserState([], storage_key=CHAT_KEY, secret=BROWSER_SECRET)
        known = gr.State(None)  # the engine readiness this page last saw
        with gr.Tabs():
            with gr.Tab(i18n("chat"), id="chat") as chat_page:
                chat = build_chat_tab(text_slot, i18n, limits["text"], saved, replies, scratch)
            with gr.Tab(i18n("image_chat"), id="image") as image_page:
                image = build_image_tab(vision_slot, i18n, limits["vision"], cfg.max_image_pixels, replies, scratch)
            with gr.Tab(i18n("system"), id="system") as system_page:
                system = build_system_tab(slots, system_info, i18n, demo_ref, cfg.redacted() if cfg.auth else None)

        status_timer = gr.Timer(1.0)  # every second until both engines have settled (ready, failed or disabled)

        def refresh_status(seen, request: gr.Request, first: bool = False):
            """Header and banners. Send/Ask start enabled; they are turned off when the page loads before its engine
            is ready, and on when readiness arrives, never otherwise: a reply may be streaming with them locked.
            Once both engines have settled there is nothing left to watch and the page's timer stops; with the
            engine process a settled engine can go back to loading (the process died and is started again), so the
            timer only slows down."""
            done = settled(slots)  # read first: in process, nothing read below can change once settled
            now = {"text": text_slot.ready, "vision": vision_slot.ready}

            def button(kind):
                if first:
                    return gr.skip() if now[kind] else gr.update(interactive=False)
                return gr.update(interactive=now[kind]) if seen is not None and now[kind] != seen[kind] else gr.skip()

            return (
                header_html(slots, cfg, language(request)),
                status_line(text_slot),
                button("text"),
                status_line(vision_slot),
                button("vision"),
                now,
                (gr.Timer(SETTLED_TICK_S) if cfg.engines_in_child else gr.Timer(active=False)) if done else gr.skip(),
            )

        def on_load(seen, history, request: gr.Request):
            """Everything a page needs when it opens, in one request: banners, and the conversation kept in the
            browser (the System tab fills itself when it is opened), saying so if its last question has no answer
            (a reload while it was being written)."""
            history = history or []
            unanswered = bool(history) and history[-1].get("role") == "user"
            note = server_text(language(request), "unanswered") if unanswered else ""  # a value: nothing rebuilt
            return (*refresh_status(seen, request, first=True), history, note)

        outputs = [header, chat.status, chat.send, image.status, image.ask, known, status_timer]
        demo.load(on_load, [known, saved], [*outputs, chat.chatbot, chat.stats], api_visibility="private", queue=False)
        restored = [*chat.settings, chat.settings_panel]
        demo.load(None, [chat.kept_settings, *chat.settings], restored, js=RESTORE_SETTINGS, api_visibility="private")

        def status() -> dict:
            return engine_status(slots)

        gr.api(status, api_name="status")
        status_timer.tick(refresh_status, known, outputs, api_visibility="private", queue=False, show_progress="hidden")

        def show_system(request: gr.Request):
            return (gr.Timer(active=True), *system.load_fn(request))

        system_page.select(show_system, None, [system.timer, *system.outputs], api_visibility="private", queue=False)
        for other in (chat_page, image_page):  # leaving the System tab stops its timer in the page, no request
            other.select(None, None, system.timer, js="() => ({__type__: 'update', active: false})", api_visibility="private")

        def forget_session(request: gr.Request) -> None:
            """The tab was closed or reloaded: remove the files written for it."""
            scratch.drop(getattr(request, "session_hash", None) or "anonymous")

        demo.unload(forget_session)
    demo_ref.append(demo)
    atexit.register(scratch.close)  # the files written for sessions (and the drawn examples) go with the server
    demo.queue(max_size=cfg.max_queue, default_concurrency_limit=max(limits.values()))
    replies.queue = demo._queue  # Undo/Clear look there for a /chat still waiting
    keep_queue_analytics_small(demo._queue)  # ui/queue_analytics.py: Gradio 6.17's queue slowed with uptime
    return demo, i18n


def without_fastapi_telemetry() -> dict:
    """FastAPI's native OpenTelemetry looks up OpenTelemetry's providers on every request, 5% of the web server's
    loop at 32 users (py-spy, CPU; docs/throughput.md); the app exports no telemetry, so it is off. FastAPI releases
    without it take no such argument."""
    from fastapi import FastAPI  # noqa: PLC0415

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def launch_kwargs(cfg: AppConfig, i18n) -> dict:
    """Safe launch settings: never a public share link, no extra served paths, bounded uploads, optional login."""
    kw = dict(
        server_name=cfg.host,
        server_port=cfg.port,
        share=False,
        allowed_paths=[],
        max_file_size=f"{cfg.max_file_size_mb}mb",
        i18n=i18n,
        theme=build_theme(),
        css=CSS,
        head=HEAD + SETTINGS_HIDDEN + ENTER_GUARD + LITERAL_TEXT + OWN_CHAT_PER_TAB,
        show_error=True,
        app_kwargs=without_fastapi_telemetry(),
    )
    if cfg.auth:
        kw["auth"] = cfg.auth_pairs()
        kw["auth_message"] = "This deployment is private: please log in."
    return kw
