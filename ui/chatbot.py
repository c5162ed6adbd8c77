"""The chat components take messages whose content is plain text too, as most chat APIs write them
(`{"role": "user", "content": "Hi"}`): Gradio 6 holds content as a list of parts and refused those with pydantic's
"Input should be a valid list" (new-user trial of the API)."""

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


def lenient_chatbot(**kwargs) -> gr.Chatbot:
    """gr.Chatbot whose input also takes plain-text content (set on the instance: a subclass makes Gradio write a
    .pyi stub beside this file at import)."""
    chatbot = gr.Chatbot(**kwargs)
    chatbot.data_model = Messages
    return chatbot
