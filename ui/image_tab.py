"""Tab "Image chat": ask LLaVA several questions about an uploaded (dropped, pasted) image; replace it any time.

Events that take the image run with preprocess=False: Gradio would otherwise open (and for gr.Image's default
mode, decode and convert) the upload before our checks. We read its header first (ui.images) and show the
converted picture as the preview, so what the user sees is what the model gets.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import gradio as gr
from gradio_client.utils import strip_invalid_filename_characters

from model_loader.engines.seam import GenSettings
from model_loader.engines.slot import EngineSlot
from model_loader.errors import BadInput
from ui import streaming
from ui.chatbot import client_copy, for_caller, lenient_chatbot
from ui.conversation import is_image_message, to_vision_messages
from ui.example_images import write_examples
from ui.files import Scratch
from ui.images import ShrunkImages, load_image
from ui.user_text import clean, clean_history, shown, typed_history

TAB = "vision"
NO_IMAGE = "Upload an image first (click, drop or paste it into the image box)."


def path_of(image) -> str | None:
    """The server path of an image input: a FileData dict (preprocess=False), or a path string."""
    if isinstance(image, dict):
        return image.get("path") or None
    return image or None


def own_pictures(history: list[dict], image, folder: Path) -> list[dict]:
    """The pictures a client sent back as its own copies (ui.chatbot) as this server's files: the picture of that
    name this session was sent, else, for the chat's last picture, the image being asked about. One the server no
    longer has stays in the chat as its name (it only marks where an earlier topic began)."""
    if not any(client_copy(p) for m in history if isinstance(m.get("content"), list) for p in m["content"]):
        return history
    dated = []
    for f in folder.glob("*/*.png") if folder.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):  # a parallel call of this session may clear it meanwhile
            dated.append((f.stat().st_mtime, f))
    sent = {strip_invalid_filename_characters(f.name): str(f) for _, f in sorted(dated)}  # the newest of a name wins
    last = max((i for i, m in enumerate(history) if is_image_message(m)), default=-1)
    current = path_of(image)

    def own(part, i: int):
        name = client_copy(part)
        if name is None:
            return part
        path = sent.get(name) or (current if i == last else None)
        if path is None:
            return {"type": "text", "text": f"[{name}]"}
        return {"type": "file", "file": {"path": path, "mime_type": "image/png", "meta": {"_type": "gradio.FileData"}}}

    return [
        {**m, "content": [own(p, i) for p in m["content"]]} if isinstance(m.get("content"), list) else m
        for i, m in enumerate(history)
    ]


def prepare_image(image, history: list[dict], max_pixels: int, scratch: Scratch, session: str) -> tuple[list[dict], str | None]:
    """A new image starts a new topic in the conversation; non-images and bombs get a clear message."""
    history = own_pictures(clean_history(history), None, scratch.folder(session))
    path = path_of(image)
    if not path:
        return history, None
    try:
        img = load_image(path, max_pixels)
    except BadInput as e:
        raise streaming.show_error(e) from e
    out = scratch.path(session, Path(path).stem[:60] + ".png")
    img.save(out)
    history.append({"role": "user", "content": {"path": str(out), "mime_type": "image/png"}})
    return history, str(out)


def add_question(question: str, history: list[dict], image) -> tuple[str, list[dict]]:
    """Queue a question about the current image."""
    if not path_of(image):
        raise streaming.refuse(NO_IMAGE, "No image")
    question = clean(question)
    if not question.strip():
        raise streaming.refuse("Please type a question about the image.", "Empty question")
    return "", clean_history(history) + [{"role": "user", "content": shown(question)}]


async def stream_image_reply(
    slot: EngineSlot,
    max_pixels: int,
    shrunk: ShrunkImages,
    replies: streaming.Replies,
    image,
    history: list[dict],
    sampling: tuple,
    request: gr.Request,
):
    """Stream LLaVA's answer to the last question about `image` (one reply at a time per chat); `sampling` is the
    sliders' values in settings_from's order."""
    engine = streaming.engine_or_error(slot)
    history = clean_history(history)
    path = path_of(image)
    if not path:
        raise streaming.refuse(NO_IMAGE, "No image")
    asked = history if not (history and is_image_message(history[-1])) else []  # an image alone asks nothing
    streaming.require_question(
        asked, "Ask a question about the image first.", "Please type a question about the image.", "Empty question"
    )

    async def updates():
        try:
            img = await asyncio.to_thread(shrunk.load, path, max_pixels)  # decoding must not hold up the event loop
        except BadInput as e:
            raise streaming.show_error(e) from e
        settings = streaming.settings_from(*sampling)
        messages = to_vision_messages(typed_history(history), img, reserved=engine.info.reserved)
        messages, notice = await streaming.fit_messages(
            engine, messages, engine.info.session_len or 4096, settings.max_new_tokens
        )
        if not any(isinstance(m["content"], list) for m in messages):  # the image itself was trimmed away
            messages[-1]["content"] = [{"type": "text", "text": messages[-1]["content"]}, {"type": "image", "image": img}]
        async for update in streaming.reply_updates(engine, history, messages, settings, notice, request, TAB):
            yield update

    async for update in replies.stream(streaming.chat_key(request, TAB), updates()):
        yield update


def build_image_tab(
    slot: EngineSlot, i18n, concurrency: int, max_pixels: int, replies: streaming.Replies, scratch: Scratch
) -> gr.Blocks:
    """The Image chat tab's Blocks."""
    shrunk = ShrunkImages()
    with gr.Blocks() as tab:
        status = gr.Markdown(elem_id="image-status")
        with gr.Row(elem_id="image-layout"):
            with gr.Column(scale=2, min_width=280):
                image = gr.Image(  # the labels are not shown: they name the API's outputs
                    label="image",
                    type="filepath",
                    image_mode=None,  # never converted by Gradio; preprocess is off for our events anyway
                    show_label=False,
                    sources=["upload", "clipboard"],
                    elem_id="image-input",
                    height=320,
                )
            with gr.Column(scale=3, min_width=280):
                chatbot = lenient_chatbot(
                    files=True,
                    label="history",
                    show_label=False,
                    elem_id="image-chatbot",
                    height=380,
                    buttons=["copy"],
                    layout="bubble",
                    placeholder=i18n("image_placeholder"),
                )
                stats = streaming.stats_line("image-stats")
        with gr.Row(elem_id="image-compose", equal_height=True):
            question = streaming.message_box("question", i18n("question_ph"), 6, "image-question")
            with gr.Column(scale=1, min_width=96, elem_classes="compose-buttons"):
                ask = gr.Button(i18n("ask"), variant="primary", elem_id="image-ask")
                stop = gr.Button(i18n("stop"), variant="stop", elem_id="image-stop", interactive=False)
        with gr.Row(elem_classes="tool-row"):
            clear = gr.Button(i18n("clear"), size="sm", elem_id="image-clear")
        examples = write_examples(scratch.shared("examples"))
        gallery = gr.Gallery(
            examples,
            label=i18n("examples"),
            columns=3,
            rows=1,
            preview=False,
            height="auto",
            object_fit="contain",
            allow_preview=False,
            buttons=[],
            interactive=False,
            elem_id="image-examples",
        )
        with gr.Accordion(i18n("settings"), open=False):
            defaults = GenSettings(temperature=0.2, max_new_tokens=512)  # a description wants few surprises
            temperature, top_p, top_k, max_new, rep, seed = streaming.sampling_sliders(i18n, defaults, 2048)

        def key(request: gr.Request) -> str:
            return streaming.chat_key(request, TAB)

        def session(request: gr.Request) -> str:
            return getattr(request, "session_hash", None) or "anonymous"

        def on_upload(image, history, request: gr.Request):
            replies.check(key(request))
            history, preview = prepare_image(image, history, max_pixels, scratch, session(request))
            return for_caller(history, request), preview

        def own(history, image, request: gr.Request) -> list[dict]:
            return own_pictures(clean_history(history), image, scratch.folder(session(request)))

        def accept(question, history, image, request: gr.Request):
            replies.check(key(request))
            box, history = add_question(question, own(history, image, request), image)
            replies.accepted(key(request))  # the page asks at once; a Clear before its reply starts is kept for it
            return box, for_caller(history, request)

        async def reply(image, history, temperature, max_new_tokens, top_p, top_k, repetition_penalty, seed, request: gr.Request):
            sampling = (temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)
            history = own(history, image, request)
            async for held, line in stream_image_reply(slot, max_pixels, shrunk, replies, image, history, sampling, request):
                yield for_caller(held, request), line

        async def stop_this(request: gr.Request) -> str:
            return await streaming.stop_reply(slot, request, TAB, replies)

        async def clear_this(request: gr.Request):
            replies.replace(key(request), [], request, TAB)  # a running or waiting reply ends showing the cleared chat
            if replies.busy(key(request)):
                await streaming.stop_reply(slot, request, TAB)
                await replies.wait_idle(key(request))
            return [], None, ""

        def unlock():
            on = slot.ready
            return gr.update(interactive=on), gr.update(interactive=False), gr.update(interactive=True)

        ui = dict(concurrency_limit=None, concurrency_id="ui", show_progress="minimal")
        controls = [ask, stop, image]
        api_only = gr.Button(visible=False)  # the API's own step: an upload refused with an error, as scripts expect
        api_only.click(on_upload, [image, chatbot], [chatbot, image], api_name="set_image", preprocess=False, **ui)

        def on_upload_in_page(image, history, request: gr.Request):
            """A refused upload says why in a toast and leaves the box empty (a failed event would put Gradio's red
            "Error" pill over the picture it refused, and keep showing that picture)."""
            try:
                return on_upload(image, history, request)
            except gr.Error as e:
                gr.Warning(e.message, title=e.title)
                return gr.skip(), None

        image.upload(on_upload_in_page, [image, chatbot], [chatbot, image], api_visibility="private", preprocess=False, **ui)
        # lock in the page at once (Ask off, Stop on, the image fixed), before the server has even seen the question
        lock = streaming.interactive_js(False, True, False)
        gr.on([question.submit, ask.click], None, None, controls, js=lock, api_visibility="private", queue=False)
        # a failed event marks its outputs with Gradio's red "Error" pill; the refusal's text is in the toast, so the
        # check writes here (invisible) and the chat and question change only once it has passed
        sink = gr.Textbox(visible=False)

        def check_question(q, history, image, request: gr.Request) -> str:
            """A refusal is a warning toast, as in the chat tab; the event still fails (without a toast of its own)
            so that the question is neither added nor asked."""
            try:
                accept(q, history, image, request)
            except gr.Error as e:
                gr.Warning(e.message, title=e.title)
                raise gr.Error(e.message, title=e.title, visible=False, print_exception=False) from e
            return ""

        checked = gr.on(
            [question.submit, ask.click], check_question, [question, chatbot, image], sink, api_visibility="private",
            preprocess=False, **ui,
        )  # fmt: skip
        checked.failure(unlock, None, controls, api_visibility="private", queue=False)
        accepted = checked.success(
            accept, [question, chatbot, image], [question, chatbot], api_name="add_question", preprocess=False, **ui
        )
        accepted.failure(unlock, None, controls, api_visibility="private", queue=False)
        running = accepted.success(
            reply,
            [image, chatbot, temperature, max_new, top_p, top_k, rep, seed],  # the API's first four are as before
            [chatbot, stats],
            api_name="image_chat",
            preprocess=False,
            concurrency_limit=concurrency,
            concurrency_id=TAB,
            show_progress="minimal",
        )
        running.then(unlock, None, controls, api_visibility="private", queue=False)
        running.failure(unlock, None, controls, api_visibility="private", queue=False)
        stop.click(stop_this, None, stats, cancels=[running], api_name="stop_image", queue=False)
        gr.on(
            [clear.click, chatbot.clear],
            clear_this,
            None,
            [chatbot, image, stats],
            api_name="clear_image",
            **ui,
        )

        def use_example(history, evt: gr.SelectData, request: gr.Request):
            """An example picture replaces the image and starts a new topic; its question waits in the box."""
            replies.check(key(request))
            path, text = examples[evt.index]
            history, preview = prepare_image(path, history, max_pixels, scratch, session(request))
            return history, preview, text

        gallery.select(use_example, chatbot, [chatbot, image, question], api_visibility="private", **ui)
    tab.status, tab.ask, tab.stop, tab.chatbot, tab.image = status, ask, stop, chatbot, image
    return tab
