"""The engines in a child process (`--engine-process`): the real LmdeployEngine over the faithful FakePipe, built in
a spawned child, streamed, stopped, abandoned, failed and killed from this process as the page does it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest
from PIL import Image

from model_loader.engines.process import EngineProcess, EngineProcessGone
from model_loader.engines.seam import Delta, GenSettings, Stats
from model_loader.errors import DriverTooOld, EngineFailed

pytestmark = pytest.mark.timeout(120)

FAKE = "tests.fakes:fake_lmdeploy_engine"
TEXT = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def host():
    h = EngineProcess(log_level="WARNING")
    h.start()
    yield h
    h.close()


@pytest.fixture(scope="module")
def engine(host):
    return host.build("text", FAKE, {"kind": "text", "tokens": 100_000, "delay_s": 0.002})


async def collect(eng, sid: int, settings: GenSettings, messages=TEXT) -> list:
    return [item async for item in eng.stream(sid, messages, settings)]


async def until(predicate, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "not reached in time"
        await asyncio.sleep(0.01)


def test_a_reply_streams_from_the_child_whole_its_first_text_at_once_the_rest_coalesced(monkeypatch):
    host = EngineProcess(log_level="WARNING", flush_s=5.0)  # text waits up to 5 s, except a reply's first and end
    host.start()
    try:
        engine = host.build("text", FAKE, {"kind": "text", "tokens": 100_000, "delay_s": 0.002})
        messages = []
        deliver = host._deliver
        monkeypatch.setattr(host, "_deliver", lambda items: (messages.append(len(items)), deliver(items)))

        async def main():
            t0, first, items = time.perf_counter(), None, []
            async for item in engine.stream(1, TEXT, GenSettings(max_new_tokens=300)):
                first = first or time.perf_counter() - t0
                items.append(item)
            return first, items, time.perf_counter() - t0

        first, items, took = asyncio.run(main())
    finally:
        host.close()
    *deltas, stats = items
    assert isinstance(stats, Stats) and stats.finish_reason == "length" and stats.output_tokens == 300
    assert all(isinstance(d, Delta) for d in deltas)
    assert "".join(d.text for d in deltas) == "".join(f"t{i} " for i in range(300))
    assert first < 2.5, f"the first text waited {first:.2f} s"  # not the 5 s that the rest may wait
    assert len(messages) <= 3 + int(took / 5), f"{len(messages)} messages for 300 tokens in {took:.1f} s"


def test_the_engine_is_built_and_read_in_the_child_as_in_process(engine):
    from tests.fakes import fake_lmdeploy_engine

    here = fake_lmdeploy_engine(kind="text")
    image = [
        {"role": "user", "content": [{"type": "text", "text": "what"}, {"type": "image", "image": Image.new("RGB", (8, 8))}]}
    ]
    assert engine.info.name == "fake-text" and engine.info.reserved == here.info.reserved
    assert "<|im_start|>user" in engine.info.reserved  # the template's own, not the common default
    assert engine.count_tokens(TEXT) == here.count_tokens(TEXT)
    assert engine.count_tokens(image) == here.count_tokens(image) > 576
    here.pipe.close()


def test_many_replies_at_once_each_get_their_own_text(engine):
    async def main():
        return await asyncio.gather(*(collect(engine, sid, GenSettings(max_new_tokens=50 + sid)) for sid in range(12)))

    for sid, items in enumerate(asyncio.run(main())):
        assert items[-1].output_tokens == 50 + sid
        assert "".join(d.text for d in items[:-1]) == "".join(f"t{i} " for i in range(50 + sid))


def test_stop_ends_a_reply_at_once_and_frees_its_slot(engine, host):
    async def main():
        task = asyncio.create_task(collect(engine, 7, GenSettings(max_new_tokens=100_000)))
        await until(lambda: engine.active_sessions() == 1 and host.call("active", "text") == 1)
        t = time.perf_counter()
        await engine.stop(7)
        items = await asyncio.wait_for(task, 5)
        return items, time.perf_counter() - t

    items, took = asyncio.run(main())
    assert items[-1].finish_reason == "abort" and took < 4
    assert engine.active_sessions() == 0 and host.call("active", "text") == 0


def test_a_reader_that_goes_away_cancels_its_reply_in_the_child(engine, host):
    async def main():
        stream = engine.stream(8, TEXT, GenSettings(max_new_tokens=100_000))
        async for _ in stream:
            break
        await stream.aclose()  # a closed tab: Gradio drops the generator
        assert engine.active_sessions() == 0
        await until(lambda: host.call("active", "text") == 0)

    asyncio.run(main())


def test_a_stop_while_the_prompt_is_templated_ends_the_reply(host):
    engine = host.build("text-slow", FAKE, {"kind": "text", "tokens": 100_000, "template_s": 0.5})

    async def main():
        task = asyncio.create_task(collect(engine, 3, GenSettings(max_new_tokens=100_000)))
        await until(lambda: host.call("active", "text-slow") == 1)  # registered, still templating
        await engine.stop(3)
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(main())[-1].finish_reason == "abort"
    assert host.call("active", "text-slow") == 0


def test_a_stop_whose_caller_gives_up_breaks_nothing(engine, host):
    async def main():
        task = asyncio.create_task(collect(engine, 4, GenSettings(max_new_tokens=100_000)))
        await until(lambda: host.call("active", "text") == 1)
        stopping = asyncio.create_task(engine.stop(4))
        await asyncio.sleep(0)
        stopping.cancel()  # the page's Stop event cancelled, its answer still on its way
        ended = await asyncio.wait_for(task, 5)
        after = await asyncio.wait_for(collect(engine, 5, GenSettings(max_new_tokens=20)), 5)
        return ended, after

    ended, after = asyncio.run(main())
    assert ended[-1].finish_reason == "abort" and after[-1].finish_reason == "length"


def test_closing_ends_what_is_in_flight_and_any_log_level_is_read():
    host = EngineProcess(log_level="info")  # as APP_LOG_LEVEL may be written
    host.start()
    engine = host.build("text", FAKE, {"kind": "text", "tokens": 100_000})

    async def main():
        task = asyncio.create_task(collect(engine, 1, GenSettings(max_new_tokens=100_000)))
        await until(lambda: host.call("active", "text") == 1)
        await asyncio.to_thread(host.close)
        return await asyncio.wait_for(task, 10)

    items = asyncio.run(main())
    assert items[-1].finish_reason == "error" and "closed" in items[-1].error
    assert not host.proc.is_alive()


def test_a_failed_build_says_why_and_is_named_like_an_in_process_one(host):
    from model_loader.startup import engine_error

    with pytest.raises(EngineFailed) as e:
        host.build("vision", FAKE, {"fail": "cuMulticastCreate not found"})
    assert str(e.value) == "RuntimeError: cuMulticastCreate not found"
    assert isinstance(engine_error("vision", e.value), DriverTooOld)


def test_a_child_that_dies_ends_replies_with_the_reason_and_says_so():
    host = EngineProcess(log_level="WARNING")
    told = []
    host.on_exit.append(told.append)
    host.start()
    try:
        engine = host.build("text", FAKE, {"kind": "text", "tokens": 100_000, "delay_s": 0.002})
        first, later = asyncio.run(killed_mid_reply(host, engine))
        for items in (first, later):
            assert items[-1].finish_reason == "error" and "engine process stopped" in items[-1].error
        assert told and "engine process stopped" in told[0]
        with pytest.raises(EngineProcessGone):
            engine.count_tokens(TEXT)
    finally:
        host.close()


async def killed_mid_reply(host, engine):
    task = asyncio.create_task(collect(engine, 1, GenSettings(max_new_tokens=100_000)))
    await until(lambda: host.call("active", "text") == 1)
    host.proc.kill()
    first = await asyncio.wait_for(task, 10)
    later = await asyncio.wait_for(collect(engine, 2, GenSettings()), 5)
    await engine.stop(2)  # nothing runs: not an error
    return first, later


def test_the_child_exits_when_the_pages_process_does(tmp_path):
    script = textwrap.dedent(
        """
        import os, sys
        from model_loader.engines.process import EngineProcess
        if __name__ == "__main__":
            h = EngineProcess(log_level="WARNING")
            h.start()
            h.build("text", "tests.fakes:fake_lmdeploy_engine", {"kind": "text"})
            print(h.proc.pid, flush=True)
            os._exit(0)  # no clean-up: as a killed server
        """
    )
    (tmp_path / "parent.py").write_text(script)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, str(tmp_path / "parent.py")],
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.stdout.strip().isdigit(), out.stderr[-2000:]
    pid = int(out.stdout)
    end = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < end, "the engine process outlived the page's process"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_until(predicate, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "not reached in time"
        time.sleep(0.02)


def app_startup(tiny_models, monkeypatch, builder: str):
    """The app's Startup over the tiny checkpoints, with --engine-process and `builder` in the child; no GPU plan."""
    from model_loader.config import AppConfig
    from model_loader.startup import Startup

    monkeypatch.setattr("model_loader.startup.ENGINE_BUILDER", builder)
    monkeypatch.setattr("model_loader.startup.gpu_memory", lambda: None)
    cfg = AppConfig(text_model=str(tiny_models["awq"]), vision_model=str(tiny_models["llava"]), engine_process=True)
    return Startup(cfg, {})


