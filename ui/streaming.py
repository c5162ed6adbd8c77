"""What both chat tabs share: the browser's engine session, one reply at a time per chat, the throttled stream,
and refusals shown in one place."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import html
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import gradio as gr

from model_loader.engines.seam import ChatEngine, Delta, GenSettings, Stats, ignored_settings
from model_loader.engines.slot import EngineSlot
from model_loader.errors import AppError
from ui.conversation import format_stats, settings_note, text_of, to_json, to_markdown, token_upper_bound, trim_note, trim_to_fit
from ui.files import Scratch
from ui.user_text import typed

if TYPE_CHECKING:
    from ui.prompt_sizes import PromptSizes

log = logging.getLogger(__name__)

# One UI update per this many seconds while streaming (the first token is sent at once). Gradio's per-update work
# shares the interpreter with lmdeploy's per-token Python loop, so with many users each stream is updated less
# often (bench/results: 16 users on an H100). 20 updates a second read as smooth; 5 still read as streaming.
UI_INTERVAL_S = 0.05
BUSY_STREAMS_PER_STEP = 8
MAX_UI_INTERVAL_S = 0.25
# a chat of more UTF-8 bytes than this per token of the window is trimmed at once; under it, it may fit and is
# counted whole first (trimming counts every turn with the question, then the kept chat: 2-3 times the tokens)
LIKELY_BYTES_PER_TOKEN = 5  # a margin over English text, which large BPE vocabularies encode at about 4 bytes a token
MIN_MAX_NEW_TOKENS = 16  # the Max new tokens slider's minimum and step
STOPPED = "⏹ Stopped: the reply above is as far as it got."
NOTHING_TO_STOP = "Nothing is being written in this chat right now."
WAIT_POLL_S = 0.5  # how often a reply that has no text yet checks whether it waits for a free slot
BUSY = "A reply is still being written in this chat. Wait for it to finish, or press Stop."


def ui_interval(active_streams: int) -> float:
    """Seconds between UI updates of one stream: 50 ms up to 8 streams, then growing with the load (max 0.25 s)."""
    return min(MAX_UI_INTERVAL_S, UI_INTERVAL_S * max(1.0, active_streams / BUSY_STREAMS_PER_STEP))


def session_id(request: gr.Request | None, tab: str) -> int:
    """A stable engine session id per browser session and tab."""
    key = f"{getattr(request, 'session_hash', None) or 'anonymous'}:{tab}"
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


def chat_key(request: gr.Request | None, tab: str) -> str:
    """One chat = one browser session (page load) and one tab; a call without a session is a chat of its own."""
    return f"{getattr(request, 'session_hash', None) or id(request)}:{tab}"


def refuse(message: str, title: str = "Not sent") -> gr.Error:
    """The one way a refusal reaches the user: readable text (escaped, Gradio shows it as HTML), one log line.

    Raise it only from queued events: Gradio 6 shows an unqueued event's error as a bare "Error" pill.
    """
    log.info("refused (%s): %s", title, message)
    return gr.Error(html.escape(message, quote=False), title=title, print_exception=False)  # text, not an attribute


def refusals_as_toasts(turn: Callable, last: Callable[[gr.Error], tuple]) -> Callable:
    """A page turn whose refusals (raised before or while it streams) become a warning toast and end with
    `last(refusal)` instead of failing the event: a failed event puts Gradio's red "Error" pill over its outputs, the chat and the
    message box, and the refusal's own text is in the toast already."""

    @functools.wraps(turn)  # Gradio reads the signature (gr.Request, gr.EditData) through the wrapper
    async def page_turn(*args, **kwargs):
        try:
            async for update in turn(*args, **kwargs):
                yield update
        except gr.Error as e:
            gr.Warning(e.message, title=e.title)
            yield last(e)

    return page_turn


def engine_or_error(slot: EngineSlot) -> ChatEngine:
    """The slot's engine, or a refusal saying why it is not there (yet)."""
    if slot.ready:
        return slot.engine
    if slot.state == "failed":
        raise refuse(slot.message, "Engine unavailable")
    if slot.state == "disabled":
        raise refuse("This model is disabled in this deployment.", "Disabled")
    raise refuse(f"The model is still starting: {slot.message}", "Please wait")


def show_error(e: AppError) -> gr.Error:
    """The single place where named errors become what the user reads ("BadInput" -> "Bad input")."""
    title = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", type(e).__name__).capitalize()
    return refuse(str(e), title)


class FinalUpdate(tuple):
    """A reply's last update, (history, stats line): the chat it shows is the reply's end, so the page saves it with
    this update instead of sending one more (each update is work for the page's one process; issue 14)."""


