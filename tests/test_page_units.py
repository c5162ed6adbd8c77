"""Pure parts of the page: literal user text, browser-storage trimming, the waiting line, session files, the
System tab's words and numbers, the header."""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import pytest

from model_loader.config import AppConfig
from model_loader.engines.seam import Delta, Stats
from model_loader.engines.slot import EngineSlot
from ui import user_text
from ui.chat_tab import fit_for_browser
from ui.files import Scratch
from ui.streaming import stream_into, waiting_line

TRICKY = [
    "</s>",
    "<s>x</s> **bold** _it_ `code` ~~gone~~ [link](http://x) ![img](y) $$x^2$$",
    "# heading\n> quote\n- item\n+ item\n1. first\n2) second\n---\n===\n| a | b |\n|---|---|",
    "    indented code\n\ttabbed\n  two spaces",
    "C:\\Users\\me \\* \\\\ back\\slashes &amp; &nbsp; &#9; entities",
    "中文 <b>粗体</b> 😀 \u2060 joiner",
    "",
]


@pytest.mark.parametrize("raw", TRICKY)
def test_shown_text_reads_back_exactly(raw):
    assert user_text.typed(user_text.shown(raw)) == raw


def test_shown_text_escapes_what_markdown_and_html_would_act_on():
    m = user_text.MARK
    assert user_text.shown("</s>") == m + "\\</s\\>"
    assert user_text.shown("# h\n2. x\n- y") == m + "\\# h\n2\\. x\n\\- y"
    assert user_text.shown("    code") == m + "&nbsp;" * 4 + "code"
    assert user_text.shown("a*b* my_var") == m + "a\\*b\\* my\\_var"


def test_unmarked_text_is_taken_as_typed():
    assert user_text.typed("an API client's raw \\* text") == "an API client's raw \\* text"


def test_clean_replaces_lone_surrogates_and_keeps_pairs():
    assert user_text.clean("a\ud800b\udfffc") == "a\ufffdb\ufffdc"
    assert user_text.clean("ok \ud83d\ude00") == "ok 😀"
    assert user_text.clean("nul\x00") == "nul"
    hist = user_text.clean_history([{"role": "user", "content": [{"type": "text", "text": "x\ud800"}]}, "junk"])
    assert hist == [{"role": "user", "content": [{"type": "text", "text": "x\ufffd"}]}]


def test_cleaning_a_long_chat_leaves_the_regex_engine_out(monkeypatch):
    """Every turn cleans the whole chat the browser sends back, twice. Scanning it for surrogates with a regex took
    about 9 ns a character: 8 % of the web server's samples in 20-turn chats at 16 users (py-spy, CPU; issue 14).
    Text without surrogates is now told by C-level checks (ASCII, or encodable as UTF-8); the results are the same."""

    class Spy:
        scanned = 0

        def search(self, text):
            Spy.scanned += len(text)
            return real.search(text)

    real = user_text._SURROGATES
    monkeypatch.setattr(user_text, "_SURROGATES", Spy())
    chat = []
    for i in range(20):
        chat += [{"role": "user", "content": [{"type": "text", "text": f"question {i} " * 40}]},
                 {"role": "assistant", "content": f"回答 {i} 很好。" * 60}]  # fmt: skip
    assert user_text.clean_history(chat) == chat
    assert Spy.scanned == 0
    assert user_text.clean("回答\ud800\x00") == "回答\ufffd"
    assert user_text.clean("回答 \ud83d\ude00\x00") == "回答 😀"


def test_saved_conversation_keeps_the_newest_whole_turns():
    hist = []
    for i in range(10):
        hist += [{"role": "user", "content": f"q{i} " + "x" * 100}, {"role": "assistant", "content": f"a{i} " + "y" * 100}]
    kept, dropped = fit_for_browser(hist, budget=1000)
    assert kept[0]["role"] == "user" and kept[-1] == hist[-1]
    assert dropped == len(hist) - len(kept) and 0 < len(kept) < len(hist)
    assert fit_for_browser(hist, budget=10**9) == (hist, 0)
    assert fit_for_browser([{"role": "user", "content": "z" * 5000}], budget=1000) == ([], 1)


