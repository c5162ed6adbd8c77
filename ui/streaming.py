"""What both chat tabs share: the browser's engine session, the throttled stream, and errors shown in one place."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import gradio as gr

from model_loader.engines.seam import ChatEngine, Delta, GenSettings, Stats
from model_loader.engines.slot import EngineSlot
from model_loader.errors import AppError
from ui.conversation import format_stats, to_json, to_markdown, token_upper_bound, trim_to_fit

log = logging.getLogger(__name__)

# One UI update per this many seconds while streaming (the first token is sent at once). Gradio's per-update work
# shares the interpreter with lmdeploy's per-token Python loop, so with many users each stream is updated less
# often (bench/results: 16 users on an H100). 20 updates a second read as smooth; 5 still read as streaming.
UI_INTERVAL_S = 0.05
BUSY_STREAMS_PER_STEP = 8
STOPPED = "⏹ Stopped: the reply above is as far as it got."


def ui_interval(active_streams: int) -> float:
    """Seconds between UI updates of one stream: 50 ms up to 8 streams, then growing with the load (max 0.25 s)."""
    return min(0.25, UI_INTERVAL_S * max(1.0, active_streams / BUSY_STREAMS_PER_STEP))


def session_id(request: gr.Request | None, tab: str) -> int:
    """A stable engine session id per browser session and tab."""
    key = f"{getattr(request, 'session_hash', None) or 'anonymous'}:{tab}"
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


def engine_or_error(slot: EngineSlot) -> ChatEngine:
    """The slot's engine, or a gr.Error saying why it is not there (yet)."""
    if slot.ready:
        return slot.engine
    if slot.state == "failed":
        raise gr.Error(slot.message, title="Engine unavailable")
    if slot.state == "disabled":
        raise gr.Error("This model is disabled in this deployment.", title="Disabled")
    raise gr.Error(f"The model is still starting: {slot.message}", title="Please wait")


def show_error(e: AppError) -> gr.Error:
    """The single place where named errors become what the user reads."""
    return gr.Error(str(e), title=type(e).__name__)


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


async def stream_into(
    history: list[dict], stream: AsyncIterator[Delta | Stats], notice: str = "", active: Callable[[], int] = lambda: 1
) -> AsyncIterator[tuple[list[dict], str]]:
    """Append an assistant message and fill it from the stream, yielding (history, stats line) at most every
    ui_interval(active()) seconds; the first text and the end are always sent."""
    history = history + [{"role": "assistant", "content": ""}]
    text = ""
    last = 0.0
    yield history, notice or "…"
    async for item in stream:
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
        yield history, (notice + " · " if notice else "") + stats
        return
    history[-1] = {"role": "assistant", "content": text}
    yield history, notice


async def fit_messages(engine: ChatEngine, messages: list[dict], session_len: int, max_new: int) -> tuple[list[dict], str]:
    """Drop the oldest turns that no longer fit the window and say so; refuse a message that cannot fit at all.

    Tokenizing runs in a worker thread: a long conversation must not hold up every other stream.
    """
    budget = max(64, session_len - max_new)
    if token_upper_bound(messages) <= budget:
        return messages, ""  # fits for sure: no tokenizer work at all
    kept, dropped, tokens = await asyncio.to_thread(trim_to_fit, messages, engine.count_tokens, budget)
    if tokens > budget:
        with_system = " with the system prompt" if kept[0]["role"] == "system" else ""
        raise gr.Error(
            f"This message is too long for the model's {session_len:,}-token window: it takes {tokens:,} tokens"
            f"{with_system}, and {max_new:,} are kept for the reply. Shorten it or lower Max new tokens.",
            title="Message too long",
        )
    if dropped:
        note = f"The {dropped} oldest messages no longer fit the {session_len:,}-token window and were left out."
        gr.Info(note)
        return kept, note
    return kept, ""


def export_file(history: list[dict], fmt: str) -> str:
    """Write the conversation to a temp file for download."""
    body = to_markdown(history) if fmt == "md" else to_json(history)
    d = Path(tempfile.mkdtemp(prefix="chat-export-"))
    f = d / f"conversation-{time.strftime('%Y%m%d-%H%M%S')}.{fmt}"
    f.write_text(body, encoding="utf-8")
    return str(f)
