"""A streamed turn's inputs and outputs converted in the turn itself, by the components' own preprocess and
postprocess: inputs without a worker-thread hop each, outputs once per message rather than once per update.

Gradio preprocesses each input of an event in a worker thread, one after the other. Under load, each hop waits for
the event loop, which is busy with every other stream: the ten inputs of a turn took 64-160 ms at 32 users on an
H100 before its message was shown and the engine asked (bench_app --timeline, three calls; docs/throughput.md).
Their preprocess is plain Python, so the turn events run with `preprocess=False` and convert them in line.

Gradio postprocesses every output of every streamed update: for the Chatbot that is a deep copy and a pydantic model
for each message of the history, plus a worker-thread hop for each output. A turn's updates differ in their last
message only, so the turn events run with `postprocess=False` and send what `Rendered` makes: the same values,
with the unchanged messages rendered once.

Gradio then still walked the whole chat twice per update, copying each message as it looked for files (to move
them to its cache, and to put its root URL in front of their addresses), so an update of a 20-turn chat cost more
than one of a new chat. Every message but the last goes out as JSON written once (`orjson.Fragment`): those walks
pass over it, Gradio's diff finds it unchanged (the same object), and the page receives the same JSON.

A turn is sent the whole chat, which the chat's previous turn rendered already: each turn of a 20-turn chat
rendered all of it again at its first update, and validated it again after Gradio had. Rendered text messages are
kept by a digest of their JSON for the next turns (`RenderMemo`), and the chat Gradio validated passes as it is
(`preprocessed`).
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Callable

import gradio as gr
import orjson
from gradio.exceptions import ComponentProcessingError
from gradio.utils import is_prop_update

MEMO_BYTES = 32 * 2**20  # what the kept renders of a chat component may take (RenderMemo.size)
MEMO_ENTRY_BYTES = 600  # a kept message's dicts and string objects, besides its text


def json_bytes(value) -> bytes:
    """orjson's JSON of `value` in a bytes object of its own size: orjson returns it in a buffer of at least 4 KB,
    which a kept result would hold on to (a Fragment in a session's last value, a kept render)."""
    return bytes(memoryview(orjson.dumps(value)))


class RenderMemo:
    """Text messages rendered lately, by a digest of their JSON, the least recently used dropped past `budget`
    bytes: a turn is sent the whole chat, which the chat's previous turn rendered already. One per chat component,
    shared by every session (a message's rendering depends on it and the message alone); what it keeps of a chat
    outlives a Clear until newer messages push it out."""

    def __init__(self, budget: int = MEMO_BYTES) -> None:
        self.budget, self.size = budget, 0
        self._items: OrderedDict[bytes, tuple[list[dict], list, int]] = OrderedDict()

    def get(self, key: bytes) -> tuple[list[dict], list] | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0], item[1]

    def put(self, key: bytes, rendered: list[dict], fragments: list, json_size: int) -> None:
        """Keep a message's render; `json_size` is the length of its JSON, which the render holds about twice (as
        text, and written once)."""
        if key in self._items:
            return
        size = len(key) + 2 * json_size + MEMO_ENTRY_BYTES
        self._items[key] = (rendered, fragments, size)
        self.size += size
        while self.size > self.budget and self._items:
            self.size -= self._items.popitem(last=False)[1][2]


def memo_key(message: dict) -> tuple[bytes, int] | None:
    """A digest of a text message's JSON (what its rendering depends on) and the JSON's length; None for a message
    with anything else in it."""
    content = message.get("content")
    if not (isinstance(content, str) or (isinstance(content, list) and all(_is_text(p) for p in content))):
        return None
    try:
        data = orjson.dumps(message)
    except orjson.JSONEncodeError:
        return None
    return hashlib.blake2b(data, digest_size=16).digest(), len(data)