def test_waiting_line():
    assert waiting_line(5, 8) == "" and waiting_line(9, 0) == ""
    line = waiting_line(10, 8)
    assert "Waiting for a free slot" in line and "2 are waiting" in line


def test_a_reply_waiting_for_a_slot_says_so_until_its_first_text(monkeypatch):
    monkeypatch.setattr("ui.streaming.WAIT_POLL_S", 0.02)
    active = {"n": 12}

    async def slow():
        await asyncio.sleep(0.15)
        active["n"] = 8
        yield Delta("hello")
        yield Stats(3, 1, 0.15, 0.2, "stop")

    async def run():
        return [line async for _, line in stream_into([], slow(), active=lambda: active["n"], capacity=8)]

    lines = asyncio.run(run())
    assert any("Waiting for a free slot" in x and "4 are waiting" in x for x in lines)
    assert "first token" in lines[-1] and "Waiting" not in lines[-1]


def test_stream_into_closes_the_engine_stream_when_the_reader_leaves():
    closed = []

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.001)
                yield Delta("x")
        finally:
            closed.append(True)

    async def run():
        gen = stream_into([], endless())
        async for _ in gen:
            if len(closed) == 0 and _[0][-1]["content"]:
                break
        await gen.aclose()

    asyncio.run(run())
    assert closed == [True]


def test_scratch_keeps_few_files_per_session_and_forgets_them(tmp_path):
    s = Scratch(tmp_path / "root", keep=3)
    for i in range(7):
        last = s.path("abc", f"f{i}.md")
        last.write_text("x")
    assert len(list(s.folder("abc").glob("*/*.md"))) == 3 and last.exists() and last.name == "f6.md"
    s.path("other", "o.md").write_text("y")
    s.drop("abc")
    assert not s.folder("abc").exists() and s.folder("other").exists()
    old = s.folder("other")
    os.utime(old, (time.time() - 10 * 3600, time.time() - 10 * 3600))
    s.shared("examples")
    s.path("new", "n.md")
    assert not old.exists() and (s.root / "_examples").exists()


def test_scratch_writes_nothing_until_used(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "g"))
    s = Scratch()
    assert not (tmp_path / "g").exists()
    assert str(s.root).startswith(str(tmp_path / "g"))


def test_system_tab_numbers_and_words():
    from ui.system_tab import NO_GPU, memory_markdown

    assert memory_markdown({"gpu": None}) == NO_GPU
    md = memory_markdown(
        {
            "gpu": {"name": "NVIDIA A10", "used_mib": 20000, "total_mib": 23028},
            "memory": [
                {"engine": "vision", "what": "planned", "MiB": 15000},
                {"engine": "vision", "what": "measured", "MiB": 15300},
                {"engine": "text", "what": "planned", "MiB": 19000},
            ],
        }
    )
    assert "NVIDIA A10" in md and "15,300" in md and "+2.0%" in md and "not loaded yet" in md


def test_configuration_only_for_a_logged_in_operator():
    import gradio as gr

    from ui.system_tab import build_system_tab

    slots = {"text": EngineSlot("text", "ready", "Ready"), "vision": EngineSlot("vision", "failed", "CUDA OOM")}
    with gr.Blocks():
        tab = build_system_tab(slots, lambda: {"gpu": None}, lambda k: k, [], config={"cache_dir": "/secret"})
    visitor = tab.load_fn(SimpleNamespace(username=None))
    operator = tab.load_fn(SimpleNamespace(username="alice"))
    assert visitor[-1]["visible"] is False and visitor[-1]["value"] is None
    assert operator[-1]["visible"] is True and operator[-1]["value"] == {"cache_dir": "/secret"}
    assert visitor[2]["visible"] is False  # no chart without a GPU
    assert "CUDA OOM" in visitor[0]
    with gr.Blocks():
        open_tab = build_system_tab(slots, lambda: {"gpu": None}, lambda k: k, [], config=None)
    assert open_tab.load_fn(SimpleNamespace(username="alice"))[-1]["visible"] is False


