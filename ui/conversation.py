"""Chat history <-> engine messages, context trimming, stats text and exports: pure functions, no gradio."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from model_loader.engines.seam import Stats

ZWSP = "\u200b"


@lru_cache(maxsize=8)
def _reserved_pattern(reserved: tuple[str, ...]) -> re.Pattern | None:
    alternatives = sorted({r for r in reserved if r}, key=len, reverse=True)  # longest first
    return re.compile("|".join(map(re.escape, alternatives))) if alternatives else None


def neutralize(text: str, reserved: Sequence[str]) -> str:
    """Break every reserved string in `text` (the engine's special tokens, image placeholder, role markers) with a
    zero-width space after its first character, so the template and tokenizer read it as ordinary characters."""
    pattern = _reserved_pattern(tuple(reserved))
    if pattern is None:
        return text
    while pattern.search(text):  # breaking one could leave another behind it
        text = pattern.sub(lambda m: m.group()[0] + ZWSP + m.group()[1:], text)
    return text


def text_of(content) -> str:
    """The text of a Chatbot message's content (str, or a file/component dict for images)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") or ""
    if isinstance(content, list):
        return " ".join(text_of(c) for c in content)
    return ""


def is_image_message(m: dict) -> bool:
    """An image the user uploaded, shown in the Chatbot as a file."""
    c = m.get("content")
    if isinstance(c, dict):
        return "path" in c or c.get("component") == "image"
    if isinstance(c, list):
        return any(isinstance(x, dict) and ("path" in x or x.get("type") == "file") for x in c)
    return False


def image_path(m: dict) -> str:
    """The file path of an image message (str content dict, or Gradio 6's list of file parts)."""
    c = m.get("content")
    parts = c if isinstance(c, list) else [c]
    for p in parts:
        if isinstance(p, dict):
            if "path" in p:
                return p["path"]
            if isinstance(p.get("file"), dict):
                return p["file"].get("path", "")
    return ""


def to_engine_messages(history: list[dict], system_prompt: str = "", *, reserved: Sequence[str]) -> list[dict]:
    """Chatbot messages (role/content) as engine messages, with the engine's reserved strings neutralized."""
    out = []
    if system_prompt.strip():
        out.append({"role": "system", "content": neutralize(system_prompt.strip(), reserved)})
    for m in history:
        if m.get("role") not in ("user", "assistant") or is_image_message(m):
            continue
        text = text_of(m.get("content"))
        if m["role"] == "assistant" and not text:
            continue
        out.append({"role": m["role"], "content": neutralize(text, reserved)})
    return out


def to_vision_messages(history: list[dict], image, *, reserved: Sequence[str]) -> list[dict]:
    """The turns since the last uploaded image, the image attached to the first question after it."""
    start = 0
    for i, m in enumerate(history):
        if is_image_message(m):
            start = i + 1
    msgs = to_engine_messages(history[start:], reserved=reserved)
    for m in msgs:
        if m["role"] == "user":
            m["content"] = [{"type": "text", "text": m["content"]}, {"type": "image", "image": image}]
            break
    return msgs


# Tokens a chat template adds around one message (role markers, newlines), generously.
TEMPLATE_TOKENS_PER_MESSAGE = 16
IMAGE_TOKENS = 576


def token_upper_bound(messages: list[dict]) -> int:
    """At most this many tokens: byte-level BPE and byte-fallback tokenizers spend at least one byte per token."""
    n = 8
    for m in messages:
        c = m["content"]
        parts = c if isinstance(c, list) else [{"type": "text", "text": c}]
        for p in parts:
            n += IMAGE_TOKENS if p.get("type") == "image" else len(p.get("text", "").encode("utf-8"))
        n += TEMPLATE_TOKENS_PER_MESSAGE
    return n


def _turns(messages: list[dict]) -> list[list[dict]]:
    """Messages grouped into turns, each starting at a user message (leading others form a turn of their own)."""
    turns: list[list[dict]] = []
    for m in messages:
        if m["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(m)
    return turns


def trim_to_fit(
    messages: list[dict], count_each: Callable[[list[list[dict]]], list[int]], budget: int
) -> tuple[list[dict], int, int]:
    """Drop the oldest turns (never the system prompt nor the last question) until the count fits `budget`.

    Each turn is counted once, as the tokens it adds to the system prompt and the question (so any chat template
    works, however it frames a conversation); the kept conversation is then counted exactly, dropping a further
    turn only if the estimate was short. `count_each` counts several conversations in one call (for the engine
    process, one round trip): one call for every turn, one for the kept chat, instead of one per turn.
    Returns the kept messages, how many were dropped, and their exact count (over `budget` only when the system
    prompt and the question alone do not fit).
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system) :]
    last = rest[-1:]
    turns = _turns(rest[:-1])
    base, *each = count_each([system + last] + [system + turn + last for turn in turns])
    if base > budget or not turns:
        return system + last, len(rest) - len(last), base
    total, keep = base, 0
    for tokens in reversed(each):
        total += tokens - base
        if total > budget:
            break
        keep += 1
    while True:
        kept = system + [m for t in turns[len(turns) - keep :] for m in t] + last
        tokens = count_each([kept])[0] if keep else base
        if tokens <= budget or keep == 0:
            return kept, len(messages) - len(kept), tokens
        keep -= 1


def trim_note(kept: list[dict], dropped: int, session_len: int) -> str:
    """What trimming tells the user: how many messages were left out, and whether anything before the question
    was kept at all."""
    one = dropped == 1
    verb = "was" if one else "were"
    if all(m["role"] == "system" for m in kept[:-1]):
        earlier = "the earlier message" if one else f"the {dropped} earlier messages"
        return f"Only this message fits the {session_len:,}-token window: {earlier} {verb} left out."
    oldest = "oldest message no longer fits" if one else f"{dropped} oldest messages no longer fit"
    return f"The {oldest} the {session_len:,}-token window and {verb} left out."


def format_stats(s: Stats) -> str:
    """'128 tokens · 540.2 tokens/s · first token 12 ms' for the line under the chat."""
    parts = [
        f"{s.output_tokens} tokens",
        f"{s.tokens_per_s:.1f} tokens/s",
        f"first token {s.ttft_s * 1000:.0f} ms",
        f"{s.input_tokens} prompt tokens",
    ]
    if s.finish_reason == "length":
        parts.append("stopped at max new tokens")
    elif s.finish_reason == "abort":
        parts.append("stopped")
    return " · ".join(parts)


def to_markdown(history: list[dict], title: str = "Conversation") -> str:
    """A conversation as Markdown for download."""
    lines = [f"# {title}", ""]
    for m in history:
        who = {"user": "**User**", "assistant": "**Assistant**"}.get(m.get("role"), m.get("role", ""))
        body = "[image]" if is_image_message(m) else text_of(m.get("content"))
        lines += [f"{who}:", "", body, ""]
    return "\n".join(lines)


def to_json(history: list[dict]) -> str:
    """A conversation as JSON (role/content; images as their file name)."""
    rows = []
    for m in history:
        if is_image_message(m):
            path = image_path(m)
            rows.append({"role": m["role"], "content": {"image": path.rsplit("/", 1)[-1]}})
        else:
            rows.append({"role": m.get("role"), "content": text_of(m.get("content"))})
    return json.dumps(rows, ensure_ascii=False, indent=1)


SETTING_LABELS = {"temperature": "Temperature", "top_p": "Top-p", "top_k": "Top-k", "seed": "Seed"}


def settings_note(ignored: Sequence[str]) -> str:
    """Say which sampling sliders change nothing with the values chosen (from seam.ignored_settings)."""
    if not ignored:
        return ""
    names = [SETTING_LABELS.get(n, n) for n in ignored]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    verb = "has" if len(names) == 1 else "have"
    when = "with top-k 1 (greedy)" if "temperature" in ignored else "at temperature 0"
    return f"{listed} {verb} no effect {when}"