def test_the_app_builds_its_engines_in_the_engine_process_and_builds_them_again_if_it_dies(tiny_models, monkeypatch):
    from model_loader.engines.process import ProcessEngine

    monkeypatch.setattr("model_loader.startup.ENGINE_RESTARTS", 1)
    st = app_startup(tiny_models, monkeypatch, FAKE)
    st.build_all()
    text, vision = st.slots["text"], st.slots["vision"]
    try:
        assert text.ready and vision.ready, (text.message, vision.message)
        first = text.engine.host
        assert isinstance(text.engine, ProcessEngine) and first is vision.engine.host  # one CUDA context
        items = asyncio.run(collect(text.engine, 1, GenSettings(max_new_tokens=5)))
        assert "".join(d.text for d in items[:-1]) == "t0 t1 t2 t3 t4 "

        first.proc.kill()  # a crash: the engines come back in a new process, the tabs saying so meanwhile
        wait_until(lambda: text.state == "loading" or text.engine.host is not first)
        wait_until(lambda: text.ready and vision.ready and vision.engine.host is not first)
        assert text.engine.host is vision.engine.host and st.restarts == 1
        items = asyncio.run(collect(text.engine, 2, GenSettings(max_new_tokens=5)))
        assert items[-1].finish_reason == "length"

        text.engine.host.proc.kill()  # once more than ENGINE_RESTARTS: down until the app is restarted
        wait_until(lambda: text.state == "failed" and vision.state == "failed")
        assert "engine process stopped" in text.message and "until the app is restarted" in text.message
    finally:
        st._process.close()


