"""Issue 6 on CPU: bad input, many users, faults, and nobody let in."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from gradio_client import Client

from model_loader.config import AppConfig
from model_loader.engines.seam import Delta, EngineInfo, GenSettings
from model_loader.engines.turbomind import LmdeployEngine
from model_loader.startup import Startup
from tests.fakes import FakeEngine, FakePipe
from ui.page import launch_kwargs


def msg(text):
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def test_message_longer_than_the_session_is_refused_clearly(launched):
    url, (text, _), _ = launched
    text.info.session_len = 200
    c = Client(url, verbose=False)
    with pytest.raises(Exception, match="too long"):
        c.predict(msg("word " * 400), "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")
    out = c.predict(msg("short one"), "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")  # the session goes on
    assert out[0][-1]["content"][0]["text"] == "You said: short one"


def test_long_conversation_drops_oldest_turns_with_a_notice(launched):
    url, (text, _), _ = launched
    text.info.session_len = 300
    c = Client(url, verbose=False)
    hist = []
    for i in range(6):
        hist += msg(f"turn {i} " + "filler " * 40) + [{"role": "assistant", "content": [{"type": "text", "text": "ok " * 40}]}]
    out = c.predict(hist + msg("and now?"), "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")
    assert "no longer fit" in out[1] and out[0][-1]["content"][0]["text"] == "You said: and now?"
    sent = text.calls[-1][1]
    assert sent[-1]["content"] == "and now?" and len(sent) < len(hist) + 1


def test_upload_over_the_size_limit_is_refused(launched, tmp_path):
    url, _, st = launched
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (st.cfg.max_file_size_mb * 2**20 + 1024))
    with big.open("rb") as f:
        r = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", f)}, timeout=60)
    assert r.status_code == 413


def test_64_users_5_turns_never_mix(launched):
    url, (text, _), _ = launched
    text.delay_s = 0.002
    n, turns = 64, 5
    results: list = [None] * n
    errors: list = []

    # clients are made one by one (each fetches the app's config), then all talk at once
    clients = [Client(url, verbose=False, httpx_kwargs={"timeout": 120}) for _ in range(n)]

    def user(i):
        try:
            c = clients[i]
            hist, got = [], []
            for t in range(turns):
                hist = hist + msg(f"I am user {i}, turn {t}")
                hist = c.predict(hist, "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")[0]
                got.append(hist[-1]["content"][0]["text"])
            results[i] = got
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    for i, got in enumerate(results):
        assert got == [f"You said: I am user {i}, turn {t}" for t in range(turns)]
    assert text.active_sessions() == 0


def test_200_stops_leave_no_lmdeploy_session_behind():
    pipe = FakePipe(tokens=100_000, delay_s=0.001)
    eng = LmdeployEngine(pipe, EngineInfo(kind="text", name="fake", backend="turbomind"))

    async def run():
        async def one(i):
            agen = eng.stream(i, [{"role": "user", "content": "hi"}], GenSettings())
            async for item in agen:
                if isinstance(item, Delta):
                    break
            await agen.aclose()

        await asyncio.gather(*[one(i) for i in range(200)])
        for _ in range(300):
            if not pipe.running:
                break
            await asyncio.sleep(0.01)
        pipe.tokens = 5  # the next request is a short one
        return [x async for x in eng.stream(999, [{"role": "user", "content": "next"}], GenSettings())]

    items = asyncio.run(run())
    assert not pipe.running and eng.active_sessions() == 0 and len(pipe.cancelled) >= 200
    assert items  # the next request works
    pipe.close()


def test_browser_disconnect_frees_the_engine_session(launched):
    from bench.sse_client import disconnect_midstream

    url, (text, _), _ = launched
    text.delay_s = 0.02
    text.enqueue(*[" ".join(["w"] * 2000)] * 8)
    asyncio.run(disconnect_midstream(url, 8))
    for _ in range(50):
        if text.active_sessions() == 0:
            break
        time.sleep(0.1)
    assert text.active_sessions() == 0, "a closed connection left its reply running"


def test_one_engine_failing_leaves_the_other_usable(tiny_models, monkeypatch):
    def build(kind, path, cfg, backend="turbomind", awq=False, source=""):
        if kind == "vision":
            raise RuntimeError("CUDA out of memory")
        return FakeEngine(kind)

    monkeypatch.setattr(LmdeployEngine, "build", staticmethod(build))
    monkeypatch.setattr("model_loader.startup.gpu_memory", lambda: None)
    st = Startup(AppConfig(text_model=str(tiny_models["awq"]), vision_model=str(tiny_models["llava"]), engine_process=False), {})
    st.build_all()
    assert st.slots["text"].ready
    assert st.slots["vision"].state == "failed" and "out of memory" in st.slots["vision"].message


def test_invalid_model_fails_its_tab_only(tiny_models, copy_model, monkeypatch):
    broken = copy_model(tiny_models["llava"])
    (broken / "preprocessor_config.json").unlink()
    monkeypatch.setattr(LmdeployEngine, "build", staticmethod(lambda kind, *a, **k: FakeEngine(kind)))
    monkeypatch.setattr("model_loader.startup.gpu_memory", lambda: None)
    st = Startup(AppConfig(text_model=str(tiny_models["awq"]), vision_model=str(broken), engine_process=False), {})
    st.build_all()
    assert st.slots["text"].ready and st.slots["vision"].state == "failed"
    assert "preprocessor_config.json" in st.slots["vision"].message


def test_no_share_link_no_extra_paths_bounded_queue():
    kw = launch_kwargs(AppConfig(), None)
    assert kw["share"] is False and kw["allowed_paths"] == [] and kw["max_file_size"] == "20mb"
    assert "auth" not in kw


def test_files_outside_the_app_are_not_served(launched):
    url, _, _ = launched
    for path in ("gradio_api/file=/etc/passwd", "file=/etc/passwd", "gradio_api/file=app.py"):
        r = httpx.get(url + path, timeout=10)
        assert r.status_code in (403, 404) and "root:" not in r.text


def test_queue_is_bounded_and_follows_the_batch_size(engines):
    from tests.conftest import fake_startup
    from ui.page import build_demo

    st = fake_startup(*engines, max_queue=77, text_batch_size=24, vision_batch_size=6)
    demo, _ = build_demo(st.slots, st.cfg, st.system_info)
    assert demo._queue.max_size == 77
    limits = {fn.concurrency_id: fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id}
    assert limits.get("text") == 24 and limits.get("vision") == 6


def test_optional_login(engines, tmp_path, monkeypatch):
    from tests.conftest import TEST_LAUNCH, fake_startup
    from ui.page import build_demo

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    st = fake_startup(*engines, host="127.0.0.1", auth="alice:s3cret")
    demo, i18n = build_demo(st.slots, st.cfg, st.system_info)
    kw = launch_kwargs(st.cfg, i18n)
    kw.update(TEST_LAUNCH)
    _, url, _ = demo.launch(**kw)
    try:
        assert httpx.get(url + "config", timeout=10).status_code in (401, 403)
        c = Client(url, auth=("alice", "s3cret"), verbose=False)
        out = c.predict(msg("hi"), "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")
        assert out[0][-1]["content"][0]["text"] == "You said: hi"
        with pytest.raises(Exception):  # noqa: B017
            Client(url, auth=("alice", "wrong"), verbose=False)
    finally:
        demo.close()


def test_requests_skip_fastapis_telemetry_checks(launched, monkeypatch):
    """FastAPI's own OpenTelemetry asks for OpenTelemetry's providers on every request: 5% of the web server's loop
    at 32 users (py-spy, CPU). The app exports no telemetry, so it is off and a request asks for none."""
    from opentelemetry import metrics, trace

    url, _, _ = launched
    asked = []
    for module, name in ((trace, "get_tracer_provider"), (metrics, "get_meter_provider")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda real=real: asked.append(1) or real())
    assert httpx.get(url + "config", timeout=30).status_code == 200
    assert asked == []