def test_header_shows_models_engine_and_states_in_the_visitors_language():
    from ui.page import header_html

    slots = {"text": EngineSlot("text", "ready", "Ready"), "vision": EngineSlot("vision", "loading", "Loading <x>")}
    h = header_html(slots, AppConfig())
    assert "InternLM2-Chat-1.8B" in h and "LLaVA-1.5-7B" in h and "LMDeploy TurboMind" in h
    assert "state-ready" in h and "state-loading" in h and "Loading &lt;x&gt;" in h
    assert "就绪" in header_html(slots, AppConfig(), "zh") and "加载中" in header_html(slots, AppConfig(), "zh")


def test_concurrency_per_engine_can_follow_what_its_cache_holds():
    from tests.conftest import fake_startup
    from tests.fakes import FakeEngine
    from ui.page import build_demo

    st = fake_startup(FakeEngine("text"), FakeEngine("vision"), text_batch_size=32, vision_batch_size=8)
    demo, _ = build_demo(st.slots, st.cfg, st.system_info, concurrency={"text": 5})
    limits = {fn.concurrency_id: fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id in ("text", "vision")}
    assert limits == {"text": 5, "vision": 8}


def test_a_turn_s_inputs_are_what_gradio_s_preprocess_makes(tmp_path, monkeypatch):
    """The turn events take their inputs unprocessed (preprocess=False) and convert them in line: on the page's own
    Enter event, Gradio's preprocess_data with preprocess on must hand the function exactly what ours makes, and
    refuse what it refuses with the same message (a slider below its minimum)."""
    import asyncio
    import copy

    from gradio.state_holder import SessionState

    from bench.pages import enter_event
    from tests.conftest import fake_startup
    from tests.fakes import FakeEngine
    from ui.page import build_demo
    from ui.rendered import preprocessed

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    st = fake_startup(FakeEngine("text"), FakeEngine("vision"))
    demo, _ = build_demo(st.slots, st.cfg, st.system_info)
    turn = demo.fns[enter_event(demo.get_config_file())]
    assert turn.preprocess is False
    picture = tmp_path / "picture.png"  # in Gradio's upload folder (GRADIO_TEMP_DIR), as an uploaded file is
    picture.write_bytes(b"\x89PNG\r\n\x1a\n")
    history = [
        {"role": "user", "content": [{"type": "text", "text": "\u2060  indented"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "**bold**"}], "metadata": {"title": "t"}, "options": []},
        {"role": "user", "content": [{"type": "file", "file": {"path": str(picture), "meta": {"_type": "gradio.FileData"}}}]},
        {"role": "assistant", "content": []},
    ]
    cases = {
        "plain": ["msg", history, "sys", 0.7, 0.9, 40, 256, 1.05, 3.0, 0],
        "nones": [None, None, None, 0.7, 0.9, 40, 256, 1.05, None, 0],
        "seed with a fraction": ["m", [], "s", 0.7, 0.9, 40.4, 256, 1.05, 3.7, 0],
        "below the minimum": ["m", [], "s", -1.0, 0.9, 40, 256, 1.05, 3, 0],
    }

    async def inputs(gradio_preprocess: bool, payload: list):
        turn.preprocess = gradio_preprocess
        try:
            out = await demo.preprocess_data(turn, copy.deepcopy(payload), SessionState(demo))
            return ("ok", out if gradio_preprocess else preprocessed(turn.inputs, tuple(out)))
        except Exception as e:
            return ("refused", type(e).__name__, str(e))
        finally:
            turn.preprocess = False

    for name, payload in cases.items():
        gradio_made, ours = asyncio.run(inputs(True, payload)), asyncio.run(inputs(False, payload))
        assert ours == gradio_made, name
    assert asyncio.run(inputs(False, cases["plain"]))[1][1][2]["content"][0]["file"]["path"] == str(picture)
    assert asyncio.run(inputs(False, cases["below the minimum"]))[:2] == ("refused", "Error")
    assert isinstance(asyncio.run(inputs(False, cases["seed with a fraction"]))[1][8], int)


