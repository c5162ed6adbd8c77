"""Tab "Image chat": ask LLaVA several questions about an uploaded (dropped, pasted) image; replace it any time."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from model_loader.engines.slot import EngineSlot
from model_loader.errors import BadInput
from ui import streaming
from ui.conversation import is_image_message, to_vision_messages
from ui.images import load_image


def prepare_image(path: str | None, history: list[dict], max_pixels: int) -> tuple[list[dict], str | None]:
    """A new image starts a new topic in the conversation; non-images and bombs get a clear message."""
    history = list(history or [])
    if not path:
        return history, None
    try:
        img = load_image(path, max_pixels)
    except BadInput as e:
        raise streaming.show_error(e) from e
    out = Path(tempfile.mkdtemp(prefix="chat-image-")) / (Path(path).stem + ".png")
    img.save(out)
    history.append({"role": "user", "content": {"path": str(out), "mime_type": "image/png"}})
    return history, str(out)


def add_question(question: str, history: list[dict], image: str | None) -> tuple[str, list[dict]]:
    """Queue a question about the current image."""
    if not image:
        raise gr.Error("Upload an image first (click, drop or paste it into the image box).", title="No image")
    if not question or not question.strip():
        raise gr.Error("Please type a question about the image.", title="Empty question")
    return "", list(history or []) + [{"role": "user", "content": question}]


async def stream_image_reply(
    slot: EngineSlot,
    max_pixels: int,
    image: str | None,
    history: list[dict],
    temperature: float,
    max_new_tokens: int,
    request: gr.Request,
):
    """Stream LLaVA's answer to the last question about `image`."""
    engine = streaming.engine_or_error(slot)
    history = list(history or [])
    if not image:
        raise gr.Error("Upload an image first.", title="No image")
    if not history or history[-1].get("role") != "user" or is_image_message(history[-1]):
        raise gr.Error("Ask a question about the image first.", title="Nothing to answer")
    try:
        img = load_image(image, max_pixels)
    except BadInput as e:
        raise streaming.show_error(e) from e
    settings = streaming.settings_from(temperature, 0.8, 40, max_new_tokens, 1.0, 0)
    messages = to_vision_messages(history, img, reserved=engine.info.reserved)
    messages, notice = await streaming.fit_messages(engine, messages, engine.info.session_len or 4096, settings.max_new_tokens)
    if not any(isinstance(m["content"], list) for m in messages):  # the image itself was trimmed away
        messages[-1]["content"] = [{"type": "text", "text": messages[-1]["content"]}, {"type": "image", "image": img}]
    sid = streaming.session_id(request, "vision")
    async for update in streaming.stream_into(history, engine.stream(sid, messages, settings), notice, engine.active_sessions):
        yield update


async def stop_image_reply(slot: EngineSlot, request: gr.Request) -> str:
    """Stop this browser's running image reply; the stats line says so."""
    if slot.ready:
        await slot.engine.stop(streaming.session_id(request, "vision"))
    return streaming.STOPPED


def build_image_tab(slot: EngineSlot, i18n, concurrency: int, max_pixels: int) -> gr.Blocks:
    """The Image chat tab's Blocks."""
    with gr.Blocks() as tab:
        status = gr.Markdown(elem_id="image-status")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(
                    type="filepath", label=i18n("image"), sources=["upload", "clipboard"], elem_id="image-input", height=360
                )
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="LLaVA", elem_id="image-chatbot", height=420, buttons=["copy"])
                stats = gr.Markdown(elem_id="image-stats")
        with gr.Row():
            question = gr.Textbox(label=i18n("question"), placeholder=i18n("question_ph"), scale=8, elem_id="image-question")
            ask = gr.Button(i18n("ask"), variant="primary", scale=1, elem_id="image-ask")
            stop = gr.Button(i18n("stop"), variant="stop", scale=1, elem_id="image-stop")
            clear = gr.Button(i18n("clear"), scale=1, elem_id="image-clear")
        with gr.Accordion(i18n("settings"), open=False):
            temperature = gr.Slider(0.0, 2.0, 0.2, step=0.05, label=i18n("temperature"))
            max_new = gr.Slider(16, 2048, 512, step=16, label=i18n("max_new_tokens"))
        gr.Examples(
            ["What is in this image?", "Describe the image in detail.", "这张图片里有什么？"],
            inputs=question,
            label=i18n("examples"),
        )

        async def reply(image, history, temperature, max_new_tokens, request: gr.Request):
            async for update in stream_image_reply(slot, max_pixels, image, history, temperature, max_new_tokens, request):
                yield update

        async def stop_this(request: gr.Request) -> str:
            return await stop_image_reply(slot, request)

        def on_upload(path, history):
            return prepare_image(path, history, max_pixels)

        limit = dict(concurrency_limit=concurrency, concurrency_id="vision")
        image.upload(on_upload, [image, chatbot], [chatbot, image], api_name="set_image", queue=False)
        asked = [
            question.submit(add_question, [question, chatbot, image], [question, chatbot], api_name="add_question", queue=False),
            ask.click(add_question, [question, chatbot, image], [question, chatbot], api_name=False, queue=False),
        ]
        running = [
            ev.then(
                reply,
                [image, chatbot, temperature, max_new],
                [chatbot, stats],
                api_name="image_chat" if i == 0 else False,
                **limit,
            )
            for i, ev in enumerate(asked)
        ]
        stop.click(stop_this, None, stats, cancels=running, api_name="stop_image", queue=False)
        clear.click(lambda: ([], None, ""), None, [chatbot, image, stats], api_name="clear_image", queue=False)
    tab.status, tab.ask = status, ask
    return tab