class Replies:
    """The chats with a reply streaming (or accepted and waiting in the queue): a second reply in the same chat is
    refused, and Clear/Undo make the reply end showing what they left, so whatever the page draws last, it draws
    that. (Cancelling the event instead is not enough: its last update can still land after theirs in the page.)"""

    def __init__(self) -> None:
        self._done: dict[str, asyncio.Event] = {}
        self._pending: set[str] = set()  # accepted, reply not started yet
        self._later: set[str] = set()  # of those, the ones whose reply is a later call (/add_message, then /chat)
        self._instead: dict[str, list[dict]] = {}
        self.queue = None  # Gradio's queue, once the page is built (ui/page.py)

    def busy(self, key: str) -> bool:
        return key in self._done

    def active(self, key: str) -> bool:
        """A reply of this chat is streaming, or accepted and about to start."""
        return key in self._done or key in self._pending

    def check(self, key: str) -> None:
        """Refuse to start anything in a chat whose reply is still streaming."""
        if key in self._done:
            raise refuse(BUSY, "One reply at a time")

    def accepted(self, key: str, later: bool = False) -> None:
        """A message was accepted: its reply is on the way, in this event, or (`later`) in a call of its own that may
        wait in Gradio's queue or never come."""
        self._instead.pop(key, None)
        self._pending.add(key)
        (self._later.add if later else self._later.discard)(key)

    @contextlib.asynccontextmanager
    async def one(self, key: str):
        """Hold the chat for one reply; released however the reply ends (done, stopped, failed, cancelled)."""
        self.check(key)
        if key not in self._pending:
            self._instead.pop(key, None)  # left over from a chat whose reply never came
        self._pending.discard(key)
        self._later.discard(key)
        done = self._done[key] = asyncio.Event()
        try:
            yield
        finally:
            self._done.pop(key, None)
            self._instead.pop(key, None)
            done.set()

    def replace(self, key: str, history: list[dict], request: gr.Request | None, concurrency_id: str) -> None:
        """The running or waiting reply is to end showing `history` instead (Clear: [], Undo: the turn removed). A
        step whose reply is a later call, with none streaming or waiting in the queue (a script's /regenerate, then
        /undo), owes nothing: the next /chat is a new one, not the one that step was for (new-user trial)."""
        session = getattr(request, "session_hash", None)
        if key in self._later and key not in self._done and not self.waits_in_queue(session, concurrency_id):
            self.forget(key)
        elif key in self._done or key in self._pending:
            self._instead[key] = history

    def waits_in_queue(self, session: str | None, concurrency_id: str) -> bool:
        """Whether an event of this browser session waits in Gradio's queue under `concurrency_id`, not started
        (a /chat behind the engine's limit). True while the queue is unknown: a kept Clear/Undo is the safe side."""
        if self.queue is None:
            return True
        waiting = self.queue.event_queue_per_concurrency_id.get(concurrency_id)
        return waiting is not None and any(event.session_hash == session for event in list(waiting.queue))

    def forget(self, key: str) -> None:
        """An accepted step whose reply never came (no /chat is waiting for it): nothing is owed to it."""
        self._pending.discard(key)
        self._later.discard(key)
        self._instead.pop(key, None)

    def replaced(self, key: str) -> list[dict] | None:
        return self._instead.get(key)

    async def wait_idle(self, key: str, timeout_s: float = 5.0) -> None:
        """Until the chat's reply (if any) has ended, so nothing it sends can land after what follows."""
        done = self._done.get(key)
        if done is not None:
            with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError: they differ on Python 3.10
                await asyncio.wait_for(done.wait(), timeout_s)

    async def stream(self, key: str, updates: AsyncIterator[tuple[list[dict], str]]):
        """Pass a reply's updates on; once Clear/Undo replaced the conversation, end with theirs instead."""
        async with self.one(key), contextlib.aclosing(updates):
            if self.replaced(key) is None:  # a reply cleared while it waited in the queue never starts
                async for update in updates:
                    if self.replaced(key) is not None:
                        break
                    yield update
            instead = self.replaced(key)
            if instead is not None:
                yield FinalUpdate((instead, ""))


def interactive_js(*interactive: bool, ready_banner: str = "") -> str:
    """A page-only event function that sets its outputs' `interactive` at once, with no server round trip. With
    `ready_banner`, the first output (the tab's send button) is turned on only while that banner is empty, which is
    when the tab's engine is ready (page.status_line)."""
    flags = ["true" if on else "false" for on in interactive]
    if ready_banner and interactive and interactive[0]:
        flags[0] = f"!(document.querySelector({json.dumps(ready_banner)})?.innerText || '').trim()"
    updates = ", ".join(f"{{__type__: 'update', interactive: {flag}}}" for flag in flags)
    return f"() => [{updates}]"


