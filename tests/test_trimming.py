"""Fitting a conversation into the window: readable refusals, each turn counted once, the event loop left free."""

from __future__ import annotations

import asyncio
import inspect
import time

import gradio as gr
import pytest
from gradio_client import Client

from tests.fakes import FakeEngine
from ui import conversation, streaming


class CountingEngine(FakeEngine):
    """count_tokens as the fake's, recording each call (and sleeping, as a real tokenizer takes time)."""

    def __init__(self, sleep_s: float = 0.0, **kw) -> None:
        super().__init__(**kw)
        self.sleep_s = sleep_s
        self.counted: list[int] = []

    def count_tokens(self, messages: list[dict]) -> int:
        self.counted.append(len(messages))
        time.sleep(self.sleep_s)
        return super().count_tokens(messages)


def conversation_of(turns: int, words: int = 50, system: str = "You are helpful.") -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for i in range(turns):
        msgs += [
            {"role": "user", "content": f"question {i} " + "w " * words},
            {"role": "assistant", "content": f"answer {i} " + "w " * words},
        ]
    return msgs + [{"role": "user", "content": "and now?"}]


async def fit(engine, messages, session_len, max_new=64):
    result = streaming.fit_messages(engine, messages, session_len, max_new)
    return await result if inspect.isawaitable(result) else result


def last_update(slot, history: list[dict], system: str, request, replies, sizes) -> tuple[list[dict], str]:
    """The chat tab's reply to `history`, run to its end: the last (chat, stats line) it showed."""
    from ui.chat_tab import stream_reply

    async def run():
        last = None
        async for update in stream_reply(slot, history, system, 0.7, 0.8, 40, 64, 1.0, 0, request, replies, sizes):
            last = update
        return last

    return asyncio.run(run())


@pytest.mark.parametrize("system", ["", "You are a helpful assistant."])
def test_message_over_the_window_is_refused_with_or_without_a_system_prompt(system):
    eng = FakeEngine(session_len=8192)
    msgs = conversation_of(2, system=system)
    msgs[-1]["content"] = "word " * 200_000  # 1 MB
    with pytest.raises(gr.Error, match="too long") as e:
        asyncio.run(fit(eng, msgs, 8192))
    assert "8,192-token window" in e.value.message


def test_the_advice_on_a_message_too_long_is_one_the_user_can_follow():
    """Lowering Max new tokens is suggested only when it would make the message fit, with the value to lower it to
    (new-user trial: at the slider's minimum of 16 the message still said to lower it)."""
    eng = FakeEngine(session_len=1000)
    at_minimum = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(gr.Error) as e:
        asyncio.run(fit(eng, at_minimum, 1000, streaming.MIN_MAX_NEW_TOKENS))
    assert "Shorten it." in e.value.message and "Max new tokens" not in e.value.message
    near = [{"role": "user", "content": "word " * 900}]  # 904 tokens: fits if the reply keeps 96 or fewer
    with pytest.raises(gr.Error) as e:
        asyncio.run(fit(eng, near, 1000, 512))
    assert "or lower Max new tokens to 96 or less" in e.value.message


def test_oldest_turns_are_dropped_keeping_system_and_question():
    eng = FakeEngine()
    msgs = conversation_of(10)
    kept, note = asyncio.run(fit(eng, msgs, 600))
    assert kept[0]["role"] == "system" and kept[1]["role"] == "user" and kept[-1]["content"] == "and now?"
    assert eng.count_tokens(kept) <= 600 - 64 and len(kept) < len(msgs)
    assert eng.count_tokens(kept[:1] + msgs[len(msgs) - len(kept) - 2 :]) > 600 - 64, "dropped more than needed"
    assert "no longer fit" in note


def test_trimming_60_turns_counts_each_turn_once():
    eng = CountingEngine()
    msgs = conversation_of(60)
    kept, _ = asyncio.run(fit(eng, msgs, 3000))
    assert 2 < len(kept) < len(msgs)
    assert len(eng.counted) <= 60 + 4, f"{len(eng.counted)} tokenizer calls"
    assert sum(eng.counted) <= 6 * len(msgs), f"{sum(eng.counted)} messages tokenized for {len(msgs)}"


def test_a_long_chat_that_fits_is_counted_once_as_a_whole():
    """A chat longer in bytes than the window in tokens was trimmed at every turn even when it fit: every turn
    counted with the question, then the kept chat, about 2.5 times the chat's tokens through the tokenizer in the
    engine process per turn, for 16 users at once (issue 14's long conversations). The whole chat is counted first
    when it may fit; turns are counted one by one only when it does not."""
    eng = CountingEngine()
    msgs = conversation_of(20)  # about 2,300 tokens, 4.6 KB
    assert conversation.token_upper_bound(msgs) > 4096 - 64
    kept, note = asyncio.run(fit(eng, msgs, 4096))
    assert kept == msgs and note == ""
    assert eng.counted == [len(msgs)], eng.counted
    eng.counted.clear()
    asyncio.run(fit(eng, conversation_of(20), 800))  # far over: trimmed without counting the whole first
    assert len(msgs) not in eng.counted, eng.counted
    eng.counted.clear()
    alone = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "w " * 4500}]
    with pytest.raises(gr.Error, match="too long"):
        asyncio.run(fit(eng, alone, 4096))  # nothing to trim: counted once, then refused
    assert eng.counted == [2], eng.counted


