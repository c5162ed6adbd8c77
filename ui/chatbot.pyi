"""The chat components: Gradio's Chatbot, also taking messages whose content is plain text, as most chat APIs
write them (`{"role": "user", "content": "Hi"}`); Gradio 6 holds content as a list of parts and refused those
with pydantic's "Input should be a valid list" (new-user trial of the API)."""

from __future__ import annotations

import gradio as gr
from gradio.components.chatbot import ChatbotDataMessages
from pydantic import model_validator


def as_parts(messages):
    """Plain-text content as the one text part it stands for; anything else unchanged (validated after)."""
    if not isinstance(messages, list):
        return messages
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]}
        if isinstance(m, dict) and isinstance(m.get("content"), str)
        else m
        for m in messages
    ]


class Messages(ChatbotDataMessages):
    @model_validator(mode="before")
    @classmethod
    def _plain_text(cls, data):
        return as_parts(data)

from gradio.events import Dependency

class Chatbot(gr.Chatbot):
    """gr.Chatbot (the same component in the page) whose input also takes plain-text content."""

    is_template = True  # the page draws it with Gradio's own Chatbot
    data_model = Messages
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component