"""A ChatEngine that talks to a running `lmdeploy serve api_server` (or lmdeploy's proxy in front of several).

This is the scale-out path: the same UI fronts engines on other GPUs or nodes. OpenAI-compatible streaming chat
completions; images travel as data: URLs in image_url parts. Closing the stream makes the server stop the request.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
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


def parse_sse_line(line: str) -> dict | None:
    """One `data: {...}` line of the stream as a dict; None for keep-alives and [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


class ApiServerEngine:
    """Streams chat completions from an lmdeploy api_server."""

    def __init__(self, kind: str, url: str, timeout_s: float = 600.0) -> None:
        import httpx  # noqa: PLC0415

        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0))
        self._active: dict[int, object] = {}
        self.model = ""
        self.info = EngineInfo(kind=kind, name=self.url, backend="api_server", path=self.url, source="api_server")

    async def connect(self) -> None:
        """Ask the server which model it serves; fail with a clear message if it is not there."""
        try:
            r = await self._client.get(self.url + "/v1/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]
        except Exception as e:  # noqa: BLE001
            raise EngineFailed(
                f"No lmdeploy api_server answers at {self.url} ({e}).",
                "Start it with `lmdeploy serve api_server MODEL --server-port 23333`.",
            ) from e
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
        resp = self._active.pop(session_id, None)
        if resp is not None:
            await resp.aclose()

    async def stream(self, session_id: int, messages: list[dict], settings: GenSettings) -> AsyncIterator[Delta | Stats]:
        body = dict(
            model=self.model,
            messages=to_openai_messages(messages),
            stream=True,
            stream_options={"include_usage": True},
            **openai_payload(settings),
        )
        t0 = time.perf_counter()
        first = None
        n_in = n_out = 0
        reason = "abort"
        req = self._client.build_request("POST", self.url + "/v1/chat/completions", json=body)
        resp = await self._client.send(req, stream=True)
        self._active[session_id] = resp
        try:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                yield Stats(0, 0, 0.0, time.perf_counter() - t0, "error", f"api_server {resp.status_code}: {text}")
                return
            async for line in resp.aiter_lines():
                chunk = parse_sse_line(line)
                if chunk is None:
                    continue
                if chunk.get("usage"):
                    n_in = chunk["usage"].get("prompt_tokens", n_in)
                    n_out = chunk["usage"].get("completion_tokens", n_out)
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        first = first or time.perf_counter()
                        n_out += 0 if chunk.get("usage") else 1
                        yield Delta(text)
                    reason = choice.get("finish_reason") or reason
            yield Stats(n_in, n_out, (first or time.perf_counter()) - t0, time.perf_counter() - t0, reason)
        except Exception as e:  # noqa: BLE001 - a dropped connection ends the reply with a message
            if session_id in self._active:
                yield Stats(
                    n_in,
                    n_out,
                    (first or time.perf_counter()) - t0,
                    time.perf_counter() - t0,
                    "error",
                    f"lost the api_server: {e}",
                )
        finally:
            self._active.pop(session_id, None)
            await resp.aclose()
