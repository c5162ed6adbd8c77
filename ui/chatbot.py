"""The chat components' input, as API clients send it.

Content may be plain text, as most chat APIs write a message (`{"role": "user", "content": "Hi"}`): Gradio 6 holds
content as a list of parts and refused those with pydantic's "Input should be a valid list" (new-user trial of the API).

A file part may be a plain path: gradio_client downloads each picture the server returns and hands back its own path
in its place, which Gradio refused with pydantic's "'meta' field must be explicitly provided", so a client could not
send the image chat's history back. That path is the client's, never read on the server: the part stands for a
picture the server sent, under a path that names no file (`CLIENT_COPY`), until the tab finds its own (image_tab).

Anything else that is not a chat is refused with a named error, not pydantic's report and a traceback.

The chat holds user messages escaped, so that the page shows them literally (ui.user_text); that is the page's
business. Every other caller gets them as typed (`for_caller`), and may send either back.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import ClassVar

import gradio as gr
from gradio.components.chatbot import ChatbotDataMessages
from pydantic import ValidationError

from model_loader.errors import BadInput
from ui.streaming import show_error
from ui.user_text import typed_history

PAGE = "app"  # the x-gradio-user header of Gradio's own page; gradio_client and @gradio/client send "api"
CLIENT_COPY = "/nonexistent/client-copy/"  # never a file: Gradio cannot serve it if it went out unreplaced
# no quotes, < > or &: refusals are HTML-escaped for the page, and an API client reads the text as it comes
SHAPE = "each message needs a role (user or assistant) and a content: text, or a list of text and file parts"


def _part(part, files: bool):
    if files and isinstance(part, dict) and part.get("type") == "file" and isinstance(part.get("file"), str):
        name = PurePath(part["file"].replace("\\", "/")).name
        return {**part, "file": {"path": CLIENT_COPY + name, "orig_name": name, "meta": {"_type": "gradio.FileData"}}}
    return part


def as_parts(messages, files: bool = False):
    """Plain-text content as the one text part it stands for, a client's path as a stand-in for the picture if the
    chat takes `files` (see above); anything else unchanged (validated after)."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            m = {**m, "content": [{"type": "text", "text": m["content"]}]}
        elif isinstance(m, dict) and isinstance(m.get("content"), list):
            m = {**m, "content": [_part(p, files) for p in m["content"]]}
        out.append(m)
    return out


def client_copy(part) -> str | None:
    """The file name of a part that stands for a picture the client holds (as_parts), else None."""
    if isinstance(part, dict) and isinstance(part.get("file"), dict):
        path = part["file"].get("path") or ""
        return path[len(CLIENT_COPY) :] if path.startswith(CLIENT_COPY) else None
    return None


def refusal(error: ValidationError) -> gr.Error:
    """Which message (and part) is not a chat message, in words."""
    at = [i + 1 for i in (error.errors()[0]["loc"] if error.errors() else ()) if isinstance(i, int)]
    where = f" (message {at[0]}{f', part {at[1]}' if len(at) > 1 else ''})" if at else ""
    return show_error(BadInput(f"The history is not a chat{where}: {SHAPE}."))


class Messages(ChatbotDataMessages):
    files: ClassVar[bool] = False  # the text chat has no pictures: a path there is refused

    @classmethod
    def model_validate(cls, obj, *args, **kwargs):
        """Gradio validates each input here (with its "validate_meta" context) before our events run; a gr.Error
        raised inside a pydantic validator would become part of pydantic's report (it is a ValueError)."""
        try:
            return super().model_validate(as_parts(obj, cls.files), *args, **kwargs)
        except ValidationError as e:
            raise refusal(e) from None


class MessagesWithPictures(Messages):
    files: ClassVar[bool] = True


def lenient_chatbot(files: bool = False, **kwargs) -> gr.Chatbot:
    """gr.Chatbot whose input also takes plain-text content and, if `files`, clients' paths (set on the instance: a
    subclass makes Gradio write a .pyi stub beside this file at import)."""
    chatbot = gr.Chatbot(**kwargs)
    chatbot.data_model = MessagesWithPictures if files else Messages
    return chatbot


def from_page(request) -> bool:
    """The event comes from Gradio's own page (its requests say so in a header), not from an API client."""
    try:
        headers = dict(getattr(request, "headers", None) or {})
    except (TypeError, ValueError):
        return False
    return any(k.lower() == "x-gradio-user" and v == PAGE for k, v in headers.items())


def as_typed(history: list[dict]) -> list[dict]:
    """User text as typed; plain-text content as a text part, which Gradio sends as it is (it strips the
    indentation of plain-text content, with inspect.cleandoc)."""
    return as_parts(typed_history(history))


def for_caller(history, request):
    """The chat as this caller gets it: as the chat holds it for the page, with user text as typed for everyone
    else (an update, gr.skip(), passes as it is)."""
    return history if not isinstance(history, list) or from_page(request) else as_typed(history)
