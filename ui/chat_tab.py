"""Tab "Chat": InternLM2 with streaming, stop, regenerate, undo/edit, sampling settings and exports.

A turn (Enter, Send, Regenerate, Retry, Edit) is one queued server event that checks, shows the message, streams
and saves; a refusal ends it with a toast and a line under the chat. While a reply streams, Send/Enter/Regenerate
are locked in the page (Stop is the live button) and the server refuses a second reply in the same chat; Clear and
Undo stop the reply, which then ends showing what they left. Scripts use /add_message, /regenerate and /chat.
"""

from __future__ import annotations

import json

import gradio as gr
import orjson

from model_loader.engines.seam import GenSettings
from model_loader.engines.slot import EngineSlot
from ui import streaming
from ui.chatbot import for_caller, lenient_chatbot
from ui.conversation import text_of, to_engine_messages
from ui.files import Scratch
from ui.prompt_sizes import PromptSizes
from ui.rendered import RenderMemo, json_bytes, rendered_turn
from ui.user_text import clean, clean_history, shown, typed, typed_history

DEFAULT_SYSTEM = (
    "You are InternLM (书生·浦语), a helpful, honest and harmless AI assistant developed by Shanghai AI "
    "Laboratory. Answer in the language of the question."
)
EXAMPLES = [
    "Please introduce yourself.",
    "请用三句话介绍一下上海。",
    "Write a Python function that checks whether a string is a palindrome, with a short test.",
    "用 Markdown 表格比较 W4A16 量化和 FP16 推理的显存占用。",
]
TAB = "text"
# What the conversation may take in the browser's localStorage, as JSON. Gradio encrypts it to base64 (4/3), and
# Chromium gives an origin about 5 M characters; past that saving fails silently (QuotaExceededError).
SAVE_BUDGET_BYTES = 2_500_000
EMPTY = "Please type a message first."
NOTHING_TO_EXPORT = "There is nothing to download yet: the chat is empty."
# the written file downloads at once (the File's link would be a second click); a DownloadButton downloads the file
# it holds when clicked, before its own event could write the chat as it is now
DOWNLOAD_JS = """(file) => {
  if (!file?.url) return;
  const a = document.createElement("a");
  a.href = file.url;
  a.download = file.orig_name || "";
  document.body.appendChild(a);
  a.click();
  a.remove();
}"""
# the export buttons are on only while the chat has a message, in the page alone
HAS_MESSAGES_JS = """(history) => {
  const on = Array.isArray(history) && history.length > 0;
  return [{__type__: "update", interactive: on}, {__type__: "update", interactive: on}];
}"""
# What the browser's kept values (the chat, its settings) are encrypted with. Gradio hands it to the page in its
# config, so it hides nothing from the page's own user; Gradio's default, drawn at random as the app is built, made
# every kept chat unreadable after a server restart (new-user trial: a reload lost the conversation in every tab).
BROWSER_SECRET = "internlm2-llava-chat"


def add_user_message(message: str, history: list[dict]) -> tuple[str, list[dict]]:
    """Put the user's message into the chat, held so that it shows literally; empty messages are refused."""
    message = clean(message)
    if not message.strip():
        raise streaming.refuse(EMPTY, "Empty message")
    return "", clean_history(history) + [{"role": "user", "content": shown(message)}]