def test_the_page_chats_and_stops_over_the_engine_process(host, engine, tmp_path, monkeypatch):
    from gradio_client import Client

    from tests.conftest import fake_startup
    from ui.page import build_demo, launch_kwargs

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    st = fake_startup(engine, None, host="127.0.0.1")
    demo, i18n = build_demo(st.slots, st.cfg, st.system_info)
    _, url, _ = demo.launch(**{**launch_kwargs(st.cfg, i18n), "server_port": None, "prevent_thread_lock": True})
    try:
        c = Client(url, verbose=False)
        question = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
        hist, stats = c.predict(question, "", 0.7, 0.8, 40, 16, 1.0, 0, api_name="/chat")
        assert hist[-1]["content"][0]["text"] == "".join(f"t{i} " for i in range(16)), stats
        job = c.submit(question, "", 0.7, 0.8, 40, 2048, 1.0, 0, api_name="/chat")
        end = time.monotonic() + 10
        while host.call("active", "text") == 0:
            assert time.monotonic() < end
            time.sleep(0.01)
        c.predict(hist, api_name="/stop")
        end = time.monotonic() + 10
        while host.call("active", "text") != 0:
            assert time.monotonic() < end, "the stopped reply still runs in the engine process"
            time.sleep(0.01)
        job.result(timeout=10)
    finally:
        demo.close()


