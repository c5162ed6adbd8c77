"""The launched page through gradio_client, as API users and browsers reach it: readable refusals, uploads checked
before decoding, text that cannot break the server, one reply at a time per chat, files cleaned up."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image


def msg(text):
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def chat(client, history, max_new=64):
    return client.submit(history, "", 0.7, 0.8, 40, max_new, 1.0, 0, api_name="/chat")


def reply_text(history):
    c = history[-1]["content"]
    return c[0]["text"] if isinstance(c, list) else c


class PeakRss:
    """The process's resident memory sampled every 2 ms while the block runs (Pillow's buffers are not Python
    objects, so tracemalloc would not see them)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    @property
    def grown_mib(self) -> float:
        return (self.peak - self.base) / 2**20


# ---- refusals: readable, from the app, never Gradio's internals ----


def test_a_text_file_named_png_gets_our_refusal(launched, tmp_path):
    url, _, _ = launched
    c = Client(url, verbose=False)
    bad = tmp_path / "notes.png"
    bad.write_text("just text")
    for call in (
        lambda: c.predict(handle_file(str(bad)), [], api_name="/set_image"),
        lambda: c.predict(handle_file(str(bad)), msg("what is it?"), 0.2, 64, api_name="/image_chat"),
    ):
        with pytest.raises(Exception) as e:
            call()
        assert "notes.png is not an image we can read" in str(e.value)
        assert "preprocess" not in str(e.value) and "/tmp" not in str(e.value)


def test_empty_and_blank_messages_are_refused_by_the_api(launched):
    url, (text, _), _ = launched
    c = Client(url, verbose=False)
    for blank in ("", "   \n\t"):
        with pytest.raises(Exception, match="type a message first"):
            c.predict(msg(blank), "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")
        with pytest.raises(Exception, match="type a message first"):
            c.predict(blank, [], api_name="/add_message")
    assert not text.calls


def test_asking_without_an_image_is_refused(launched):
    url, _, _ = launched
    c = Client(url, verbose=False)
    with pytest.raises(Exception, match="Upload an image first"):
        c.predict("what is this?", [], None, api_name="/add_question")


def call_raw(url: str, api_name: str, data: list) -> dict:
    """One queued call as a browser makes it: JSON with \\u escapes, so lone surrogates reach the server."""
    import json
    import uuid

    import httpx

    from bench.sse_client import fn_index

    session = uuid.uuid4().hex[:12]
    with httpx.Client(timeout=30) as http:
        index = fn_index(http.get(url + "config").json(), api_name)
        body = {"data": data, "fn_index": index, "session_hash": session, "event_data": None, "trigger_id": None}
        r = http.post(url + "gradio_api/queue/join", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        with http.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}) as s:
            for line in s.iter_lines():
                if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                    return json.loads(line[5:])
    raise AssertionError("no result")


def test_lone_surrogates_are_replaced_not_a_server_error(launched):
    url, _, _ = launched
    r = call_raw(url, "add_message", ["hi \ud800 there", []])
    assert r["success"], r
    box, hist = r["output"]["data"]
    assert box == "" and "\ufffd" in reply_text(hist)
    r = call_raw(url, "chat", [msg("bad \udfff half"), "\ud83d", 0.7, 0.8, 40, 64, 1.0, 0])
    assert r["success"], r
    assert reply_text(r["output"]["data"][0]) == "You said: bad \ufffd half"


def test_refusals_are_logged_in_one_line(launched, caplog, capfd):
    url, _, _ = launched
    c = Client(url, verbose=False)
    with caplog.at_level(logging.INFO, logger="ui.streaming"):
        with pytest.raises(Exception):  # noqa: B017
            c.predict("  ", [], api_name="/add_message")
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "Traceback" not in capfd.readouterr().err


# ---- uploads: checked before decoding, converted as the model sees them ----


def test_a_huge_grey_png_is_refused_in_bounded_memory(launched, tmp_path):
    url, _, st = launched
    p = tmp_path / "huge.png"
    Image.new("L", (12000, 12000), 200).save(p, compress_level=1)
    c = Client(url, verbose=False)
    with PeakRss() as rss, pytest.raises(Exception, match="megapixels"):
        c.predict(handle_file(str(p)), [], api_name="/set_image")
    assert rss.grown_mib < 100, f"refusing the upload cost {rss.grown_mib:.0f} MiB"


def test_uploads_keep_transparency_white_and_16_bit_levels(launched, tmp_path):
    url, _, _ = launched
    c = Client(url, verbose=False)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (64, 48), (255, 0, 0, 0)).save(clear)
    hist, preview = c.predict(handle_file(str(clear)), [], api_name="/set_image")
    assert Image.open(preview).convert("RGB").getpixel((10, 10)) == (255, 255, 255)
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    _, preview = c.predict(handle_file(str(tmp_path / "ramp16.png")), [], api_name="/set_image")
    assert len(np.unique(np.asarray(Image.open(preview).convert("L")))) > 200


# ---- one reply at a time per chat; Clear stops the reply ----


