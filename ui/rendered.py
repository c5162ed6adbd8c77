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
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import gradio as gr
import orjson
from gradio.exceptions import ComponentProcessingError
from gradio.utils import is_prop_update


def as_json(message: dict) -> orjson.Fragment | dict:
    """A rendered text message as JSON written once. A message with a file stays a dict: Gradio's walks must
    find the file, to cache it and give it its URL. (Gradio cannot copy a Fragment: its session keeps the last
    value sent, which only a gr.DeepLinkButton would copy; the page has none.)"""
    if all(part.get("type") == "text" for part in message.get("content") or []):
        return orjson.Fragment(orjson.dumps(message))
    return message


class Rendered:
    """One turn's renderer: the chat through `chatbot.postprocess`, message by message with the results kept, and
    the stats line through `stats.postprocess`. Updates (gr.skip()) pass as they are.

    The components are the ones built with the page, not a session's copy: nothing sends these two a gr.update, so
    the copies would render the same. A message is rendered again when it is a different object that compares
    unequal; the stream replaces the growing answer with a new dict at each update (ui.streaming.stream_into).
    """

    def __init__(self, chatbot: gr.Chatbot, stats: gr.Markdown) -> None:
        self.chatbot, self.stats = chatbot, stats
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
                rendered = self.chatbot.postprocess([message]).model_dump()
                kept = (message, rendered, [as_json(m) for m in rendered])
                self._messages[i:] = [kept]  # what follows a changed message is rendered again too
            out.extend(kept[1] if i == len(history) - 1 else kept[2])
        return out

    def line(self, text: str | dict) -> str | dict:
        """The stats line as the page receives it (Markdown.postprocess)."""
        return text if is_prop_update(text) else self.stats.postprocess(text)


def preprocessed(components: list[gr.components.Component], values: tuple) -> list:
    """What Gradio's preprocess would hand the function for these inputs: each value validated into the component's
    data model, when it has one, then through its `preprocess`; a refusal (gr.Error, e.g. a slider below its
    minimum) as it is, anything else as Gradio's own ComponentProcessingError. States pass as they are (Gradio
    gives a State's value from the session either way). These are the page's components, not a session's copies:
    no event sends these inputs new properties."""
    out = []
    for i, (comp, value) in enumerate(zip(components, values)):
        if comp.stateful:
            out.append(value)
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


def rendered_turn(turn: Callable, inputs: list, chatbot: gr.Chatbot, stats: gr.Markdown) -> Callable:
    """A page turn taking `inputs` and yielding (sent, history, stats line, saved): its inputs preprocessed and its
    history and line rendered in line; register it with `preprocess=False, postprocess=False`. State and
    BrowserState values need no rendering. Gradio's own arguments (gr.Request, gr.EditData) pass as they are."""

    @functools.wraps(turn)  # Gradio reads the signature (gr.Request, gr.EditData) through the wrapper
    async def page_turn(*args, **kwargs):
        args = (*preprocessed(inputs, args[: len(inputs)]), *args[len(inputs) :])
        render = Rendered(chatbot, stats)
        async for sent, history, line, saved in turn(*args, **kwargs):
            yield sent, render.chat(history), render.line(line), saved

    return page_turn
