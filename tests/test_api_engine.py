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

from model_loader.engines.api_server import ApiServerEngine
from model_loader.engines.seam import Delta, GenSettings, Stats
from model_loader.errors import EngineFailed


class FakeApiServer:
    def __init__(self, words: int = 20, delay_s: float = 0.005, models: tuple[str, ...] = ("internlm2-chat-1_8b-awq",)) -> None:
        self.words, self.delay_s, self.served = words, delay_s, models
        self.bodies: list[dict] = []
        self.closed_early = 0
        self.fail_next = 0  # answer the next chat with this HTTP status
        self.header_delay_s = 0.0  # the server takes this long to start answering (templating, queueing)
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
        return JSONResponse(
            {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "lmdeploy"} for m in self.served]}
        )

    async def chat(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        await asyncio.sleep(self.header_delay_s)
        if self.fail_next:
            status, self.fail_next = self.fail_next, 0
            return JSONResponse({"error": "bad request: messages too long", "object": "error"}, status_code=status)

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
        deadline = time.monotonic() + 10
        while srv.closed_early != 1 and time.monotonic() < deadline:  # the server notices the closed stream
            time.sleep(0.02)
        assert len(got) < 100 and eng.active_sessions() == 0 and srv.closed_early == 1


def test_missing_server_is_a_clear_error():
    eng = ApiServerEngine("text", "http://127.0.0.1:9")
    with pytest.raises(EngineFailed, match="lmdeploy serve api_server"):
        asyncio.run(eng.connect())


def on_another_loop(coro_fn):
    """Run a coroutine on a fresh event loop in another thread, as Gradio serves requests."""
    out: dict = {}

    def run():
        try:
            out["value"] = asyncio.run(coro_fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_first_request_answers_after_connect_under_asyncio_run():
    """Startup connects under asyncio.run; the first chat then streams on Gradio's loop (issue 10: "Event loop is
    closed" on the first request)."""
    with FakeApiServer(words=5) as srv:
        eng = ApiServerEngine("text", srv.url)
        asyncio.run(eng.connect())

        async def first():
            return [x async for x in eng.stream(1, [{"role": "user", "content": "hi"}], GenSettings(max_new_tokens=5))]

        items = on_another_loop(first)
        stats = [i for i in items if isinstance(i, Stats)]
        assert len(stats) == 1 and stats[0].error == "" and stats[0].finish_reason == "length", stats
        assert "".join(i.text for i in items if isinstance(i, Delta)).split() == [f"w{i}" for i in range(5)]
        again = on_another_loop(first)  # and the next one on that loop too
        assert [i for i in again if isinstance(i, Stats)][0].output_tokens == 5


def test_exactly_one_stats_also_after_stop():
    with FakeApiServer(words=2000, delay_s=0.005) as srv:
        eng = ApiServerEngine("text", srv.url)
        asyncio.run(eng.connect())

        async def run():
            got = []
            async for item in eng.stream(5, [{"role": "user", "content": "long"}], GenSettings()):
                got.append(item)
                if len(got) == 3:
                    await eng.stop(5)
            return got

        got = on_another_loop(run)
        stats = [i for i in got if isinstance(i, Stats)]
        assert len(stats) == 1 and got[-1] is stats[0] and stats[0].finish_reason == "abort", got[-3:]
        assert eng.active_sessions() == 0


def test_each_tab_names_its_model_behind_the_proxy():
    with FakeApiServer(words=2, models=("llava-v1.5-7b", "internlm2-chat-1_8b-awq")) as srv:
        eng = ApiServerEngine("text", srv.url, model="internlm2-chat-1_8b-awq")
        asyncio.run(eng.connect())
        on_another_loop(lambda: _drain(eng))
        assert srv.bodies[-1]["model"] == "internlm2-chat-1_8b-awq" and eng.info.name == "internlm2-chat-1_8b-awq"
        wrong = ApiServerEngine("vision", srv.url, model="llava-next")
        with pytest.raises(EngineFailed, match="llava-v1.5-7b"):
            asyncio.run(wrong.connect())


async def _drain(eng):
    return [x async for x in eng.stream(1, [{"role": "user", "content": "hi"}], GenSettings())]


def test_startup_connects_each_tab_to_its_model():
    from model_loader.config import AppConfig
    from model_loader.startup import Startup

    with FakeApiServer(words=3, models=("llava-v1.5-7b", "internlm2-chat-1_8b-awq")) as srv:
        cfg = AppConfig(
            backend="api_server",
            text_server_url=srv.url,
            vision_server_url=srv.url,
            text_server_model="internlm2-chat-1_8b-awq",
            vision_server_model="llava-v1.5-7b",
        )
        st = Startup(cfg, {})
        st.build_all()
        assert st.slots["text"].ready and st.slots["vision"].ready
        text = st.slots["text"].engine
        items = on_another_loop(lambda: _drain(text))  # the first request, on another loop than connect's
        assert isinstance(items[-1], Stats) and items[-1].error == "" and srv.bodies[-1]["model"] == "internlm2-chat-1_8b-awq"
        on_another_loop(lambda: _drain(st.slots["vision"].engine))
        assert srv.bodies[-1]["model"] == "llava-v1.5-7b"


def test_server_error_is_one_stats_with_the_reason():
    with FakeApiServer(words=2) as srv:
        eng = ApiServerEngine("text", srv.url, model="internlm2-chat-1_8b-awq")
        asyncio.run(eng.connect())
        srv.fail_next = 400
        items = on_another_loop(lambda: _drain(eng))
        assert len(items) == 1 and items[0].finish_reason == "error" and "400" in items[0].error


def test_stop_while_the_request_is_being_sent_is_not_lost():
    with FakeApiServer(words=2000, delay_s=0.005) as srv:
        srv.header_delay_s = 0.5
        eng = ApiServerEngine("text", srv.url)
        asyncio.run(eng.connect())

        async def run():
            async def consume():
                return [x async for x in eng.stream(7, [{"role": "user", "content": "long"}], GenSettings())]

            task = asyncio.create_task(consume())
            while eng.active_sessions() == 0:
                await asyncio.sleep(0.01)
            await eng.stop(7)  # the server has not answered yet
            return await task

        got = on_another_loop(run)
        assert len(got) < 50 and isinstance(got[-1], Stats) and got[-1].finish_reason == "abort"
        assert sum(isinstance(i, Stats) for i in got) == 1 and eng.active_sessions() == 0