def test_a_second_reply_in_the_same_chat_is_refused(launched):
    url, (text, _), _ = launched
    text.delay_s = 0.02
    text.enqueue(" ".join(f"w{i}" for i in range(100)))
    c = Client(url, verbose=False)
    first = chat(c, msg("long one"), max_new=200)
    while text.active_sessions() == 0:
        time.sleep(0.01)
    with pytest.raises(Exception, match="still being written"):
        c.predict(msg("and another"), "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")
    assert reply_text(first.result(timeout=30)[0]).endswith("w99")
    other = Client(url, verbose=False)  # another browser is another chat
    assert reply_text(other.predict(msg("hi"), "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")[0]) == "You said: hi"


@pytest.mark.parametrize("action", ["/clear", "/undo"])
def test_clear_and_undo_stop_the_running_reply_and_have_the_last_word(launched, action):
    url, (text, _), _ = launched
    text.delay_s = 0.05
    text.enqueue(" ".join(f"w{i}" for i in range(400)))
    c = Client(url, verbose=False)
    before = [*msg("first"), {"role": "assistant", "content": [{"type": "text", "text": "one"}]}]
    job = chat(c, before + msg("long one"), max_new=400)
    while text.active_sessions() == 0:
        time.sleep(0.01)
    time.sleep(0.2)
    left = c.predict(api_name="/clear")[0] if action == "/clear" else c.predict(before + msg("long one"), api_name="/undo")[0]
    assert text.stopped and text.active_sessions() == 0
    # the reply's own last update shows what Clear/Undo left, so the page cannot be repainted with the old turn
    final = job.result(timeout=10)[0]
    assert [reply_text([m]) for m in final] == [reply_text([m]) for m in left] == ([] if action == "/clear" else ["first", "one"])


# ---- files written for a session are bounded and removed ----


