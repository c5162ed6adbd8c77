"""A ChatEngine that talks to a running `lmdeploy serve api_server` (or lmdeploy's proxy in front of several).

This is the scale-out path: the same UI fronts engines on other GPUs or nodes. OpenAI-compatible streaming chat
completions through the `openai` client (lmdeploy depends on it); images travel as data: URLs in image_url parts.
Closing the stream makes the server stop the request. Each tab can name its model behind lmdeploy's proxy.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
import weakref
from collections.abc import AsyncIterator

from model_loader.engines.lmdeploy_config import openai_payload
from model_loader.engines.seam import Delta, EngineInfo, GenSettings, Stats
from model_loader.errors import EngineFailed

log = logging.getLogger(__name__)


def image_data_url(image) -> str:
    """A PIL image as a PNG data: URL."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def to_openai_messages(messages: list[dict]) -> list[dict]:
    """Our content parts as OpenAI chat parts."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = [
                {"type": "image_url", "image_url": {"url": image_data_url(p["image"])}}
                if p.get("type") == "image"
                else {"type": "text", "text": p["text"]}
                for p in c
            ]
        out.append({"role": m["role"], "content": c})
    return out


# the OpenAI API's own parameters; lmdeploy reads the rest (top_k, repetition_penalty, ignore_eos) from the body
OPENAI_PARAMS = ("temperature", "top_p", "max_tokens", "seed")


def create_kwargs(settings: GenSettings) -> dict:
    """Sampling settings as `chat.completions.create` arguments, lmdeploy's extras in `extra_body`."""
    payload = openai_payload(settings)
    kwargs = {k: v for k, v in payload.items() if k in OPENAI_PARAMS}
    kwargs["extra_body"] = {k: v for k, v in payload.items() if k not in OPENAI_PARAMS}
    return kwargs


class ApiServerEngine:
    """Streams chat completions from an lmdeploy api_server through the `openai` client.

    The client's pooled connections belong to the event loop that opened them, so each loop that serves requests
    gets its own client, made on first use there (connect() runs under asyncio.run at start-up, the chats on
    Gradio's loop).
    """

    def __init__(self, kind: str, url: str, model: str = "", timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.requested_model = model
        self.model = model
        self.timeout_s = timeout_s
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> AsyncOpenAI
        self._active: dict[int, object] = {}  # session -> its stream (None while the request is being set up)
        self._stopped: set[int] = set()
        self.info = EngineInfo(
            kind=kind, name=self.url, backend="api_server", path=self.url, source="api_server", exact_counts=False
        )

    def _new_client(self, timeout_s: float, retries: int):
        from openai import AsyncOpenAI  # noqa: PLC0415

        # lmdeploy's api_server takes any key unless started with --api-keys
        return AsyncOpenAI(base_url=self.url + "/v1", api_key="none", timeout=timeout_s, max_retries=retries)

    def _client(self):
        """This loop's client, made on first use here."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._new_client(self.timeout_s, 0)  # never re-send a generation
        return client

    async def connect(self) -> None:
        """Ask the server which models it serves and pick this tab's; fail with a clear message if it is not there."""
        try:
            async with self._new_client(10.0, 1) as client:  # lives only for this call, on this loop
                served = [m.id async for m in client.models.list()]
        except Exception as e:  # noqa: BLE001
            raise EngineFailed(
                f"No lmdeploy api_server answers at {self.url} ({e}).",
                "Start it with `lmdeploy serve api_server MODEL --server-port 23333`.",
            ) from e
        if not served:
            raise EngineFailed(f"The api_server at {self.url} serves no model.", "Start it with a model path.")
        if self.requested_model and self.requested_model not in served:
            raise EngineFailed(
                f"The api_server at {self.url} serves {', '.join(served)}, not {self.requested_model}.",
                f"Set --{self.info.kind}-server-model to one of them (or leave it empty for the first).",
            )
        self.model = self.requested_model or served[0]
        self.info.name = self.model

    def count_tokens(self, messages: list[dict]) -> int:
        """An upper estimate (the server holds the tokenizer): 1 token per 2 characters, 576 per image."""
        n = 0
        for m in messages:
            c = m["content"]
            if isinstance(c, list):
                n += sum(576 if p.get("type") == "image" else len(p.get("text", "")) // 2 + 1 for p in c)
            else:
                n += len(c) // 2 + 1
            n += 4
        return n

    def active_sessions(self) -> int:
        return len(self._active)

    async def stop(self, session_id: int) -> None:
        """Close the session's stream (the server then stops the request); a stop during set-up is kept for it."""
        if session_id not in self._active:
            return
        self._stopped.add(session_id)
        stream = self._active.get(session_id)
        if stream is not None:
            await stream.close()

    async def stream(self, session_id: int, messages: list[dict], settings: GenSettings) -> AsyncIterator[Delta | Stats]:
        import openai  # noqa: PLC0415

        t0 = time.perf_counter()
        first = None
        n_in = n_out = deltas = 0
        reason, error = "abort", ""
        self._stopped.discard(session_id)
        self._active[session_id] = None
        stream = None
        try:
            body = await asyncio.to_thread(to_openai_messages, messages)  # PNG-encoding an image: not on the loop
            stream = await self._client().chat.completions.create(
                model=self.model,
                messages=body,
                stream=True,
                stream_options={"include_usage": True},
                **create_kwargs(settings),
            )
            self._active[session_id] = stream
            if session_id in self._stopped:  # Stop pressed while the request was being sent
                await stream.close()
            async for chunk in stream:
                if chunk.usage:
                    n_in, n_out = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
                for choice in chunk.choices:
                    text = choice.delta.content if choice.delta else None
                    if text:
                        first = first or time.perf_counter()
                        deltas += 1
                        yield Delta(text)
                    reason = choice.finish_reason or reason
        except openai.APIStatusError as e:
            reason, error = "error", f"api_server {e.status_code}: {e.message}"[:300]
        except Exception as e:  # noqa: BLE001 - a dropped or stopped connection ends the reply with one Stats
            if session_id in self._stopped:
                reason = "abort"
            else:
                reason, error = "error", f"lost the api_server: {e}"[:300]
        finally:
            self._active.pop(session_id, None)
            self._stopped.discard(session_id)
            if stream is not None:
                await stream.close()
        end = time.perf_counter()
        yield Stats(n_in, n_out or deltas, (first or end) - t0, end - t0, reason, error)