def test_a_turn_renders_the_chat_as_gradio_does_redoing_only_what_changed(monkeypatch):
    """The turn events send values they rendered themselves (postprocess=False): they must be exactly what the
    Chatbot and Markdown's own postprocess make, and an update must not render the unchanged messages again."""
    import gradio as gr
    import orjson

    from ui.rendered import Rendered

    chatbot, stats = gr.Chatbot(render=False), gr.Markdown(render=False)
    history = [
        {"role": "user", "content": "\u2060  indented\n    more\n"},
        {"role": "assistant", "content": [{"type": "text", "text": "**bold** answer"}]},
        {"role": "user", "content": [{"type": "text", "text": "next"}]},
        {"role": "assistant", "content": ""},  # Gradio leaves an empty message out
    ]
    render = Rendered(chatbot, stats)

    def sent(value):  # as the page receives it
        return orjson.loads(orjson.dumps(value))

    assert sent(render.chat(history)) == chatbot.postprocess(history).model_dump()
    assert render.line("  12 tokens · 3.1 s \n") == stats.postprocess("  12 tokens · 3.1 s \n")
    assert render.chat(gr.skip()) == gr.skip() and render.line(gr.skip()) == gr.skip()

    grown = history[:-1] + [{"role": "assistant", "content": "the answer so far"}]
    expected = chatbot.postprocess(grown).model_dump()
    calls = []
    real = gr.Chatbot._postprocess
    monkeypatch.setattr(gr.Chatbot, "_postprocess", lambda self, m: calls.append(m) or real(self, m))
    assert sent(render.chat(grown)) == expected
    assert [m["content"] for m in calls] == ["the answer so far"]
    *earlier, last = render.chat(grown)  # Gradio's walks and diff pass over the unchanged ones, the same objects
    assert all(isinstance(m, orjson.Fragment) for m in earlier) and isinstance(last, dict)
    assert render.chat(grown)[:-1] == earlier


def test_the_server_written_lines_name_the_buttons_as_the_page_labels_them():
    from ui.i18n import EN, ZH, server_text

    assert EN["regenerate"] in server_text("en", "unanswered")
    assert ZH["regenerate"] in server_text("zh", "unanswered")
    assert server_text("fr", "unanswered") == server_text("en", "unanswered")