def settings_from(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed) -> GenSettings:
    """GenSettings from the sliders, clamped to sane ranges (the API can send anything)."""
    return GenSettings(
        temperature=max(0.0, min(2.0, float(temperature))),
        top_p=max(0.01, min(1.0, float(top_p))),
        top_k=max(1, min(200, int(top_k))),
        max_new_tokens=max(1, min(8192, int(max_new_tokens))),
        repetition_penalty=max(0.5, min(2.0, float(repetition_penalty))),
        seed=max(0, int(seed or 0)),
    )


def message_box(label: str, placeholder, max_lines: int, elem_id: str, **kw) -> gr.Textbox:
    """A tab's message box: one line, so that Enter sends and Shift+Enter adds lines (up to `max_lines`). The
    label is not shown: it names the box in the API's outputs (view_api said value_11)."""
    return gr.Textbox(label=label, show_label=False, container=False, placeholder=placeholder, lines=1,
                      max_lines=max_lines, scale=8, elem_id=elem_id, **kw)  # fmt: skip


def stats_line(elem_id: str) -> gr.Markdown:
    """The line under a tab's chat; its label names it in the API's outputs and is not shown."""
    return gr.Markdown(label="stats", show_label=False, elem_id=elem_id)


def sampling_sliders(i18n, defaults: GenSettings, max_new_limit: int) -> list:
    """Both tabs' sampling settings, in the order settings_from takes them: temperature, top-p, top-k, max new
    tokens, repetition penalty, seed (made inside the caller's Blocks, e.g. in its Settings accordion)."""
    with gr.Row():
        temperature = gr.Slider(0.0, 2.0, defaults.temperature, step=0.05, label=i18n("temperature"))
        top_p = gr.Slider(0.05, 1.0, defaults.top_p, step=0.05, label=i18n("top_p"))
        top_k = gr.Slider(1, 100, defaults.top_k, step=1, label=i18n("top_k"))
    with gr.Row():
        max_new = gr.Slider(
            MIN_MAX_NEW_TOKENS, max_new_limit, defaults.max_new_tokens, step=MIN_MAX_NEW_TOKENS, label=i18n("max_new_tokens")
        )
        rep = gr.Slider(1.0, 1.5, defaults.repetition_penalty, step=0.01, label=i18n("repetition_penalty"))
        seed = gr.Number(defaults.seed, precision=0, label=i18n("seed"))
    return [temperature, top_p, top_k, max_new, rep, seed]


def waiting_line(active: int, capacity: int) -> str:
    """What a reply without text yet says when the engine already serves all it can hold ('' when it does not)."""
    if capacity <= 0 or active <= capacity:
        return ""
    waiting = active - capacity
    return (
        f"⏳ Waiting for a free slot: the model is answering {capacity} conversations at once, "
        f"{waiting} {'is' if waiting == 1 else 'are'} waiting (this one included)."
    )


async def _first_item(stream: AsyncIterator, active: Callable[[], int], capacity: int):
    """Yield ('wait', line) while the first item has not come and the engine is full, then ('item', first or None)."""
    nxt = asyncio.ensure_future(anext(stream, None))
    shown = ""
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=WAIT_POLL_S if capacity > 0 else None)
            if done:
                yield "item", nxt.result()
                return
            line = waiting_line(active(), capacity)
            if line != shown:
                shown = line
                yield "wait", line
    finally:
        if not nxt.done():
            nxt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await nxt


async def stream_into(
    history: list[dict],
    stream: AsyncIterator[Delta | Stats],
    notice: str = "",
    active: Callable[[], int] = lambda: 1,
    capacity: int = 0,
) -> AsyncIterator[tuple[list[dict], str]]:
    """Append an assistant message and fill it from the stream, yielding (history, stats line) at most every
    ui_interval(active()) seconds; the first text and the end (a FinalUpdate) are always sent. Until the first item
    comes, the stats line says so when the engine is full (`capacity` conversations, 0 = unknown)."""
    history = history + [{"role": "assistant", "content": ""}]
    text = ""
    last = 0.0
    yield history, notice or "…"
    first = None
    try:
        async with contextlib.aclosing(_first_item(stream, active, capacity)) as items:  # closed before the stream
            async for kind, value in items:
                if kind == "wait":
                    yield history, value or notice or "…"
                else:
                    first = value
        pending = [] if first is None else [first]
        while True:
            item = pending.pop() if pending else await anext(stream, None)
            if item is None:
                break
            if isinstance(item, Delta):
                text += item.text
                now = time.perf_counter()
                if now - last >= ui_interval(active()):
                    last = now
                    history[-1] = {"role": "assistant", "content": text}
                    yield history, notice or "…"
                continue
            if item.finish_reason == "error":
                log.warning("reply failed: %s", item.error)
                gr.Warning(f"The engine reported an error: {item.error[:200]}")
                if not text:
                    text = "⚠️ The model could not answer this time. Please try again."
            elif not text and item.finish_reason != "abort":
                text = "(The model returned an empty reply; try Regenerate or a higher temperature.)"
            history[-1] = {"role": "assistant", "content": text}
            stats = format_stats(item)
            yield FinalUpdate((history, (notice + " · " if notice else "") + stats))
            return
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    history[-1] = {"role": "assistant", "content": text}
    yield FinalUpdate((history, notice))