def test_trimming_leaves_the_event_loop_free():
    eng = CountingEngine(sleep_s=0.01)
    msgs = conversation_of(60)

    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        start, t0 = ticks, time.perf_counter()
        await fit(eng, msgs, 3000)
        took, ticked = time.perf_counter() - t0, ticks - start
        t.cancel()
        return took, ticked

    took, ticked = asyncio.run(run())
    # a blocked loop ticks 0-1 times; a free one ~took/0.005, fewer on a loaded 2-core CI machine
    assert took > 0.1 and ticked >= took / 0.005 / 10, f"{ticked} ticks in {took:.2f} s"


def test_trim_to_fit_is_exact_with_a_template_that_is_not_additive():
    """Per-turn costs are estimates; the kept conversation is checked with one exact count."""

    def count(msgs):  # 30 tokens once per prompt, and turns cost more together than apart
        return 30 + sum(len(m["content"].split()) for m in msgs) + len(msgs) ** 2

    msgs = conversation_of(20, words=10)
    kept, dropped, tokens = conversation.trim_to_fit(msgs, lambda chats: [count(c) for c in chats], 400)
    assert tokens == count(kept) <= 400 and kept[-1]["content"] == "and now?" and dropped == len(msgs) - len(kept)
    assert count(kept[:1] + msgs[len(msgs) - len(kept) - 2 :]) > 400


def test_long_message_with_the_default_system_prompt_is_refused_in_the_app(launched):
    url, (text, _), _ = launched
    text.info.session_len = 200
    c = Client(url, verbose=False)
    question = [{"role": "user", "content": [{"type": "text", "text": "word " * 400}]}]
    with pytest.raises(Exception, match="too long"):
        c.predict(question, "You are InternLM, a helpful assistant.", 0.7, 0.8, 40, 64, 1.0, 0, api_name="/chat")
    assert not text.calls, "the message reached the engine"


def test_a_chats_next_turn_is_not_counted_again_when_the_engines_last_count_says_it_fits():
    """The engine reports how many tokens each prompt had (lmdeploy's input_token_len, on the stats line). A chat's
    next turn is that prompt, then the reply and the new question: when their bytes fit beside it, the chat fits,
    and the engine process is not asked to count it all again, also after a reload. At 16 users with 6,000-token
    chats that count was about 20 ms of each turn's wait before the engine was asked (bench_app --timeline, H100;
    issue 14). A chat that continues no counted prompt (an earlier message edited, another system prompt) is counted
    as before."""
    from types import SimpleNamespace

    from model_loader.engines.slot import EngineSlot
    from ui.prompt_sizes import PromptSizes

    eng = CountingEngine(delay_s=0.0, session_len=4096)
    slot = EngineSlot("text", "ready", "Ready", engine=eng)
    replies, request = streaming.Replies(), SimpleNamespace(session_hash="s1")
    sizes = PromptSizes()

    def turn(history: list[dict], system: str = "You are helpful.") -> list[dict]:
        return last_update(slot, history, system, request, replies, sizes)[0]

    chat = [{"role": m["role"], "content": m["content"]} for m in conversation_of(20)[1:]]  # the page's chat
    assert conversation.token_upper_bound(chat) > 4096 - 64  # too many bytes to fit without a count
    sent = len(chat) + 1  # with the system prompt
    chat = turn(chat)
    assert eng.counted == [sent], eng.counted  # the first turn: counted once, as a whole
    eng.counted.clear()
    chat = turn(chat + [{"role": "user", "content": "and then?"}])
    assert eng.counted == [], eng.counted  # continues what the engine counted: no count
    assert chat[-1]["content"].startswith("You said: and then?")
    request = SimpleNamespace(session_hash="s2")  # the page reloaded: the chat comes back from the browser
    chat = turn(chat + [{"role": "user", "content": "still there?"}])
    assert eng.counted == [], eng.counted
    edited = [dict(m) for m in chat] + [{"role": "user", "content": "one more"}]
    edited[0]["content"] = "question 0 changed " + "w " * 50
    turn(edited)
    assert eng.counted == [len(edited) + 1], eng.counted  # not what was counted: counted again (with the system)
    eng.counted.clear()
    turn(chat + [{"role": "user", "content": "and then?"}], system="Be brief.")
    assert eng.counted, "another system prompt: counted again"


def test_prompt_sizes_keep_the_newest_prompts_and_skip_what_they_cannot_digest():
    from ui.prompt_sizes import PromptSizes

    sizes = PromptSizes(prompts=2)
    chats = [[{"role": "user", "content": f"chat {i}"}] for i in range(3)]
    for i, chat in enumerate(chats):
        sizes.remember(chat, 10 + i)
    assert sizes.upper_bound(chats[0]) is None  # the oldest went first
    assert sizes.upper_bound(chats[2]) == 12 + conversation.token_upper_bound([])
    more = chats[1] + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
    assert sizes.upper_bound(more) == 11 + conversation.token_upper_bound(more[1:])
    with_image = [{"role": "user", "content": [{"type": "image", "image": object()}]}]
    sizes.remember(with_image, 600)  # not written by orjson: not kept, no error
    assert sizes.upper_bound(with_image) is None and sizes.upper_bound(chats[2] + with_image) == 12 + 576 + 8 + 16


