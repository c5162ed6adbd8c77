"""Tab "Chat": InternLM2 with streaming, stop, regenerate, undo/edit, sampling settings and exports."""

from __future__ import annotations

import gradio as gr

from model_loader.engines.slot import EngineSlot
from ui import streaming
from ui.conversation import text_of, to_engine_messages

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


def add_user_message(message: str, history: list[dict]) -> tuple[str, list[dict]]:
    """Put the user's message into the chat; empty messages are refused with a note."""
    if not message or not message.strip():
        raise gr.Error("Please type a message first.", title="Empty message")
    return "", (history or []) + [{"role": "user", "content": message}]


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
):
    """Stream InternLM2's answer to the conversation's last user message."""
    engine = streaming.engine_or_error(slot)
    history = list(history or [])
    if not history or history[-1].get("role") != "user":
        raise gr.Error("There is no question to answer; send a message first.", title="Nothing to answer")
    settings = streaming.settings_from(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
    messages = to_engine_messages(history, system_prompt or "", reserved=engine.info.reserved)
    messages, notice = await streaming.fit_messages(engine, messages, engine.info.session_len or 8192, settings.max_new_tokens)
    sid = streaming.session_id(request, "text")
    async for update in streaming.stream_into(history, engine.stream(sid, messages, settings), notice, engine.active_sessions):
        yield update


async def stop_reply(slot: EngineSlot, request: gr.Request) -> str:
    """Stop this browser's running reply now (the event itself is cancelled too); the stats line says so."""
    if slot.ready:
        await slot.engine.stop(streaming.session_id(request, "text"))
    return streaming.STOPPED


def drop_last_reply(history: list[dict]) -> list[dict]:
    """Regenerate: remove the last assistant answer so the question is answered again."""
    history = list(history or [])
    while history and history[-1].get("role") == "assistant":
        history.pop()
    return history


def undo_last_turn(history: list[dict]) -> tuple[list[dict], str]:
    """Undo: remove the last question and its answer, and put the question back in the box to edit."""
    history = drop_last_reply(history)
    text = ""
    if history and history[-1].get("role") == "user":
        text = text_of(history.pop().get("content"))
    return history, text


def edit_message(history: list[dict], edit: gr.EditData) -> list[dict]:
    """Editing a message in the chat keeps the conversation up to it, with the new text."""
    history = list(history or [])[: edit.index + 1]
    history[edit.index] = {"role": history[edit.index]["role"], "content": edit.value}
    return history


def build_chat_tab(slot: EngineSlot, i18n, concurrency: int, saved: gr.BrowserState) -> gr.Blocks:
    """The Chat tab's Blocks; `saved` keeps the conversation in the browser across reloads."""
    with gr.Blocks() as tab:
        status = gr.Markdown(elem_id="chat-status")
        chatbot = gr.Chatbot(
            label="InternLM2-Chat-1.8B",
            elem_id="chatbot",
            height=480,
            editable="user",
            buttons=["copy", "copy_all"],
            layout="bubble",
            latex_delimiters=[{"left": "$$", "right": "$$", "display": True}],
        )
        stats = gr.Markdown(elem_id="chat-stats")
        with gr.Row():
            msg = gr.Textbox(
                label=i18n("message"),
                placeholder=i18n("message_ph"),
                lines=2,
                max_lines=12,
                scale=8,
                elem_id="chat-input",
                submit_btn=False,
            )
            with gr.Column(scale=1, min_width=120):
                send = gr.Button(i18n("send"), variant="primary", elem_id="chat-send")
                stop = gr.Button(i18n("stop"), variant="stop", elem_id="chat-stop")
        with gr.Row():
            regen = gr.Button(i18n("regenerate"), size="sm", elem_id="chat-regenerate")
            undo = gr.Button(i18n("undo"), size="sm", elem_id="chat-undo")
            clear = gr.Button(i18n("clear"), size="sm", elem_id="chat-clear")
        gr.Examples(EXAMPLES, inputs=msg, label=i18n("examples"))
        with gr.Accordion(i18n("settings"), open=False):
            system = gr.Textbox(DEFAULT_SYSTEM, label=i18n("system_prompt"), lines=3, elem_id="chat-system")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, 0.8, step=0.05, label=i18n("temperature"))
                top_p = gr.Slider(0.05, 1.0, 0.8, step=0.05, label=i18n("top_p"))
                top_k = gr.Slider(1, 100, 40, step=1, label=i18n("top_k"))
            with gr.Row():
                max_new = gr.Slider(16, 4096, 1024, step=16, label=i18n("max_new_tokens"))
                rep = gr.Slider(1.0, 1.5, 1.0, step=0.01, label=i18n("repetition_penalty"))
                seed = gr.Number(0, precision=0, label=i18n("seed"))
        with gr.Accordion(i18n("export"), open=False):
            with gr.Row():
                export_md = gr.Button(i18n("export_md"), size="sm")
                export_json = gr.Button(i18n("export_json"), size="sm")
            export_file = gr.File(label=i18n("export"), interactive=False)

        async def reply(
            history, system_prompt, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed, request: gr.Request
        ):
            async for update in stream_reply(
                slot, history, system_prompt, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed, request
            ):
                yield update

        async def stop_this(request: gr.Request) -> str:
            return await stop_reply(slot, request)

        settings = [system, temperature, top_p, top_k, max_new, rep, seed]
        limit = dict(concurrency_limit=concurrency, concurrency_id="text")

        def chain(event, name):
            ev = event.then(reply, [chatbot, *settings], [chatbot, stats], api_name=name, **limit)
            ev.then(lambda h: h, chatbot, saved, api_name=False, queue=False)
            return ev

        submitted = msg.submit(add_user_message, [msg, chatbot], [msg, chatbot], api_name="add_message", queue=False)
        sent = send.click(add_user_message, [msg, chatbot], [msg, chatbot], api_name=False, queue=False)
        ev_submit = chain(submitted, "chat")
        ev_send = chain(sent, False)
        # the API route that answers a history in one call (gradio_client, bench)
        ev_regen = chain(regen.click(drop_last_reply, chatbot, chatbot, api_name="regenerate", queue=False), False)
        ev_retry = chain(chatbot.retry(drop_last_reply, chatbot, chatbot, api_name=False, queue=False), False)
        ev_edit = chain(chatbot.edit(edit_message, chatbot, chatbot, api_name=False, queue=False), False)
        running = [ev_submit, ev_send, ev_regen, ev_retry, ev_edit]
        stop.click(stop_this, None, stats, cancels=running, api_name="stop", queue=False)
        undo.click(undo_last_turn, chatbot, [chatbot, msg], api_name="undo", queue=False).then(
            lambda h: h, chatbot, saved, api_name=False, queue=False
        )
        chatbot.undo(undo_last_turn, chatbot, [chatbot, msg], api_name=False, queue=False)
        clear.click(lambda: ([], "", []), None, [chatbot, stats, saved], api_name="clear", queue=False)
        export_md.click(lambda h: streaming.export_file(h, "md"), chatbot, export_file, api_name="export_markdown")
        export_json.click(lambda h: streaming.export_file(h, "json"), chatbot, export_file, api_name="export_json")
    tab.chatbot, tab.status, tab.send, tab.msg, tab.saved = chatbot, status, send, msg, saved
    return tab