def test_a_child_that_dies_while_start_up_still_builds_comes_back_with_both_engines(tiny_models, monkeypatch):
    """Review: a crash before start-up had finished failed the built engine for good, while the next build quietly
    started a new child."""
    st = app_startup(tiny_models, monkeypatch, "tests.fakes:slow_second_engine")
    st.start()
    text, vision = st.slots["text"], st.slots["vision"]
    try:
        wait_until(lambda: {text.state, vision.state} == {"ready", "loading"})
        built = text if text.ready else vision
        built.engine.host.proc.kill()  # while the other engine is being built in it
        wait_until(lambda: text.ready and vision.ready and text.engine.host is vision.engine.host)
        assert st.restarts == 1 and text.engine.host.proc.is_alive()
        items = asyncio.run(collect(vision.engine, 1, GenSettings(max_new_tokens=5)))
        assert items[-1].finish_reason == "length"
    finally:
        st._process.close()


def test_a_reply_cancelled_before_it_reaches_the_child_never_runs(engine, host):
    """An image request is sent from a worker thread, so its reader's cancel can overtake it (review)."""
    from model_loader.engines.child import CANCEL, STREAM

    host.send((CANCEL, 10_001))
    host.send((STREAM, 10_001, "text", 9, TEXT, GenSettings(max_new_tokens=100_000)))
    time.sleep(0.5)
    assert host.call("active", "text") == 0


def test_only_recent_restarts_count_against_the_limit():
    """Review: three crashes over weeks of uptime would have left the engines down for good."""
    from model_loader.startup import recent_restarts

    hour = 3600.0
    assert recent_restarts([], 10 * hour, hour) == 0
    assert recent_restarts([1.0, 2 * hour, 9.5 * hour, 9.9 * hour], 10 * hour, hour) == 2


def test_trimming_a_long_chat_asks_the_engine_process_twice_at_most(host, engine, monkeypatch):
    """Trimming counts every turn of the chat; over the engine process each count was a round trip through the
    child's busy loop (18 for this 20-turn chat; 7.5 ms against 0.6 ms in process for 15, idle on CPU). The counts go in one
    message, and the kept chat's exact count in a second, with the same result as in process."""
    from tests.fakes import fake_lmdeploy_engine
    from ui import streaming

    chat = [{"role": "system", "content": "You are helpful."}]
    for t in range(20):
        chat += [{"role": "user", "content": f"question {t} " * 60}, {"role": "assistant", "content": f"answer {t} " * 60}]
    chat.append({"role": "user", "content": "and now?"})
    asked = []
    call_async = host.call_async
    monkeypatch.setattr(host, "call_async", lambda method, *a: (asked.append(method), call_async(method, *a))[1])
    kept, note = asyncio.run(streaming.fit_messages(engine, chat, 4096, 256))
    here, _ = asyncio.run(streaming.fit_messages(fake_lmdeploy_engine(kind="text"), chat, 4096, 256))
    assert kept == here and 3 < len(kept) < len(chat) and "left out" in note
    assert len(asked) <= 2, asked


def test_the_pipe_is_closed_once_when_the_child_ends_as_the_app_closes(monkeypatch):
    """Closing the app and the reader thread seeing the child's end both closed the pipe: at Ctrl+C under load the
    second close raised `OSError: Bad file descriptor` (exit code 1), or closed whatever file had taken its number
    meanwhile. It is closed once, after the reader has seen the end."""
    import threading
    from multiprocessing import connection

    closes, errors = [], []
    real = connection.Connection._close

    def slow_close(self, _close=os.close):  # a wide window between the check and the close, as a loaded machine has
        time.sleep(0.2)
        closes.append(self._handle)
        real(self, _close)

    h = EngineProcess(log_level="WARNING")
    h.start()
    reader = h._reader
    monkeypatch.setattr(connection.Connection, "_close", slow_close)
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    h.close()
    reader.join(10)  # its own end, if it closes too
    assert not errors, errors
    assert len([c for c in closes if c is not None]) == 1, closes
    with pytest.raises(EngineProcessGone):
        h.send(("count_tokens_each", "text", []))  # a send after the close says the engine process is gone