def count_each(engine: ChatEngine) -> Callable[[list[list[dict]]], list[int]]:
    """Token counts of several conversations in one call: the engine process counts them in one round trip
    (ProcessEngine.count_tokens_each), an engine in this process one by one."""
    each = getattr(engine, "count_tokens_each", None)
    return each if each is not None else (lambda chats: [engine.count_tokens(c) for c in chats])


async def fit_messages(
    engine: ChatEngine, messages: list[dict], session_len: int, max_new: int, sizes: PromptSizes | None = None
) -> tuple[list[dict], str]:
    """Drop the oldest turns that no longer fit the window and say so; refuse a message that cannot fit at all.
    `sizes` knows what the engine counted of recent prompts (ui/prompt_sizes.py): a chat that continues one of them
    may fit for sure without a count.

    Tokenizing runs in a worker thread: a long conversation must not hold up every other stream.
    """
    budget = max(64, session_len - max_new)
    bound = token_upper_bound(messages)
    if bound <= budget:
        return messages, ""  # fits for sure: no tokenizer work at all
    known = sizes.upper_bound(messages) if sizes is not None and engine.info.exact_counts else None
    if known is not None and known <= budget:
        return messages, ""  # a counted prompt, continued by fewer bytes than the window has room for
    count = count_each(engine)
    earlier = any(m["role"] != "system" for m in messages[:-1])  # else trimming counts the chat once anyway
    if earlier and bound <= LIKELY_BYTES_PER_TOKEN * budget and (await asyncio.to_thread(count, [messages]))[0] <= budget:
        return messages, ""  # fits: counted once, as a whole
    kept, dropped, tokens = await asyncio.to_thread(trim_to_fit, messages, count, budget)
    if tokens > budget:
        with_system = " with the system prompt" if kept[0]["role"] == "system" else ""
        room = session_len - tokens  # what a reply could keep if the message stays as it is
        advice = f"Shorten it or lower Max new tokens to {room:,} or less." if room >= MIN_MAX_NEW_TOKENS else "Shorten it."
        raise refuse(
            f"This message is too long for the model's {session_len:,}-token window: it takes {tokens:,} tokens"
            f"{with_system}, and {max_new:,} are kept for the reply. {advice}",
            "Message too long",
        )
    if dropped:
        note = trim_note(kept, dropped, session_len)
        gr.Info(note)
        return kept, note
    return kept, ""


def require_question(history: list[dict], nothing: str, empty: str, empty_title: str) -> None:
    """The conversation must end with a user message that says something, or there is nothing to answer."""
    if not history or history[-1].get("role") != "user":
        raise refuse(nothing, "Nothing to answer")
    if not typed(text_of(history[-1].get("content"))).strip():
        raise refuse(empty, empty_title)


def reply_updates(engine: ChatEngine, history: list[dict], messages: list[dict], settings: GenSettings, notice: str,
                  request: gr.Request | None, tab: str, sizes: PromptSizes | None = None,
                  ) -> AsyncIterator[tuple[list[dict], str]]:  # fmt: skip
    """Start the engine on this browser's session for the tab and fill the chat from it; the stats line also says
    which sliders the chosen settings make do nothing. `sizes` remembers what the engine counted of the prompt."""
    notice = " · ".join(filter(None, [notice, settings_note(ignored_settings(settings))]))
    stream = engine.stream(session_id(request, tab), messages, settings)
    if sizes is not None:
        stream = sizes.observed(messages, stream)
    return stream_into(history, stream, notice, engine.active_sessions, getattr(engine.info, "capacity", 0))


async def stop_reply(slot: EngineSlot, request: gr.Request | None, tab: str, replies: Replies | None = None) -> str:
    """Stop this browser's running reply on the tab now; the stats line says so (or that there was none)."""
    running = replies is None or replies.active(chat_key(request, tab))  # before stopping ends it
    if slot.ready:
        await slot.engine.stop(session_id(request, tab))
    return STOPPED if running else NOTHING_TO_STOP


def export_file(history: list[dict], fmt: str, scratch: Scratch, session: str) -> str:
    """Write the conversation to a file of this browser session for download."""
    body = to_markdown(history) if fmt == "md" else to_json(history)
    f = scratch.path(session, f"conversation-{time.strftime('%Y%m%d-%H%M%S')}.{fmt}")
    f.write_text(body, encoding="utf-8")
    return str(f)