def _is_text(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "text"


def _text_and_files(chat) -> bool:
    """A chat as Gradio dumps it whose message parts are all text or files (no component messages)."""
    return isinstance(chat, list) and all(
        isinstance(m, dict)
        and isinstance(m.get("content"), list)
        and all(isinstance(p, dict) and p.get("type") in ("text", "file") for p in m["content"])
        for m in chat
    )


def as_json(message: dict) -> orjson.Fragment | dict:
    """A rendered text message as JSON written once. A message with a file stays a dict: Gradio's walks must
    find the file, to cache it and give it its URL. (Gradio cannot copy a Fragment: its session keeps the last
    value sent, which only a gr.DeepLinkButton would copy; the page has none.)"""
    if all(part.get("type") == "text" for part in message.get("content") or []):
        return orjson.Fragment(json_bytes(message))
    return message


class Rendered:
    """One turn's renderer: the chat through `chatbot.postprocess`, message by message with the results kept, and
    the stats line through `stats.postprocess`. Updates (gr.skip()) pass as they are.

    The components are the ones built with the page, not a session's copy: nothing sends these two a gr.update, so
    the copies would render the same. A message is rendered again when it is a different object that compares
    unequal; the stream replaces the growing answer with a new dict at each update (ui.streaming.stream_into).
    """

    def __init__(self, chatbot: gr.Chatbot, stats: gr.Markdown, memo: RenderMemo | None = None) -> None:
        self.chatbot, self.stats = chatbot, stats
        self._memo = memo if memo is not None else RenderMemo()
        # by position: the message, what it renders to, and that as JSON written once (as_json)
        self._messages: list[tuple[dict, list[dict], list[orjson.Fragment | dict]]] = []

    def chat(self, history: list[dict] | dict) -> list | dict:
        """The history as the page receives it (Chatbot.postprocess, model_dump), every message but the last as
        JSON written once."""
        if is_prop_update(history):
            return history
        out = []
        for i, message in enumerate(history):
            kept = self._messages[i] if i < len(self._messages) else None
            if kept is None or not (kept[0] is message or kept[0] == message):
                kept = (message, *self._render(message, keep=i < len(history) - 1))
                self._messages[i:] = [kept]  # what follows a changed message is looked at again too
            out.extend(kept[1] if i == len(history) - 1 else kept[2])
        return out

    def _render(self, message: dict, keep: bool) -> tuple[list[dict], list]:
        """The message rendered, and as JSON written once: from an earlier turn when it is text rendered before;
        kept for the next turns if `keep` (not the growing answer, which is new at every update)."""
        key = memo_key(message)
        item = self._memo.get(key[0]) if key is not None else None
        if item is None:
            rendered = self.chatbot.postprocess([message]).model_dump()
            item = (rendered, [as_json(m) for m in rendered])
            if key is not None and keep:
                self._memo.put(key[0], *item, key[1])
        return item

    def line(self, text: str | dict) -> str | dict:
        """The stats line as the page receives it (Markdown.postprocess)."""
        return text if is_prop_update(text) else self.stats.postprocess(text)


def preprocessed(components: list[gr.components.Component], values: tuple) -> list:
    """What Gradio's preprocess would hand the function for these inputs: each value validated into the component's
    data model, when it has one, then through its `preprocess`; a refusal (gr.Error, e.g. a slider below its
    minimum) as it is, anything else as Gradio's own ComponentProcessingError. States pass as they are (Gradio
    gives a State's value from the session either way). These are the page's components, not a session's copies:
    no event sends these inputs new properties.

    `values` are what Gradio's preprocess_data hands over with preprocess off: each validated already and dumped
    back to plain data. For a chat of text and files, that is what Chatbot.preprocess makes (each message's
    model_dump), so it passes as it is, in a list of its own. Its messages are the dicts Gradio keeps as the
    session's last value of the chat: a turn must copy a message to change it (clean_history does)."""
    out = []
    for i, (comp, value) in enumerate(zip(components, values)):
        if comp.stateful:
            out.append(value)
            continue
        if isinstance(comp, gr.Chatbot) and _text_and_files(value):
            out.append(list(value))
            continue
        model = getattr(comp, "data_model", None)
        try:
            out.append(comp.preprocess(model.model_validate(value) if model is not None and value is not None else value))
        except gr.Error:
            raise
        except Exception as e:
            raise ComponentProcessingError(
                f"Could not preprocess input component at index {i} (a `{comp.get_block_name()}` component): {e}"
            ) from e
    return out


def rendered_turn(
    turn: Callable, inputs: list, chatbot: gr.Chatbot, stats: gr.Markdown, memo: RenderMemo | None = None
) -> Callable:
    """A page turn taking `inputs` and yielding (sent, history, stats line, saved): its inputs preprocessed and its
    history and line rendered in line, with the renders `memo` kept from earlier turns; register it with
    `preprocess=False, postprocess=False`. State and BrowserState values need no rendering. Gradio's own arguments
    (gr.Request, gr.EditData) pass as they are."""

    @functools.wraps(turn)  # Gradio reads the signature (gr.Request, gr.EditData) through the wrapper
    async def page_turn(*args, **kwargs):
        args = (*preprocessed(inputs, args[: len(inputs)]), *args[len(inputs) :])
        render = Rendered(chatbot, stats, memo)
        async for sent, history, line, saved in turn(*args, **kwargs):
            yield sent, render.chat(history), render.line(line), saved

    return page_turn
