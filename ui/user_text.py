"""What people type: cleaned so it can be encoded, shown literally in the chat, and read back exactly. No gradio here.

The Chatbot renders every message as Markdown and HTML, so `</s>` would vanish and `<s>x</s>` be struck through.
User messages are kept in the chat escaped for Markdown (a backslash before each active character) and marked with
an invisible WORD JOINER; `typed()` undoes exactly that, so the model, Undo and exports get what was typed.
Assistant messages stay Markdown.
"""

from __future__ import annotations

import re

MARK = "\u2060"  # WORD JOINER: invisible, says "this message was escaped by shown()"
# always active in Markdown/HTML/LaTeX, wherever they stand
_ALWAYS = set("\\`*_{}[]<>&|~$")
# active at the start of a line: headings, quotes, lists, setext underlines, tables, fences
_LINE_START = re.compile(r"^([ \t]*)([#>+\-=]|\d+[.)])", re.MULTILINE)
_LEADING = re.compile(r"^[ \t]+", re.MULTILINE)
_UNESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])|&nbsp;|&#9;")
_SURROGATES = re.compile("[\ud800-\udfff]")


def clean(text: str) -> str:
    """Replace lone UTF-16 surrogates (JSON allows them, UTF-8 and orjson do not) with U+FFFD, drop NULs."""
    if not isinstance(text, str):
        return ""
    if not text.isascii() and _has_surrogates(text):
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text.replace("\x00", "") if "\x00" in text else text


def _has_surrogates(text: str) -> bool:
    """Surrogates are the only characters UTF-8 cannot encode: C speed, where a regex scan took ~9 ns a character
    of every message at every turn (issue 14)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.search(text) is not None
    return False


def shown(text: str) -> str:
    """The text as the chat should hold it so that it renders literally (an exact inverse is `typed`)."""
    out = "".join("\\" + c if c in _ALWAYS else c for c in text)
    out = _LINE_START.sub(lambda m: m.group(1) + (m.group(2)[:-1] + "\\" + m.group(2)[-1]), out)
    # leading indentation would start a code block, where escapes show; keep it as visible spaces instead
    out = _LEADING.sub(lambda m: m.group(0).replace(" ", "&nbsp;").replace("\t", "&#9;"), out)
    return MARK + out


def typed(text: str) -> str:
    """What the user typed, from a chat message: undoes `shown`; text without the mark is returned unchanged."""
    if not text.startswith(MARK):
        return text
    return _UNESCAPE.sub(lambda m: m.group(1) or (" " if m.group(0) == "&nbsp;" else "\t"), text[len(MARK) :])


def _map_text(content, fn):
    if isinstance(content, str):
        return fn(content)
    if isinstance(content, list):
        return [_map_text(p, fn) for p in content]
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return {**content, "text": fn(content["text"])}
    return content


def clean_history(history: list[dict] | None) -> list[dict]:
    """Every message's text cleaned (histories arrive from browsers and API clients alike)."""
    return [{**m, "content": _map_text(m.get("content"), clean)} for m in history or [] if isinstance(m, dict)]


def typed_history(history: list[dict]) -> list[dict]:
    """User messages as typed (assistant messages unchanged), for the engine and exports."""
    return [{**m, "content": _map_text(m.get("content"), typed)} if m.get("role") == "user" else m for m in history]