def test_ctrl_c_closes_the_app_and_its_engine_process_without_a_restart(tiny_models, tmp_path):
    """Ctrl+C reaches the whole terminal's process group: the engine process must not die of it first and be taken
    for a crash (and started again while the app exits); the app closes it, and both are gone."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(
        f"""
        import faulthandler
        import signal
        import sys
        import app
        from model_loader import startup
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for every thread's stack on a hang
        from model_loader.config import AppConfig
        if __name__ == "__main__":
            startup.ENGINE_BUILDER = "tests.fakes:fake_lmdeploy_engine"
            startup.gpu_memory = lambda: None
            cfg = AppConfig(text_model={str(tiny_models["awq"])!r}, vision_model={str(tiny_models["llava"])!r},
                            host="127.0.0.1", port={port})
            app.configure_logging("INFO")
            sys.exit(app.serve(cfg, {{}}))
        """
    )
    (tmp_path / "serve.py").write_text(script)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        p = subprocess.Popen(
            [sys.executable, str(tmp_path / "serve.py")],
            cwd=root,
            env={**os.environ, "PYTHONPATH": root, "GRADIO_ANALYTICS_ENABLED": "False"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # as from a terminal: a runner started in the background (`cmd &` in a script) ignores SIGINT, and its
            # children inherit that, so the app never saw the Ctrl+C (three hangs in CI runs started so this session)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        wait_until(lambda: log.read_text().count("Ready on turbomind") >= 2 or p.poll() is not None, 90)
        assert p.poll() is None, log.read_text()[-3000:]
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl+C in the terminal does
        try:
            code = p.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGUSR1)  # where it hangs, for the failure's message
            time.sleep(2)
            raise AssertionError("the app did not exit within 30 s of Ctrl+C:\n" + log.read_text()[-6000:]) from None
        assert code == 0, log.read_text()[-3000:]
        end = time.monotonic() + 15
        while True:  # every process of the group is gone: the engine process too
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < end, "the engine process outlived the app"
            time.sleep(0.1)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Starting the engines again" not in text and "Traceback" not in text, text[-3000:]


def test_a_build_that_ends_the_engine_process_each_time_is_tried_twice_then_fails(tiny_models, monkeypatch):
    """Review: an engine whose build kills the child every time (TurboMind aborting) was built again at every restart
    until the hour's restarts were spent, taking the text engine down each time, and then nothing was left for a real
    crash. It is tried once more (a crash can be a one-off), then it fails, naming why, and the other one serves."""
    st = app_startup(tiny_models, monkeypatch, "tests.fakes:vision_build_aborts")
    st.build_all()
    text, vision = st.slots["text"], st.slots["vision"]
    try:
        wait_until(lambda: text.ready and vision.state == "failed")
        assert "engine process stopped" in vision.message and "while the vision engine was being built" in vision.message, (
            vision.message
        )
        assert st.restarts == 2
        items = asyncio.run(collect(text.engine, 1, GenSettings(max_new_tokens=5)))
        assert items[-1].finish_reason == "length"
    finally:
        st._process.close()


def test_the_engine_process_keeps_logging_after_lmdeploy_is_imported(capfd):
    """Review: lmdeploy turns every plain StreamHandler of the root logger down to ERROR when it makes its logger,
    so the engine process's own INFO lines stopped after its first build."""
    h = EngineProcess(log_level="INFO")
    h.start()
    try:
        h.build("text", FAKE, {"kind": "text"})
        wait_until(lambda: "objects left out of garbage collection" in capfd.readouterr().err, 20)
    finally:
        h.close()