def test_a_message_with_a_file_is_left_for_gradio_to_find_its_file():
    """Only text messages go out as JSON written once: Gradio must still find a file to cache it and give it a URL."""
    import orjson

    from ui.rendered import as_json

    text = {"role": "user", "metadata": None, "content": [{"type": "text", "text": "hi"}], "options": None}
    image = {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/x.png", "meta": {"_type": "gradio.FileData"}}}]}
    assert isinstance(as_json(text), orjson.Fragment) and orjson.loads(orjson.dumps([as_json(text)])) == [text]
    assert as_json(image) is image


def test_a_clear_before_a_page_turns_reply_starts_is_kept_for_it():
    """A page turn accepts its message and streams in the same event, after counting tokens: a Clear in between
    must still end it showing the cleared chat. Only an API step, whose reply is a later /chat that may never come,
    is forgotten when no /chat waits for it."""
    from types import SimpleNamespace

    from ui.streaming import Replies

    replies = Replies()
    replies.queue = SimpleNamespace(event_queue_per_concurrency_id={})  # nothing waits in Gradio's queue
    replies.accepted("chat")  # Enter: the reply comes in this event
    replies.replace("chat", [], None, "text")
    assert replies.replaced("chat") == []
    replies.accepted("chat", later=True)  # /add_message: the reply is the script's /chat
    replies.replace("chat", [], None, "text")
    assert replies.replaced("chat") is None and not replies.active("chat")


def test_the_saved_conversation_goes_out_as_the_json_of_the_kept_turns_cleaned():
    """A turn saves the conversation as JSON written once (Gradio's walks pass over it): the newest whole turns
    whose JSON fits the budget, each message as orjson writes it, cleaned where clean() would change it."""
    import orjson

    from ui.chat_tab import saved_json

    hist = []
    for i in range(10):
        hist += [{"role": "user", "content": f"q{i} " + "x" * 100}, {"role": "assistant", "content": f"a{i} " + "y" * 100}]
    frags, dropped = saved_json(hist, budget=1000)
    kept = orjson.loads(orjson.dumps(frags))
    assert kept == hist[dropped:] and kept[0]["role"] == "user" and 0 < len(kept) < len(hist)
    assert len(orjson.dumps(kept)) <= 1000 < len(orjson.dumps(hist[dropped - 2 :]))  # one more turn would not fit
    for odd, cleaned in [("x\ud800 nul\x00 é", "x\ufffd nul é"), ("nul\x00 only", "nul only"), ("ok é", "ok é")]:
        saved = saved_json([{"role": "user", "content": [{"type": "text", "text": odd}]}])[0]
        assert orjson.loads(orjson.dumps(saved)) == [{"role": "user", "content": [{"type": "text", "text": cleaned}]}]


def test_rendered_text_messages_are_kept_for_the_next_turn_within_a_budget(monkeypatch):
    """What a turn rendered is kept by the message's JSON for the chat's next turn, the least recently used dropped
    past the budget, which counts what the kept renders take in memory; a message with a file is rendered each
    time (its file is Gradio's to cache)."""
    import gc
    import tracemalloc

    import gradio as gr
    import orjson

    from ui import rendered as r

    chatbot, stats = gr.Chatbot(render=False), gr.Markdown(render=False)
    calls = []
    real = gr.Chatbot._postprocess
    monkeypatch.setattr(gr.Chatbot, "_postprocess", lambda self, m: calls.append(1) or real(self, m))
    memo = r.RenderMemo()
    history = [{"role": "user", "content": f"question {i}"} for i in range(5)] + [{"role": "assistant", "content": ""}]
    r.Rendered(chatbot, stats, memo).chat(history)
    assert len(calls) == 6
    again = [dict(m) for m in history]  # the next turn: equal messages, new objects
    sent = lambda value: orjson.loads(orjson.dumps(value))  # noqa: E731 - as the page receives it
    assert sent(r.Rendered(chatbot, stats, memo).chat(again)) == sent(r.Rendered(chatbot, stats).chat(history))
    assert len(calls) == 6 + 1 + 6  # the last message is never kept (the growing answer is new at every update)
    assert r.memo_key({"role": "user", "content": [{"type": "file", "file": {"path": "a.png"}}]}) is None

    small = r.RenderMemo(budget=3 * (16 + 2 * 40 + r.MEMO_ENTRY_BYTES))  # room for three short messages
    for i in range(4):
        small.put(bytes([i]) * 16, [], [], 40)
        small.get(bytes([0]) * 16)  # the first stays in use
    assert small.get(bytes([0]) * 16) is not None and small.get(bytes([1]) * 16) is None, "not least recently used"

    memo = r.RenderMemo()
    words = " ".join(["word"] * 60)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for turn in range(200):  # 2,000 kept messages, rendered turn by turn, each turn's renderer dropped after
            chat = [{"role": "user", "content": f"turn {turn} message {i} {words}"} for i in range(10)]
            r.Rendered(chatbot, stats, memo).chat(chat + [{"role": "assistant", "content": ""}])
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert memo.size <= memo.budget and held <= 1.5 * memo.size, (held, memo.size)