async def stream_reply(
    slot: EngineSlot,
    history: list[dict],
    system_prompt: str,
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    repetition_penalty: float,
    seed: int,
    request: gr.Request,
    replies: streaming.Replies | None = None,
    sizes: PromptSizes | None = None,
):
    """Stream InternLM2's answer to the conversation's last user message (one reply at a time per chat); `sizes`
    knows what the engine counted of recent prompts (ui/prompt_sizes.py)."""
    engine = streaming.engine_or_error(slot)
    history = clean_history(history)
    streaming.require_question(history, "There is no question to answer; send a message first.", EMPTY, "Empty message")
    settings = streaming.settings_from(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
    replies = replies or streaming.Replies()
    key = streaming.chat_key(request, TAB)
    replies.check(key)
    messages = to_engine_messages(typed_history(history), clean(system_prompt or ""), reserved=engine.info.reserved)
    window = engine.info.session_len or 8192
    messages, notice = await streaming.fit_messages(engine, messages, window, settings.max_new_tokens, sizes)
    updates = streaming.reply_updates(engine, history, messages, settings, notice, request, TAB, sizes)
    async for update in replies.stream(key, updates):
        yield update


def drop_last_reply(history: list[dict]) -> list[dict]:
    """Regenerate: remove the last assistant answer so the question is answered again."""
    history = clean_history(history)
    while history and history[-1].get("role") == "assistant":
        history.pop()
    if not history:
        raise streaming.refuse("There is nothing to answer again yet.", "Nothing to regenerate")
    return history


def undo_last_turn(history: list[dict]) -> tuple[list[dict], str]:
    """Undo: remove the last question and its answer, and put the question back in the box to edit."""
    history = clean_history(history)
    while history and history[-1].get("role") == "assistant":
        history.pop()
    text = ""
    if history and history[-1].get("role") == "user":
        text = typed(text_of(history.pop().get("content")))
    return history, text


def edit_message(history: list[dict], edit: gr.EditData) -> list[dict]:
    """Editing a message in the chat keeps the conversation up to it, with the new text (shown literally)."""
    history = clean_history(history)[: edit.index + 1]
    text = clean(text_of(edit.value))
    if not typed(text).strip():
        raise streaming.refuse(EMPTY, "Empty message")
    role = history[edit.index]["role"]
    history[edit.index] = {"role": role, "content": shown(typed(text)) if role == "user" else text}
    return history


def unedited(history: list[dict], edit: gr.EditData) -> list[dict]:
    """The conversation with the edited message as it was before the edit."""
    history = list(history)
    if isinstance(edit.index, int) and 0 <= edit.index < len(history):
        history[edit.index] = {**history[edit.index], "content": edit.previous_value}
    return history


def message_json(message: dict) -> bytes:
    """A message as the browser keeps it (orjson, Gradio's encoder), cleaned first where clean() would change it:
    a lone surrogate (which orjson refuses) or a NUL."""
    try:
        out = json_bytes(message)
    except orjson.JSONEncodeError:
        out = None
    if out is None or b"\\u0000" in out:
        out = json_bytes(clean_history([message])[0])
    return out


def _first_kept(sizes: list[int], history: list[dict], budget: int | None) -> int:
    budget = SAVE_BUDGET_BYTES if budget is None else budget
    total, start = 2, len(history)
    while start > 0 and total + sizes[start - 1] <= budget:
        start -= 1
        total += sizes[start]
    while start < len(history) and history[start].get("role") != "user":
        start += 1  # begin at a question, not half-way through a turn
    return start


def fit_for_browser(history: list[dict], budget: int | None = None) -> tuple[list[dict], int]:
    """The newest whole turns whose JSON fits `budget` bytes (SAVE_BUDGET_BYTES), and how many were left out."""
    start = _first_kept([len(message_json(m)) + 1 for m in history], history, budget)
    return history[start:], start


def saved_json(history: list[dict], budget: int | None = None) -> tuple[list[orjson.Fragment], int]:
    """fit_for_browser's kept turns as JSON written once, for a streamed turn's output: Gradio's walks pass over it
    and sends the same JSON (ui/rendered.py). Each message is encoded once, in C: the conversation is saved as a
    turn starts and as it ends."""
    jsons = [message_json(m) for m in history]
    start = _first_kept([len(b) + 1 for b in jsons], history, budget)
    return [orjson.Fragment(b) for b in jsons[start:]], start


def save_note(dropped: int) -> str:
    return (
        f"💾 This conversation is too long to keep whole in your browser: the oldest {dropped} messages "
        "will be gone after a reload (download it to keep everything)."
    )


def build_chat_tab(
    slot: EngineSlot, i18n, concurrency: int, saved: gr.BrowserState, replies: streaming.Replies, scratch: Scratch
) -> gr.Blocks:
    """The Chat tab's Blocks; `saved` keeps the conversation in the browser across reloads."""
    sizes = PromptSizes()  # what the engine counted of recent prompts, for the next turns' fit
    with gr.Blocks() as tab:
        status = gr.Markdown(elem_id="chat-status")
        # the labels are not shown: they name the API's outputs (view_api said value_8)
        chatbot = lenient_chatbot(
            label="history",
            show_label=False,
            elem_id="chatbot",
            height="58vh",
            min_height=280,
            editable="user",
            buttons=["copy", "copy_all"],
            layout="bubble",
            placeholder=i18n("chat_placeholder"),
            latex_delimiters=[{"left": "$$", "right": "$$", "display": True}],
        )
        stats = streaming.stats_line("chat-stats")
        # shown over the box by the page when Enter is pressed while a reply streams (ui/page.py, ENTER_GUARD)
        gr.Markdown(i18n("busy_enter"), elem_id="chat-busy-note")
        with gr.Row(elem_id="chat-compose", equal_height=True):
            msg = streaming.message_box("message", i18n("message_ph"), 10, "chat-input", autofocus=True)
            with gr.Column(scale=1, min_width=96, elem_classes="compose-buttons"):
                send = gr.Button(i18n("send"), variant="primary", elem_id="chat-send")
                stop = gr.Button(i18n("stop"), variant="stop", elem_id="chat-stop", interactive=False)
        with gr.Row(elem_classes="tool-row"):
            regen = gr.Button(i18n("regenerate"), size="sm", elem_id="chat-regenerate")
            undo = gr.Button(i18n("undo"), size="sm", elem_id="chat-undo")
            clear = gr.Button(i18n("clear"), size="sm", elem_id="chat-clear")
        with gr.Row(elem_classes="example-chips", elem_id="chat-examples"):
            for text in EXAMPLES:  # fills the box in the page, no server round trip
                chip = gr.Button(text, size="sm", variant="secondary", elem_classes="example-chip")
                chip.click(None, None, msg, js=f"() => {json.dumps(text)}", api_visibility="private", queue=False)
        # built open, so that the page loads its components; closed by the page as it puts the kept settings back
        # (ui/page.py, RESTORE_SETTINGS)
        with gr.Accordion(i18n("settings"), open=True, elem_id="chat-settings") as settings_panel:
            system = gr.Textbox(DEFAULT_SYSTEM, label=i18n("system_prompt"), lines=3, elem_id="chat-system")
            temperature, top_p, top_k, max_new, rep, seed = streaming.sampling_sliders(i18n, GenSettings(), 4096)
        with gr.Accordion(i18n("export"), open=False):
            with gr.Row():
                export_md = gr.Button(i18n("export_md"), size="sm", interactive=False)  # on once the chat has a message
                export_json = gr.Button(i18n("export_json"), size="sm", interactive=False)
            export_file = gr.File(label=i18n("export"), interactive=False)

        def key(request: gr.Request) -> str:
            return streaming.chat_key(request, TAB)

        def accept(message, history, request: gr.Request):
            replies.check(key(request))
            box, history = add_user_message(message, history)
            replies.accepted(key(request), later=True)  # the API's step: its reply is the script's /chat
            return box, for_caller(history, request)

        def regenerate(history, request: gr.Request, later: bool = True):
            replies.check(key(request))
            out = drop_last_reply(history)
            replies.accepted(key(request), later=later)
            return out

        def regenerate_step(history, request: gr.Request):
            return for_caller(regenerate(history, request), request)

        def edited(history, edit: gr.EditData, request: gr.Request):
            replies.check(key(request))
            out = edit_message(history, edit)
            replies.accepted(key(request))
            return out

        async def reply(
            history, system_prompt, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed, request: gr.Request
        ):
            async for update in stream_reply(
                slot, history, system_prompt, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed,
                request, replies, sizes,
            ):  # fmt: skip
                yield for_caller(update[0], request), update[1]

        async def stop_this(history, request: gr.Request):
            note = await streaming.stop_reply(slot, request, TAB, replies)
            kept, dropped = fit_for_browser(clean_history(history))
            return note, for_caller(kept, request)

        async def end_reply_with(history, request: gr.Request) -> None:
            """A running or waiting reply stops and ends showing `history`, so that it cannot repaint the chat."""
            replies.replace(key(request), history, request, TAB)
            if replies.busy(key(request)):
                await streaming.stop_reply(slot, request, TAB)
                await replies.wait_idle(key(request))

        async def undo_this(history, request: gr.Request):
            history, text = undo_last_turn(history)
            await end_reply_with(history, request)
            return for_caller(history, request), text, for_caller(fit_for_browser(history)[0], request), ""

        async def clear_this(request: gr.Request):
            await end_reply_with([], request)
            return [], "", []

        def save(history, stats_line):
            kept, dropped = saved_json(history)
            return kept, (stats_line + "\n\n" + save_note(dropped)) if dropped else stats_line

        def export(history, fmt, request):
            session = getattr(request, "session_hash", None) or "anonymous"
            history = typed_history(clean_history(history))
            if not history:
                raise streaming.refuse(NOTHING_TO_EXPORT, "Nothing to download")
            return streaming.export_file(history, fmt, scratch, session)

        def export_markdown(history, request: gr.Request):
            return export(history, "md", request)

        def export_json_file(history, request: gr.Request):
            return export(history, "json", request)

        settings = [system, temperature, top_p, top_k, max_new, rep, seed]
        # the settings are kept in the browser as they change, in the page alone (ui/page.py puts them back at load)
        kept_settings = gr.BrowserState(None, storage_key="internlm2-chat-settings", secret=BROWSER_SECRET)
        keep = "(...values) => [values]"
        gr.on([c.change for c in settings], None, settings, kept_settings, js=keep, api_visibility="private", queue=False)
        buttons = [send, stop, regen]
        # quick checks never wait behind replies; "minimal" progress leaves the box usable after a refusal
        ui = dict(concurrency_limit=None, concurrency_id="ui", show_progress="minimal")
        running = []

        lock = streaming.interactive_js(False, True, False)  # Send and Regenerate off, Stop on
        unlock_in_page = streaming.interactive_js(True, False, True, ready_banner="#chat-status")

        # Gradio 6 rebuilds a component for every gr.skip()/gr.update() output of every streamed update (~0.5 ms
        # each; a third of the server's time at 8 users on CPU), so a turn streams plain values only. The message box
        # is emptied in the page when `sent` changes (a State's skip costs nothing); the saved conversation is written
        # at the first update and the last, None in between (BrowserState writes only a value, and writing it at
        # every update re-encrypted the whole conversation each time); the buttons are given back in the page when
        # the turn ends.
        sent = gr.State(0)  # messages this page has sent
        # the box lets go of the sent text only: what was typed after Enter, before the server took the message, stays
        # (new-user trial: "first", Enter, "second" at once left "econd"). Enter and Send note the text they send, at the
        # keypress itself (ui/page.py ENTER_GUARD): Gradio runs an event's js a keystroke or more later.
        let_go = """() => { const m = document.querySelector('#chat-input textarea')?.value || '';
                            const s = window.chatSentText || ''; window.chatSentText = '';
                            return m.slice(m.startsWith(s) ? s.length : 0); }"""  # the box as it is now, not as last stored
        sent.change(None, None, msg, js=let_go, api_visibility="private", queue=False)
        UNSAVED = None  # the browser keeps the conversation it saved last

        async def answer(sent_now, history, system_prompt, sampling, request):
            """Every turn once its checks passed, in as few updates as the page needs: the first shows `history`
            with the reply on its way and saves `history` (a reload mid-reply keeps the question, to answer again),
            the reply streams, and its last update saves the answer (the page gives the controls back).
            `sent_now` is the page's new `sent` count, or gr.skip(); `sampling` is the sliders' values in
            settings_from's order."""
            question, current, line, saved_last = save(history, "")[0], history, "", False
            async for update in stream_reply(slot, history, system_prompt, *sampling, request, replies, sizes):
                current, line = update
                saved_last = isinstance(update, streaming.FinalUpdate)
                if saved_last:
                    kept, line = save(current, line)
                yield (sent_now, current, line, kept if saved_last else question)
                sent_now, question = gr.skip(), UNSAVED
            if not saved_last:
                kept, shown_line = save(current, line)
                yield (sent_now, current, shown_line, kept)

        async def send_turn(
            message, history, system_prompt, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed,
            sent_before, request: gr.Request,
        ):  # fmt: skip
            """Enter and Send in one server event. A refusal comes before anything changes, so the message stays
            in the box to fix."""
            engine = streaming.engine_or_error(slot)
            replies.check(key(request))
            _, history = add_user_message(message, history)
            # too long even alone (with the system prompt): refused before it enters the chat
            alone = to_engine_messages([{"role": "user", "content": clean(message)}], clean(system_prompt or ""),
                                       reserved=engine.info.reserved)  # fmt: skip
            await streaming.fit_messages(engine, alone, engine.info.session_len or 8192, int(max_new_tokens))
            replies.accepted(key(request))
            sampling = (temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
            async for update in answer(sent_before + 1, history, system_prompt, sampling, request):  # box emptied
                yield update

        async def regenerate_turn(
            history, system_prompt, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed,
            sent_before, request: gr.Request,
        ):  # fmt: skip
            """Regenerate and the chat's Retry: answer the last question again."""
            streaming.engine_or_error(slot)
            history = regenerate(history, request, later=False)
            sampling = (temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
            async for update in answer(gr.skip(), history, system_prompt, sampling, request):
                yield update

        async def edit_turn(
            history, system_prompt, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed,
            sent_before, edit: gr.EditData, request: gr.Request,
        ):  # fmt: skip
            """An edited message: the conversation up to it, answered again. The page shows the edit already, so a
            refused one (empty, or too long for the window: refused before the turn's first update) puts the
            message back first."""
            streaming.engine_or_error(slot)
            shown = False
            try:
                sampling = (temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
                async for update in answer(gr.skip(), edited(history, edit, request), system_prompt, sampling, request):
                    shown = True
                    yield update
            except gr.Error:
                if not shown:
                    yield (gr.skip(), unedited(history, edit), gr.skip(), gr.skip())
                raise

        memo = RenderMemo()  # every turn's renders, for the chat's next turns

        def turn(triggers, fn, inputs):
            """One server event per turn, never held in Gradio's queue (a turn that waited there would repaint the
            history it joined with over a Clear or Undo made meanwhile): the engine's own queue does the waiting, and
            the stats line says so. The page locks its controls at once and gives them back when the event ends,
            however it ends, without asking the server."""
            gr.on(triggers, None, None, buttons, js=lock, api_visibility="private", queue=False)
            page_turn = streaming.refusals_as_toasts(fn, lambda e: (gr.skip(), gr.skip(), f"⚠️ {e.message}", gr.skip()))
            inputs = [*inputs, sent]
            ev = gr.on(
                triggers,
                rendered_turn(page_turn, inputs, chatbot, stats, memo),  # converts in line, unchanged messages once
                inputs,
                [sent, chatbot, stats, saved],
                preprocess=False,
                postprocess=False,
                api_visibility="private",  # the page's own event (refusals are toasts): scripts use /add_message and /chat
                concurrency_limit=None,
                concurrency_id="turns",
                show_progress="minimal",
                show_progress_on=chatbot,  # its own Retry/Edit/Undo are off while it streams; the box stays usable
            )
            ev.then(None, None, buttons, js=unlock_in_page, api_visibility="private", queue=False)  # no server request
            ev.failure(None, None, buttons, js=unlock_in_page, api_visibility="private", queue=False)  # .then skips failures
            running.append(ev)

        turn([msg.submit, send.click], send_turn, [msg, chatbot, *settings])
        # the box has the focus again for the next message (a click on Send took it), and a message of spaces alone
        # (refused: EMPTY) leaves it empty, in the page alone
        focus = "(m) => { document.querySelector('#chat-input textarea')?.focus(); return m && m.trim() ? m : ''; }"
        gr.on([msg.submit, send.click], None, msg, msg, js=focus, api_visibility="private", queue=False)
        turn([regen.click, chatbot.retry], regenerate_turn, [chatbot, *settings])
        turn([chatbot.edit], edit_turn, [chatbot, *settings])
        # the API's steps, as scripts call them: add a message (or drop the last answer), then stream the reply
        api_only = gr.Button(visible=False)
        api_only.click(accept, [msg, chatbot], [msg, chatbot], api_name="add_message", **ui)
        api_only.click(regenerate_step, chatbot, chatbot, api_name="regenerate", **ui)
        running.append(
            api_only.click(
                reply,
                [chatbot, *settings],
                [chatbot, stats],
                api_name="chat",
                concurrency_limit=concurrency,
                concurrency_id=TAB,
                show_progress="minimal",
            )  # fmt: skip
        )
        stopped = stop.click(stop_this, chatbot, [stats, saved], cancels=running, api_name="stop", queue=False)
        stopped.then(None, None, buttons, js=unlock_in_page, api_visibility="private", queue=False)  # the turn never ends it
        # no `cancels` here: the reply ends by itself, showing what Undo/Clear leave (a cancelled event's last
        # message can still land after theirs in the page)
        gr.on([undo.click, chatbot.undo], undo_this, chatbot, [chatbot, msg, saved, stats], api_name="undo", **ui)
        gr.on([clear.click, chatbot.clear], clear_this, None, [chatbot, stats, saved], api_name="clear", **ui)
        for button, write, name in (
            (export_md, export_markdown, "export_markdown"),
            (export_json, export_json_file, "export_json"),
        ):
            written = button.click(write, chatbot, export_file, api_name=name, **ui)
            written.success(None, export_file, None, js=DOWNLOAD_JS, api_visibility="private", queue=False)
        chatbot.change(None, chatbot, [export_md, export_json], js=HAS_MESSAGES_JS, api_visibility="private", queue=False)
    tab.chatbot, tab.status, tab.send, tab.stop, tab.msg, tab.saved = chatbot, status, send, stop, msg, saved
    tab.regen, tab.settings, tab.kept_settings, tab.stats = regen, settings, kept_settings, stats
    tab.settings_panel = settings_panel
    return tab