def test_exports_are_written_per_session_and_bounded(launched, tmp_path):
    url, _, _ = launched
    c = Client(url, verbose=False)
    hist = [*msg("q"), {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
    for _ in range(9):
        path = c.predict(hist, api_name="/export_markdown")
    assert Path(path).read_text().startswith("# Conversation")
    ours = list((tmp_path / "gradio").glob("internlm-chat-*/s-*/*/*.md"))  # GRADIO_TEMP_DIR of the fixture
    assert 0 < len(ours) <= 6, f"{len(ours)} export files kept for one session"


@pytest.fixture
def one_at_a_time(engines, tmp_path, monkeypatch):
    """The page with room for one text reply at a time: everyone else waits in Gradio's queue."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from tests.conftest import TEST_LAUNCH, fake_startup
    from ui.page import build_demo, launch_kwargs

    st = fake_startup(*engines, host="127.0.0.1")
    demo, i18n = build_demo(st.slots, st.cfg, st.system_info, concurrency={"text": 1})
    kw = launch_kwargs(st.cfg, i18n)
    kw.update(TEST_LAUNCH)
    _, url, _ = demo.launch(**kw)
    try:
        yield url, engines
    finally:
        demo.close()


def test_a_reply_cleared_while_it_waits_in_the_queue_never_runs(one_at_a_time):
    url, (text, _) = one_at_a_time
    text.delay_s = 0.02
    text.enqueue(" ".join(f"w{i}" for i in range(60)))
    first = chat(Client(url, verbose=False), msg("I hold the only slot"), max_new=100)
    while text.active_sessions() == 0:
        time.sleep(0.01)
    c = Client(url, verbose=False)
    _, hist = c.predict("me next", [], api_name="/add_message")
    waiting = chat(c, hist)
    time.sleep(0.2)
    assert c.predict(api_name="/clear")[0] == []
    first.result(timeout=30)
    assert waiting.result(timeout=30)[0] == []
    assert [m[1][-1]["content"] for m in text.calls] == ["I hold the only slot"], "the cleared question was answered"


@pytest.mark.parametrize("then", ["/undo", "/clear"])
def test_undo_or_clear_after_a_step_with_no_reply_leaves_the_next_chat_alone(launched, then):
    """New-user trial: /regenerate, then /undo or /clear, and every later /chat returned ([], '') at once. The
    accepted step's reply never came, so the Undo/Clear was kept for it and handed to the next /chat instead."""
    url, (text, _), _ = launched
    c = Client(url, verbose=False)
    answered = [*msg("q"), {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
    c.predict(answered, api_name="/regenerate")  # a script that changes its mind before calling /chat
    c.predict(*([answered] if then == "/undo" else []), api_name=then)
    history, _ = chat(c, msg("Hi!")).result(timeout=30)
    assert history and reply_text(history) == "You said: Hi!", history


def test_a_call_answered_before_its_client_registers_it_still_returns(launched, monkeypatch):
    """The race behind a failed CI run of the test above: /clear completed on the client's open stream before the
    submitting thread registered it, and gradio_client 2.5.0 cancelled the call (tests/client_race.py)."""
    url, (text, _), _ = launched
    text.delay_s = 0.05
    text.enqueue(" ".join(f"w{i}" for i in range(400)))
    c = Client(url, verbose=False)
    chat(c, msg("keep this client's stream open"), max_new=400)
    while text.active_sessions() == 0:
        time.sleep(0.01)
    send = c.send_data

    def registers_late(*args, **kwargs):
        event_id = send(*args, **kwargs)
        time.sleep(0.3)  # a busy machine deschedules the submitting thread here
        return event_id

    monkeypatch.setattr(c, "send_data", registers_late)
    assert c.submit(api_name="/clear").result(timeout=10)[0] == []


def test_a_page_turn_never_waits_in_gradios_queue_behind_other_replies(one_at_a_time):
    """Enter's turn checks, shows the message and streams in one event; held in Gradio's queue it would paint the
    history it joined with over a Clear or Undo made meanwhile (review). The engine's own queue does the waiting,
    and the page says so ("Waiting for a free slot")."""
    import asyncio

    import httpx

    from bench.pages import Page

    url, (text, _) = one_at_a_time
    text.delay_s = 0.02
    text.enqueue(" ".join(f"w{i}" for i in range(80)))
    first = chat(Client(url, verbose=False), msg("I hold the only slot"), max_new=200)
    while text.active_sessions() == 0:
        time.sleep(0.01)

    async def second_user() -> dict:
        async with httpx.AsyncClient(timeout=30) as http:
            page = Page(http, url, (await http.get(url + "config")).json())
            await page.load()
            return await page.turn([], "me next", 64)

    turn = asyncio.run(second_user())
    assert not first.done(), "the second user's turn waited for the first reply to end"
    assert "You said: me next" in str(turn["history"])
    first.result(timeout=30)


def test_the_api_lists_only_what_scripts_can_call(launched):
    """Page-only events (timers, tab switches, the page's turns) are not endpoints: view_api listed a '/False'."""
    url, _, _ = launched
    named = set(Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/chat", "/add_message", "/regenerate", "/image_chat", "/set_image", "/stop", "/status"} <= named
    assert not {n for n in named if n in ("/False", "/send") or n.startswith("/unnamed")}, named


def test_the_api_names_what_each_step_returns(launched):
    """view_api named the chat and the stats line `value_8` and `value_9` (new-user trial): a script could not tell
    its outputs apart. They carry the names of the parameters they come back as."""
    url, _, _ = launched
    api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    returns = {name: [r["label"] for r in api[name]["returns"]] for name in api}
    assert returns["/chat"] == ["history", "stats"]
    assert returns["/add_message"] == ["message", "history"]
    assert returns["/image_chat"] == ["history", "stats"]
    assert returns["/add_question"] == ["question", "history"]
    assert returns["/set_image"] == ["history", "image"]


def test_the_api_takes_messages_whose_content_is_plain_text(launched):
    """`{"role": "user", "content": "Hi"}`, as most chat APIs write a message, was refused with pydantic's
    "Input should be a valid list" (new-user trial); Gradio 6's Chatbot holds content as a list of parts."""
    url, (text, _), _ = launched
    c = Client(url, verbose=False)
    hist, stats = c.predict([{"role": "user", "content": "Hi there"}], "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")
    assert reply_text(hist) == "You said: Hi there" and "tokens" in stats
    _, hist = c.predict(
        "and again", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], api_name="/add_message"
    )
    assert [m["role"] for m in hist] == ["user", "assistant", "user"]
    assert text.calls[-1][1][-1]["content"] == "Hi there"


def test_a_reply_cut_at_max_new_tokens_says_so(launched):
    """lmdeploy ends a reply that reached max_new_tokens with finish reason "length", and the line under the chat
    says so; the fake engine said "stop", so the note was never seen in the tests (new-user trial)."""
    url, (text, _), _ = launched
    text.reply_for = lambda messages: " ".join(["word"] * 50)
    c = Client(url, verbose=False)
    _, stats = c.predict(msg("tell me a lot"), "", 0.7, 0.8, 40, 16, 1.0, 0, api_name="/chat")
    assert "16 tokens" in stats and "stopped at max new tokens" in stats, stats
    _, stats = c.predict(msg("and a little"), "", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")
    assert "50 tokens" in stats and "max new tokens" not in stats, stats


def test_a_turn_sends_no_update_that_changes_nothing_on_the_page(launched):
    """Each streamed update is work for the page's one process, and at 32 users that work decides when the last
    user's reply starts (issue 14). The question shows with the reply's placeholder in one update, and the answer
    ends, with its stats line, in the update that saves it: no update repeats the chat and the line before it."""
    import asyncio

    import httpx

    from bench.pages import Page

    url, (text, _), _ = launched
    text.enqueue("one two three")

    async def turn():
        async with httpx.AsyncClient(timeout=60) as http:
            page = Page(http, url, (await http.get(url + "config")).json())
            await page.load()
            seen: list = []
            await page.turn([], "hello there", 64, seen)
            return seen

    seen = asyncio.run(turn())
    shown = [(chat, line) for _, chat, line, _ in seen]
    assert all(a != b for a, b in zip(shown, shown[1:])), shown
    assert [m["role"] for m in seen[0][1]] == ["user", "assistant"]  # the question, and the reply on its way
    assert reply_text(seen[-1][1]) == "one two three" and "tokens" in seen[-1][2] and seen[-1][3]  # saved with the end