def test_a_continued_chat_that_may_not_fit_is_still_counted_and_trimmed():
    """What the engine counted says nothing about a long new question: the remembered size plus its bytes are over
    the window, so the chat is counted and its oldest turns dropped as before (review)."""
    from types import SimpleNamespace

    from model_loader.engines.slot import EngineSlot
    from ui.prompt_sizes import PromptSizes

    eng = CountingEngine(delay_s=0.0, session_len=4096)
    slot = EngineSlot("text", "ready", "Ready", engine=eng)
    replies, request, sizes = streaming.Replies(), SimpleNamespace(session_hash="s1"), PromptSizes()

    def turn(history: list[dict]) -> tuple[list[dict], str]:
        return last_update(slot, history, "", request, replies, sizes)

    chat, _ = turn([{"role": m["role"], "content": m["content"]} for m in conversation_of(20, system="")])
    eng.counted.clear()
    _, line = turn(chat + [{"role": "user", "content": "w " * 3000}])
    assert eng.counted, "not counted"
    sent = eng.calls[-1][1]
    assert eng.count_tokens(sent) <= 4096 - 64 and len(sent) < len(chat) + 1
    assert "no longer fit" in line


def test_an_engine_that_only_estimates_its_counts_is_counted_every_turn():
    """The api_server's count_tokens is an estimate (its tokenizer lives on the server) and its window a guess: its
    chats keep being judged by the estimate, not by the sizes the server reported (review)."""
    import dataclasses
    from types import SimpleNamespace

    from model_loader.engines.slot import EngineSlot
    from ui.prompt_sizes import PromptSizes

    eng = CountingEngine(delay_s=0.0, session_len=4096)
    eng.info = dataclasses.replace(eng.info, exact_counts=False)
    slot = EngineSlot("text", "ready", "Ready", engine=eng)
    replies, request, sizes = streaming.Replies(), SimpleNamespace(session_hash="s1"), PromptSizes()

    chat, _ = last_update(slot, conversation_of(20, system=""), "", request, replies, sizes)
    eng.counted.clear()
    last_update(slot, chat + [{"role": "user", "content": "and then?"}], "", request, replies, sizes)
    assert eng.counted, "an estimating engine's chat went uncounted"


def test_the_chat_tab_remembers_what_the_engine_counted(tmp_path, monkeypatch):
    """The page's own Enter path passes its prompt sizes on: a returning page's second turn of a long chat is not
    counted again (review: nothing else checks the wiring)."""
    from bench.pages import text_history, users_on_pages
    from tests.conftest import TEST_LAUNCH, fake_startup
    from ui.page import build_demo, launch_kwargs

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    eng = CountingEngine(delay_s=0.0, session_len=2048)
    st = fake_startup(eng, FakeEngine("vision"), host="127.0.0.1")
    demo, i18n = build_demo(st.slots, st.cfg, st.system_info)
    _, url, _ = demo.launch(**{**launch_kwargs(st.cfg, i18n), **TEST_LAUNCH})
    try:
        history = text_history(conversation_of(15, system="")[:-1])  # more bytes than the window has tokens
        turns, _, _ = asyncio.run(users_on_pages(url, 1, 2, 16, histories=[history]))
        assert not any(t["error"] for t in turns) and len(turns) == 2
        whole = [n for n in eng.counted if n > 2]  # the page's own checks count the new message alone
        assert len(whole) == 1, eng.counted  # the first turn only
    finally:
        demo.close()


def test_a_message_that_leaves_no_room_for_earlier_ones_says_so():
    """'The 6 oldest messages no longer fit' read as if some were kept, when every earlier message was left out
    (new-user trial: four 2,500-word messages with Max new tokens at 4096)."""
    eng = FakeEngine(session_len=8192)
    msgs = conversation_of(3, words=2500, system="")
    msgs[-1]["content"] = "w " * 2500
    kept, note = asyncio.run(fit(eng, msgs, 8192, max_new=4096))
    assert kept == msgs[-1:]
    assert note.startswith("Only this message fits the 8,192-token window"), note
    assert "the 6 earlier messages were left out" in note
    kept, note = asyncio.run(fit(eng, conversation_of(3, words=2500, system="Be brief."), 8192, max_new=2048))
    assert len(kept) == 4 and note.startswith("The 4 oldest messages no longer fit"), note


def test_the_trimming_note_counts_one_message_in_the_singular():
    eng = FakeEngine(session_len=8192)
    msgs = [{"role": "assistant", "content": "w " * 3000}, {"role": "user", "content": "w " * 3000}]
    kept, note = asyncio.run(fit(eng, msgs, 8192, max_new=4096))
    assert kept == msgs[-1:] and "the earlier message was left out" in note, note
