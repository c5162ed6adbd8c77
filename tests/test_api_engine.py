"""ApiServerEngine against an OpenAI-compatible streaming server on localhost (the shape of lmdeploy's api_server):
deltas, usage, image parts as data URLs, sampling settings sent, stop closes the stream, and a missing server."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from model_loader.engines.api_server import ApiServerEngine, parse_sse_line
from model_loader.engines.seam import Delta, GenSettings, Stats
from model_loader.errors import EngineFailed


class FakeApiServer:
    def __init__(self, words: int = 20, delay_s: float = 0.005) -> None:
        self.words, self.delay_s = words, delay_s
        self.bodies: list[dict] = []
        self.closed_early = 0
        app = Starlette(routes=[Route("/v1/models", self.models), Route("/v1/chat/completions", self.chat, methods=["POST"])])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True

    async def models(self, request: Request):
        return JSONResponse({"data": [{"id": "internlm2-chat-1_8b-awq"}]})

    async def chat(self, request: Request):
        body = await request.json()
        self.bodies.append(body)

        async def events():
            sent = 0
            try:
                for i in range(self.words):
                    await asyncio.sleep(self.delay_s)
                    chunk = {"choices": [{"delta": {"content": f"w{i} "}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    sent += 1
                done = {"choices": [{"delta": {}, "finish_reason": "length"}]}
                yield f"data: {json.dumps(done)}\n\n"
                usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": sent}}
                yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
            except asyncio.CancelledError:
                self.closed_early += 1
                raise

        return StreamingResponse(events(), media_type="text/event-stream")


def collect(engine, sid, messages, settings):
    async def run():
        await engine.connect()
        return [x async for x in engine.stream(sid, messages, settings)]

    return asyncio.run(run())


def test_streams_deltas_and_usage_and_sends_settings():
    with FakeApiServer() as srv:
        eng = ApiServerEngine("text", srv.url)
        items = collect(
            eng,
            1,
            [{"role": "user", "content": "hi"}],
            GenSettings(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=64, seed=3),
        )
        assert "".join(i.text for i in items if isinstance(i, Delta)).split() == [f"w{i}" for i in range(20)]
        stats = items[-1]
        assert isinstance(stats, Stats) and stats.output_tokens == 20 and stats.input_tokens == 7
        assert stats.finish_reason == "length" and eng.info.name == "internlm2-chat-1_8b-awq"
        body = srv.bodies[-1]
        assert body["stream"] and body["temperature"] == 0.7 and body["top_k"] == 20 and body["seed"] == 3
        assert body["max_tokens"] == 64 and body["model"] == "internlm2-chat-1_8b-awq"


def test_image_parts_travel_as_data_urls():
    with FakeApiServer(words=2) as srv:
        eng = ApiServerEngine("vision", srv.url)
        img = Image.new("RGB", (8, 8), (255, 0, 0))
        collect(
            eng,
            1,
            [{"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": "image", "image": img}]}],
            GenSettings(),
        )
        parts = srv.bodies[-1]["messages"][0]["content"]
        assert parts[0] == {"type": "text", "text": "what?"}
        assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_stop_closes_the_stream():
    with FakeApiServer(words=2000, delay_s=0.005) as srv:
        eng = ApiServerEngine("text", srv.url)

        async def run():
            await eng.connect()
            got = []
            async for item in eng.stream(5, [{"role": "user", "content": "long"}], GenSettings()):
                got.append(item)
                if len(got) == 3:
                    await eng.stop(5)
            return got

        got = asyncio.run(run())
        time.sleep(0.3)
        assert len(got) < 100 and eng.active_sessions() == 0 and srv.closed_early == 1


def test_missing_server_is_a_clear_error():
    eng = ApiServerEngine("text", "http://127.0.0.1:9")
    with pytest.raises(EngineFailed, match="lmdeploy serve api_server"):
        asyncio.run(eng.connect())


def test_sse_parsing():
    assert parse_sse_line("data: [DONE]") is None and parse_sse_line(": keep-alive") is None
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
