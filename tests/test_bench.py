"""The GPU benches' pure parts on CPU: workloads, summaries, TurboMind's block report, and the browser-like client
against the launched app (fake engines)."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.runs import percentile
from bench.workload import blocks_from_log, history_of, match_blocks, spread, summarize
from ui.page import SETTLED_TICK_S

# what lmdeploy 0.11.1 TurboMind logs at TM_LOG_LEVEL=INFO (src/turbomind/models/llama/BlockManager.cc, LlamaBatch.cc)
TM_LOG = """
[TM][INFO] [BlockManager] block_size = 16.500 MB
[TM][INFO] [BlockManager] max_block_count = 182
[TM][INFO] [BlockManager] chunk_size = 182
[TM][WARNING] [SegMgr] prefix caching is disabled
[TM][INFO] [BlockManager] block_size = 3.094 MB
[TM][INFO] [BlockManager] max_block_count = 342
[TM][INFO] [BlockManager] chunk_size = 342
"""


def test_blocks_from_turbomind_log_pair_with_the_plan_by_block_size():
    reported = blocks_from_log(TM_LOG)
    assert reported == [{"block_mib": 16.5, "blocks": 182}, {"block_mib": 3.094, "blocks": 342}]
    planned = {"text": {"blocks": 337, "block_mib": 3.094}, "vision": {"blocks": 182, "block_mib": 16.5}}
    m = match_blocks(reported, planned)
    assert m["vision"]["turbomind_blocks"] == 182 and m["vision"]["error_pct"] == 0
    assert m["text"]["turbomind_blocks"] == 342 and m["text"]["error_pct"] == pytest.approx(-1.46, abs=0.01)
    assert match_blocks([], planned)["text"]["turbomind_blocks"] is None


def test_history_reaches_its_length_and_users_share_no_prefix():
    def count(messages):
        return sum(len(m["content"].split()) + 4 for m in messages)

    a, b = history_of(0, 1000, count), history_of(1, 1000, count)
    assert count(a) >= 1000 and a[-1]["role"] == "assistant" and a[0]["role"] == "user"
    assert a[0]["content"].split("]")[0] != b[0]["content"].split("]")[0]


def test_summary_median_p90_and_errors():
    turns = [{"first_ms": float(i), "tokens": 10, "error": ""} for i in range(1, 11)]
    turns.append({"first_ms": None, "tokens": 0, "error": "boom"})
    s = summarize(turns, 2.0)
    assert s["tok_s"] == 50.0 and s["first_ms_median"] == 5.5 and s["first_ms_p90"] == pytest.approx(9.1)
    assert s["errors"] == 1 and s["first_errors"] == ["boom"]
    assert percentile([], 50) is None
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 3}


def test_a_browser_turn_runs_on_its_page_session(launched):
    """Page load, then turns on the same session hash: what a returning user does (bench_app, a10_capacity)."""
    from bench.pages import users_on_pages

    url, (text, _), _ = launched
    turns, wall, loads = asyncio.run(users_on_pages(url, 2, 2, 16))
    assert len(turns) == 4 and not any(t["error"] for t in turns) and wall > 0
    assert len(loads["page_load_ms"]) == 2
    sessions = {sid for sid, _, _ in text.calls}
    assert len(sessions) == 2  # one engine session per page, kept across its turns
    second_turn = [msgs for _, msgs, _ in text.calls if len(msgs) > 1]
    assert second_turn and second_turn[0][-2]["role"] == "assistant"


def test_the_timeline_splits_each_turns_wait_into_steps_in_order(launched, monkeypatch, tmp_path):
    """bench_app --timeline: the app's marks joined with the client's by event id, turn by turn; each turn's marks
    come in the order of the steps, and their means add up to the mean wait from Enter to the first text."""
    from bench.pages import users_on_pages
    from bench.timeline import SEGMENTS, TAIL, events_for, joined, record_timeline, segments
    from tests.fakes import FakeEngine

    url, _, _ = launched
    record_timeline(tmp_path / "t.jsonl", (FakeEngine,), monkeypatch.setattr)
    turns, _, _ = asyncio.run(users_on_pages(url, 2, 2, 16))
    rows = joined(turns, events_for(tmp_path / "t.jsonl", turns))
    assert len(rows) == 4 and len({r["session"] for r in rows}) == 2 and len({r["event_id"] for r in rows}) == 4
    for r in rows:
        steps = [r[b] - r[a] for _, a, b in SEGMENTS]
        assert all(s >= -0.002 for s in steps), steps  # marks in order (clocks of one machine)
    s = segments(rows)
    assert s["turns"] == 4 and all(s[name] is not None for name, _, _ in SEGMENTS)
    assert all(s[name] is not None and s[name] >= -2 for name, _, _ in TAIL)  # the reply's end, after its first text
    assert sum(s[name] for name, _, _ in SEGMENTS) == pytest.approx(s["first text (mean)"], abs=0.5)


def test_users_in_browsers_of_their_own_start_together_and_keep_their_conversations(launched):
    """bench_app spreads users over measuring processes (a person has a browser of their own): each user keeps a
    conversation of their own across turns, all start once every page is loaded, and the wall spans them all."""
    from bench.pages import users_in_browsers

    url, (text, _), _ = launched
    turns, wall, loads = users_in_browsers(url, 4, 2, 16, per_process=2)
    assert len(turns) == 8 and not any(t["error"] for t in turns) and len(loads["page_load_ms"]) == 4
    assert len({t["session"] for t in turns}) == 4
    asked = sorted(m[-1]["content"].split(",")[0] for _, m, _ in text.calls[-8:])
    assert asked == sorted(f"User {u}" for u in range(4) for _ in range(2))  # numbered across processes
    starts = [t["wall_t0"] for t in turns if t["turn"] == 0]
    assert max(starts) - min(starts) < 0.5 * wall and loads["wall_end"] - loads["wall_start"] == pytest.approx(wall)


def test_a_measuring_process_that_fails_ends_the_run_instead_of_hanging_it(launched):
    """users_in_browsers: one user's process failing (here a history that cannot be sent) must end the run with its
    error; the others waited for it at the start, and the idle pages for the end, forever (review)."""
    from bench.pages import users_in_browsers

    url, _, _ = launched
    t0 = time.monotonic()
    with pytest.raises(TypeError, match="JSON serializable"):
        users_in_browsers(url, 2, 1, 16, per_process=1, idle_pages=1, histories=[[{1}], [{2}]])
    assert time.monotonic() - t0 < 60


def test_idle_pages_stay_open_in_a_browser_of_their_own_while_users_chat(launched):
    """The idle-page case: the idle pages are other people's browsers, open (and loaded) through the users' turns,
    in a process of their own so that their timers do not delay the measured users' requests."""
    from bench.pages import users_in_browsers

    url, _, _ = launched
    turns, wall, loads = users_in_browsers(url, 2, 2, 16, per_process=0, idle_pages=3)
    assert len(turns) == 4 and not any(t["error"] for t in turns) and wall > 0
    assert loads["idle_pages"] == 3 and len(loads["page_load_ms"]) == 2
    assert loads["idle_ticks"] <= 3 * (1 + int(wall // SETTLED_TICK_S))  # settled pages watch the engines slowly


def test_a_bench_page_runs_its_timers_as_a_browser_does(launched):
    """A timer first fires one period after the page opens, at the period the page's events last gave it: once the
    engines have settled, the status timer ticks every SETTLED_TICK_S (it watches the engine process), not every 1 s
    from the start."""
    import httpx

    from bench.pages import Page

    url, _, _ = launched

    async def one_page() -> tuple[dict, int]:
        async with httpx.AsyncClient(timeout=60) as http:
            page = Page(http, url, (await http.get(url + "config")).json())
            await page.load()
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(2.5, stop.set)
            return page.timers, await page.poll(stop)

    timers, ticks = asyncio.run(one_page())
    assert [t["every"] for t in timers.values() if t["active"]] == [SETTLED_TICK_S] and ticks == 0


def test_with_the_engines_in_this_process_a_settled_page_stops_its_timer(tmp_path, monkeypatch):
    """--no-engine-process (and the api_server backend): nothing can bring an engine back, so once both have
    settled an open page asks nothing more (issue 14: idle pages)."""
    import httpx

    from bench.pages import Page
    from tests.conftest import fake_startup
    from tests.fakes import FakeEngine
    from ui.page import build_demo, launch_kwargs

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    st = fake_startup(FakeEngine("text"), FakeEngine("vision"), host="127.0.0.1", engine_process=False)
    demo, i18n = build_demo(st.slots, st.cfg, st.system_info)
    _, url, _ = demo.launch(**{**launch_kwargs(st.cfg, i18n), "server_port": None, "prevent_thread_lock": True})

    async def one_page() -> dict:
        async with httpx.AsyncClient(timeout=60) as http:
            page = Page(http, url, (await http.get(url + "config")).json())
            await page.load()
            return page.timers

    try:
        assert not any(t["active"] for t in asyncio.run(one_page()).values())
    finally:
        demo.close()


def test_open_pages_cost_the_server_little_once_the_engines_are_ready(launched):
    """An open page runs its 1 s timer only while there is news (engines starting) or the System tab is shown;
    once the engines have settled it only watches the engine process, every SETTLED_TICK_S: 100 idle pages must not
    take throughput from the people chatting (issue 14)."""
    from bench.pages import users_on_pages

    url, (text, _), _ = launched
    turns, wall, loads = asyncio.run(users_on_pages(url, 1, 12, 64, idle_pages=5))
    assert wall > 1.5 and not any(t["error"] for t in turns)  # long enough for a 1 s timer to tick
    assert loads["idle_ticks"] <= 5 * (1 + int(wall // SETTLED_TICK_S))


def test_long_conversations_are_the_same_for_the_app_and_the_raw_engine(tiny_models):
    """The long-conversation case: the model's own tokenizer sizes every user's history, the same text on both
    sides of the comparison, and no two users share a prefix."""
    from bench.workload import history_of, token_counter

    count = token_counter(str(tiny_models["awq"]))
    a, b = history_of(3, 6000, count), history_of(3, 6000, count)
    assert a == b and 6000 <= count(a) < 7000 and a[-1]["role"] == "assistant"
    assert history_of(4, 6000, count)[0] != a[0]


def test_users_through_the_seam_hold_their_conversations():
    """The seam driver the GPU benches use, on the fake engine: every turn answered, history carried over."""
    from bench.workload import seam_users
    from tests.fakes import FakeEngine

    eng = FakeEngine(delay_s=0.0)
    r = asyncio.run(seam_users(eng, users=3, history_tokens=200, turns=2, new_tokens=16, timeout_s=30))
    assert r["turns"] == 6 and r["errors"] == 0 and r["tokens"] > 0 and r["first_ms_median"] is not None
    assert r["prompt_tokens_turn1"] >= 200
    last = [msgs for _, msgs, _ in eng.calls][-1]
    assert last[-2]["role"] == "assistant" and "turn 1" in last[-1]["content"]


def _run(tok_s: float, first: float) -> dict:
    return {"tok_s": tok_s, "first_ms_median": first, "client_minus_engine_ms": 5.0, "errors": 0}


def test_bench_app_report_gives_median_range_and_ratio(tmp_path, monkeypatch):
    from bench import bench_app

    monkeypatch.setattr(bench_app, "OUT", tmp_path)
    results = {
        "gpu": "test GPU",
        "args": {"turns": 3, "new_tokens": 256, "runs": 3, "burst": 32},
        "app": {"8": [_run(900, 40), _run(1000, 50), _run(1100, 60)]},
        "raw": {"runs": {"8": [_run(1000, 10), _run(1000, 10), _run(1200, 12)]}},
        "burst": [{"first_ms_median": 200.0, "page_load_ms_median": 80.0}],
    }
    table = bench_app.write_report(results)
    assert "| 8 | 1,000 (1,000–1,200) | 1,000 (900–1,100) | 1.00 | 50 (40–60) |" in table
    assert "32 brand-new visitors" in table and "200 ms" in table
    assert (tmp_path / "bench.md").read_text() == table and (tmp_path / "bench.png").is_file()


def test_a10_capacity_report_tables_and_chart(tmp_path, monkeypatch):
    from bench import a10_capacity

    monkeypatch.setattr(a10_capacity, "OUT", tmp_path)
    a = a10_capacity.parse_args(["--kv", "int8", "--users", "1,8"])
    run = {"history": 1024, "users": 8, "tok_s": 2000.0, "first_ms_median": 200.0, "first_ms_p90": 400.0}
    r = {
        "kv": "int8",
        "plan": {"engines": {"text": {"tokens": 21888, "blocks": 342, "block_mib": 3.094, "conversations": {"4k": 5}}}},
        "runs": [{**run, "users": 1}, run, {"history": 1024, "users": 16, "skipped": "time budget"}],
        "metrics": {"text": {"total_blocks": 342}},
    }
    r["runs"] = [{**x, "first_ms_max": 500.0, "errors": 0} if "tok_s" in x else x for x in r["runs"]]
    a10_capacity.compare_blocks(r, TEST_LOG_TEXT_ONLY)
    assert r["blocks"]["text"]["turbomind_blocks"] == 342 and r["blocks"]["text"]["metrics_total_blocks"] == 342
    a10_capacity.report([r], a, "test GPU", {"free_gib": 22.5})
    md = (tmp_path / "a10_capacity.md").read_text()
    assert "| int8 | 1024 | 8 | 2,000 | 200.0 ms | 400.0 ms | 500.0 ms | 0 | 5 |" in md
    assert "time budget" in md and "| int8 | text | 342 (21,888) | 342 | 0.0% |" in md
    assert (tmp_path / "a10_capacity.png").is_file()
    child = a10_capacity.child_args(a)
    assert child[child.index("--users") + 1] == "1,8" and "--child" not in child


TEST_LOG_TEXT_ONLY = "[TM][INFO] [BlockManager] block_size = 3.094 MB\n[TM][INFO] [BlockManager] max_block_count = 342\n"


def test_a10_capacity_defaults_to_the_apps_settings():
    """With no flags the A10 bench measures what the app runs: the text KV setting "auto" (resolved by the same
    plan), LLaVA's int8 and each engine's KV ratio; the app mode passes the same settings as flags."""
    from bench import a10_capacity
    from model_loader.config import AppConfig, from_args

    d = AppConfig()
    a = a10_capacity.parse_args([])
    assert a.kv_list == [d.text_kv_quant] == ["auto"]
    cfg = a10_capacity.app_config(a, "auto")
    assert (cfg.text_kv_quant, cfg.vision_kv_quant, cfg.kv_ratio, cfg.text_kv_ratio) == (
        d.text_kv_quant,
        d.vision_kv_quant,
        d.kv_ratio,
        d.text_kv_ratio,
    )
    parent = a10_capacity.parse_args(["--kv", "auto,int8", "--vision-kv", "int4", "--text-kv-ratio", "0.6"])
    child = a10_capacity.parse_args([*a10_capacity.child_args(parent), "--child", "int8"])
    cfg = a10_capacity.app_config(child, "int8")
    assert (cfg.text_kv_quant, cfg.vision_kv_quant, cfg.kv_ratio, cfg.text_kv_ratio) == ("int8", "int4", 0.4, 0.6)
    flags, _ = from_args(a10_capacity.app_flags(child, "int8"), {})
    assert flags == cfg and cfg.engine_process == d.engine_process
    parent = a10_capacity.parse_args(["--via", "app", "--no-engine-process"])
    child = a10_capacity.parse_args([*a10_capacity.child_args(parent), "--child", "auto"])
    assert not from_args(a10_capacity.app_flags(child, "auto"), {})[0].engine_process
    seam = a10_capacity.parse_args(["--child", "auto"])  # the seam mode drives the engine in its own process
    assert a10_capacity.app_config(seam, "auto").engines_in_child and not a10_capacity.seam_config(seam, "auto").engines_in_child


def test_a10_capacity_report_names_what_auto_resolved_to(tmp_path, monkeypatch):
    from bench import a10_capacity

    monkeypatch.setattr(a10_capacity, "OUT", tmp_path)
    a = a10_capacity.parse_args(["--users", "16"])
    run = {"history": 3072, "users": 16, "tok_s": 2000.0, "first_ms_median": 500.0, "first_ms_p90": 700.0}
    text = {"tokens": 68224, "blocks": 1066, "block_mib": 1.594, "kv_quant": "int4", "conversations": {"4k": 16}}
    r = {"kv": "auto", "plan": {"engines": {"text": text}}, "runs": [{**run, "first_ms_max": 900.0, "errors": 0}]}
    a10_capacity.report([r], a, "test GPU", {"free_gib": 22.5})
    md = (tmp_path / "a10_capacity.md").read_text()
    assert "| auto -> int4 | 3072 | 16 | 2,000 | 500.0 ms |" in md
    assert "KV ratio 0.4 (LLaVA) and 0.7 (text)" in md


def test_raw_references_build_the_app_s_text_engine_config(monkeypatch, tmp_path):
    """bench/raw_reference.py and bench_app's api_server get the engine config the app builds on this GPU: the text
    engine's ratio, and "auto" resolved by the same plan (int4 on an A10's 22.5 GiB, int8 on 80 GB)."""
    from bench import runs
    from model_loader.config import AppConfig
    from model_loader.engines.lmdeploy_config import turbomind_config
    from model_loader.memory.gpu import GpuMemory

    monkeypatch.setattr(runs, "TEXT", tmp_path / "absent-text")
    monkeypatch.setattr(runs, "VISION", tmp_path / "absent-vision")
    for gib, policy in ((22.5, 4), (80, 8)):
        monkeypatch.setattr(runs, "gpu_memory", lambda g=gib: GpuMemory("GPU", g * 1024, 0.0, g * 1024))
        e = turbomind_config(runs.as_the_app_builds(AppConfig()), "text", awq=True)
        assert (e.quant_policy, e.cache_max_entry_count) == (policy, AppConfig().text_kv_ratio)


def test_a_turn_rebuilds_no_component(launched, monkeypatch):
    """Gradio 6 rebuilds a component for every gr.skip()/gr.update() output of every streamed update (~0.5 ms each,
    on the interpreter the engine shares): at 32 users that cost more than the chat itself (issue 14; a CPU profile
    of 8 users put a third of the server's time there when a turn kept two outputs aside that way). A turn streams
    values only: the box is emptied in the page, and the saved conversation passes through unchanged until the end."""
    import gradio.blocks

    from bench.pages import users_on_pages

    url, (text, _), _ = launched
    text.reply_for = lambda messages: " ".join(["word"] * 120)
    text.delay_s = 0.01
    rebuilt = []
    real = gradio.blocks.postprocess_update_dict
    monkeypatch.setattr(
        gradio.blocks, "postprocess_update_dict", lambda **kw: rebuilt.append(type(kw["block"]).__name__) or real(**kw)
    )
    turns, _, _ = asyncio.run(users_on_pages(url, 1, 2, 256))
    assert all(t["updates"] >= 10 and not t["error"] for t in turns), turns
    page_load = {"Button", "Timer"}  # the load event turns Send on and the status timer off: once per page
    assert not [name for name in rebuilt if name not in page_load], (rebuilt, [t["updates"] for t in turns])


def long_chat(text) -> list[dict]:
    """20 turns of history (about 3,200 words), and 120-word replies from the fake text engine."""
    text.reply_for = lambda messages: " ".join(["word"] * 120)
    text.delay_s = 0.01
    history = []
    for i in range(20):
        history += [
            {"role": "user", "content": [{"type": "text", "text": f"question {i} " * 20}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"answer {i} " * 60}]},
        ]
    return history


def test_a_streamed_update_costs_the_same_however_long_the_conversation(launched, monkeypatch):
    """Gradio's Chatbot.postprocess deep-copies every message and builds a model for it, at every streamed update:
    with 20 turns of history a turn's cost grew with each turn (issue 14's long conversations). A turn now renders
    the messages it did not change once, not at every update."""
    import gradio as gr

    from bench.pages import users_on_pages

    url, (text, _), _ = launched
    history = long_chat(text)
    rendered = []
    real = gr.Chatbot._postprocess
    monkeypatch.setattr(gr.Chatbot, "_postprocess", lambda self, m: rendered.append(1) or real(self, m))
    turns, _, _ = asyncio.run(users_on_pages(url, 1, 1, 256, histories=[history]))
    assert turns[0]["updates"] >= 10 and not turns[0]["error"], turns
    # each message of the history once, the new question and the growing answer at each update
    assert len(rendered) <= len(history) + 3 * turns[0]["updates"], (len(rendered), turns[0]["updates"])


def test_gradio_walks_only_the_growing_message_of_a_long_chat_at_each_update(launched, monkeypatch):
    """Gradio walked the whole chat twice per streamed update, copying every message as it looked for files (to
    move them to its cache and to put its root URL in front of them): with 20 turns of history each update cost
    more than in a new chat. The unchanged messages now go out as JSON written once, which the walks pass over."""
    from gradio_client import utils as client_utils

    from bench.pages import users_on_pages

    url, (text, _), _ = launched
    history = long_chat(text)
    dicts = []  # each dict the two walks look into (and copy)
    real = client_utils.is_file_obj_with_meta  # both walks ask it of every dict they visit
    monkeypatch.setattr(client_utils, "is_file_obj_with_meta", lambda d: dicts.append(isinstance(d, dict)) or real(d))
    turns, _, _ = asyncio.run(users_on_pages(url, 1, 2, 256, histories=[history]))
    updates = sum(t["updates"] for t in turns)
    assert turns[0]["updates"] >= 10 and not any(t["error"] for t in turns), turns
    # the whole history a few times per turn (the chat the page sends, and the conversation saved in the browser at
    # the turn's first and last update), then the growing message at each update: 2,369 here, 11,769 before
    assert sum(dicts) <= 30 * len(history) * len(turns) + 10 * updates, (sum(dicts), updates)
    # the second turn sends the chat as the page put it together from the first turn's updates
    _, sent, _ = text.calls[-1]
    assert [m["content"] for m in sent[0:40:20]] == ["question 0 " * 20, "question 10 " * 20]
    assert sent[-2] == {"role": "assistant", "content": " ".join(["word"] * 120)}


def test_a_long_chats_next_turn_renders_checks_and_saves_only_what_is_new(launched, monkeypatch):
    """Each turn of a 20-turn chat rendered every earlier message again at its first update, validated the chat a
    second time after Gradio had, and wrote the conversation to save in the browser as plain dicts twice (which
    Gradio's walks then copied): the page's process did about twice a new chat's work per turn, one turn after
    another, and a long chat's first text came later (issue 14: 116 ms of the app's against 68 in the plain case,
    H100). What the previous turn rendered is kept, the chat is validated once, and the saved conversation goes out
    as JSON written once."""
    import gradio as gr
    from gradio_client import utils as client_utils

    import ui.chatbot
    from bench.pages import users_on_pages

    url, (text, _), _ = launched
    history = long_chat(text)
    rendered, validated, dicts = [], [], []
    real_render, real_validate = gr.Chatbot._postprocess, ui.chatbot.Messages.model_validate
    monkeypatch.setattr(gr.Chatbot, "_postprocess", lambda self, m: rendered.append(1) or real_render(self, m))
    monkeypatch.setattr(ui.chatbot.Messages, "model_validate", lambda *a, **kw: validated.append(1) or real_validate(*a, **kw))
    real_walk = client_utils.is_file_obj_with_meta
    monkeypatch.setattr(client_utils, "is_file_obj_with_meta", lambda d: dicts.append(isinstance(d, dict)) or real_walk(d))

    async def loaded():  # count the turns' work, not the page load's
        rendered.clear(), validated.clear(), dicts.clear()

    turns, _, _ = asyncio.run(users_on_pages(url, 1, 3, 256, histories=[history], ready=loaded))
    assert len(turns) == 3 and not any(t["error"] for t in turns), turns
    updates = sum(t["updates"] for t in turns)
    # the history once (the first turn), then what changed: each turn's question and last answer (as the page sent
    # it back), and the growing answer at each update (207 renders here before, for 84 updates)
    assert len(rendered) <= len(history) + updates + 4 * len(turns), (len(rendered), updates)
    assert len(validated) <= len(turns), len(validated)  # Gradio's own check of the chat the page sent
    # the chat the page sends is walked once per turn as Gradio receives it; then the growing message at each update
    # (1,810 dicts here before, for 84 updates)
    assert sum(dicts) <= 3 * (len(history) + 4) * len(turns) + 6 * updates, (sum(dicts), updates)
    _, sent, _ = text.calls[-1]
    assert [m["content"] for m in sent[0:40:20]] == ["question 0 " * 20, "question 10 " * 20]


def test_a_turn_waits_on_no_worker_thread_before_its_message_shows(launched, monkeypatch):
    """Gradio preprocesses each input of an event in a worker thread, one after the other; under load each hop
    waits for the busy event loop: a turn's ten inputs took 64-84 ms at 32 users on an H100 before its message was
    shown and the engine asked (bench_app --timeline, issue 14). A turn converts its inputs in line."""
    import anyio.to_thread
    import gradio as gr

    from bench.pages import users_on_pages

    url, (text, _), _ = launched
    hops = []
    real = anyio.to_thread.run_sync
    monkeypatch.setattr(anyio.to_thread, "run_sync", lambda fn, *a, **kw: hops.append(fn) or real(fn, *a, **kw))
    turns, _, _ = asyncio.run(users_on_pages(url, 1, 2, 32))
    assert len(turns) == 2 and not any(t["error"] for t in turns), turns
    second = [m for _, m, _ in text.calls][-1]
    assert second[-1]["content"].startswith("User 0, turn 1") and second[-2]["role"] == "assistant"
    turn_inputs = (gr.Chatbot, gr.Textbox, gr.Slider, gr.Number)  # the page load reads the saved chat (BrowserState)
    preprocess = [fn for fn in hops if getattr(fn, "__name__", "") == "preprocess"]
    assert not [fn for fn in preprocess if isinstance(fn.__self__, turn_inputs)], preprocess


def test_the_page_is_served_on_uvloop_and_httptools(launched):
    """The page's event loop shares the interpreter with the engine's thread, so the loop's own overhead is the
    users' wait (issue 14): the deployment set brings uvloop and httptools, which uvicorn takes when present."""
    from pathlib import Path

    from bench.pages import users_on_pages

    url, (text, _), _ = launched
    loops = []
    real = text.reply_for
    text.reply_for = lambda messages: loops.append(type(asyncio.get_running_loop()).__module__) or real(messages)
    turns, _, _ = asyncio.run(users_on_pages(url, 1, 1, 16))
    assert not turns[0]["error"] and loops == ["uvloop"]
    wanted = Path(__file__).resolve().parents[1].joinpath("requirements.txt").read_text()
    assert "\nuvloop" in wanted and "\nhttptools" in wanted
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: F401  (uvicorn's "auto" takes it)


def test_the_queue_does_not_tabulate_every_past_event_after_each_one(launched, monkeypatch):
    """Gradio 6.17's queue built a pandas table of every event the server had ever run, at the end of each event,
    holding the interpreter (~3 ms at first, 50 ms at 50,000 events): the app slowed down with its uptime."""
    from gradio.queueing import Queue

    from bench.pages import users_on_pages

    url, _, _ = launched
    tables = []
    real = Queue._get_df
    monkeypatch.setattr(Queue, "_get_df", staticmethod(lambda events: tables.append(len(events)) or real(events)))
    turns, _, _ = asyncio.run(users_on_pages(url, 2, 2, 16))
    assert len(turns) == 4 and not any(t["error"] for t in turns)
    assert tables == []


def test_the_queue_keeps_the_latest_events_and_still_summarises_them(launched):
    """What keep_queue_analytics_small leaves of Gradio's View API figures: the last N events, summarised every M,
    on the running app's own queue; and a row dropped while its event still runs must not stop the queue (review:
    Gradio writes to it without looking, and a KeyError there ended every user's events)."""
    from gradio.queueing import Queue

    from bench.pages import users_on_pages
    from ui.queue_analytics import keep_queue_analytics_small

    url, _, st = launched
    queue = st.demo._queue
    assert type(queue.event_analytics).__name__ == "_RecentEvents"  # the app's own queue, after launch
    keep_queue_analytics_small(queue, events=3, every=2)
    turns, _, _ = asyncio.run(users_on_pages(url, 2, 3, 16))
    assert len(turns) == 6 and not any(t["error"] for t in turns)
    assert len(queue.event_analytics) == 3 and queue.cached_event_analytics_summary["functions"]

    offline = Queue.__new__(Queue)  # the analytics part of a queue, to follow its counting exactly
    offline.event_analytics, offline.event_count_at_last_cache, offline.cached_event_analytics_summary = {}, 0, {}
    offline.ANAYLTICS_CACHE_FREQUENCY = 1  # as Gradio sets it
    keep_queue_analytics_small(offline, events=5, every=3)
    summaries = []
    for i in range(20):
        offline.event_analytics[str(i)] = {"time": i, "status": "queued", "process_time": None, "function": "chat"}
        offline.event_analytics[str(max(0, i - 7))]["status"] = "success"  # an event that started long ago ends
        before = offline.event_count_at_last_cache
        offline.compute_analytics_summary(offline.event_analytics)
        if offline.event_count_at_last_cache != before:
            summaries.append(i)
    assert list(offline.event_analytics) == [str(i) for i in range(15, 20)]
    assert summaries == [2, 5, 8, 11, 14, 17]


def test_an_open_page_watches_a_loading_engine_until_it_settles(launched):
    """The page's status timer ticks while an engine is on its way and stops once both are ready or failed: a page
    opened during start-up still sees the engine arrive (issue 14: idle pages; review: a missed transition)."""
    import httpx

    from bench.pages import Page

    url, _, st = launched
    slot = st.slots["vision"]
    slot.state = "loading"

    async def watch() -> tuple[int, int]:
        async with httpx.AsyncClient(timeout=30) as http:
            page = Page(http, url, (await http.get(url + "config")).json())
            await page.load()

            async def poll_for(seconds: float) -> int:
                stop = asyncio.Event()
                asyncio.get_running_loop().call_later(seconds, stop.set)
                return await page.poll(stop)

            while_loading = await poll_for(2.2)
            slot.state = "ready"
            after = await poll_for(2.2)
            return while_loading, after

    while_loading, after = asyncio.run(watch())
    assert while_loading >= 2 and after == 1  # the tick that saw it ready was the last


def test_a_stopped_app_is_waited_for_until_its_engine_process_has_gone(tmp_path):
    """Review: the benches ended the app and went on while its engine process (which exits once the app's pipe
    closes) still held the GPU, so the next measurement could plan on memory that was not free yet."""
    import subprocess
    import sys
    import textwrap

    from bench.runs import _running, stop_app

    (tmp_path / "app.py").write_text(
        textwrap.dedent(
            """
            import multiprocessing as mp, signal, time
            def engines(conn):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                try:
                    conn.recv()
                except EOFError:
                    time.sleep(1.5)  # freeing the GPU takes a while
            if __name__ == "__main__":
                ctx = mp.get_context("spawn")
                mine, theirs = ctx.Pipe()
                p = ctx.Process(target=engines, args=(theirs,))
                p.start()
                print(p.pid, flush=True)
                time.sleep(600)
            """
        )
    )
    app = subprocess.Popen([sys.executable, str(tmp_path / "app.py")], stdout=subprocess.PIPE, text=True)
    child = int(app.stdout.readline())
    stop_app(app)
    assert app.poll() is not None and not _running(child)


def test_a_runs_wall_splits_into_late_starts_and_decode():
    """The critical path of a run: each round's last start and end, and the median decode (bench_app, raw)."""
    turns = [
        {"turn": 0, "start_s": 0.0, "end_s": 1.0, "first_ms": 100.0, "tokens": 1, "error": ""},
        {"turn": 0, "start_s": 0.2, "end_s": 1.3, "first_ms": 100.0, "tokens": 1, "error": ""},
        {"turn": 1, "start_s": 1.0, "end_s": 2.0, "first_ms": 50.0, "tokens": 1, "error": ""},
        {"turn": 1, "start_s": 1.3, "end_s": 2.5, "first_ms": 50.0, "tokens": 1, "error": ""},
    ]
    s = summarize(turns, 2.5)
    assert s["last_start_ms"] == [200.0, 1300.0] and s["last_end_ms"] == [1300.0, 2500.0]
    assert s["decode_ms_median"] == pytest.approx(975.0)
    assert "last_start_ms" not in summarize([{"first_ms": 1.0, "tokens": 1, "error": ""}], 1.0)


def test_every_page_has_a_browser_of_its_own(launched, monkeypatch):
    """Each user, and each idle page, sends through a connection pool of its own with a browser's six connections
    per host, closed when the run ends. One pool shared by every page made httpx scan all of its connections at
    every request: the measuring client then spent ~240 ms of CPU starting 32 turns (CPU, a fake engine), and was
    what held their starts back, not the app."""
    import httpx

    from bench import pages as pages_mod

    url, _, _ = launched
    made = []

    class Browser(httpx.AsyncClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self, kwargs.get("limits")))

    monkeypatch.setattr(pages_mod.httpx, "AsyncClient", Browser)
    turns, _, loads = asyncio.run(pages_mod.users_on_pages(url, 3, 1, 16, idle_pages=2))
    assert len(turns) == 3 and not any(t["error"] for t in turns) and loads["idle_pages"] == 2
    browsers = [(c, limits) for c, limits in made if limits is not None]  # the others fetched the page's config
    assert len(browsers) == 5 and all(c.is_closed for c, _ in browsers)
    assert all(limits.max_connections == 6 and limits.keepalive_expiry < 5 for _, limits in browsers)


def test_a_failed_user_stops_the_idle_pages_before_their_browsers_close(launched, monkeypatch):
    """A user's error ends the run; the idle pages' timers stop first, instead of being left running on closed
    connections (their errors were logged as never retrieved)."""
    from bench import pages as pages_mod

    url, _, _ = launched
    polls = []

    async def poll(self, stop, opened_s_ago=0.0):
        task = asyncio.current_task()
        polls.append(task)
        await stop.wait()
        return 0

    async def turn(self, *args, **kwargs):
        await asyncio.sleep(0.05)
        raise RuntimeError("boom")

    monkeypatch.setattr(pages_mod.Page, "poll", poll)
    monkeypatch.setattr(pages_mod.Page, "turn", turn)

    async def run():
        with pytest.raises(RuntimeError, match="boom"):
            await pages_mod.users_on_pages(url, 2, 1, 16, idle_pages=2)
        return [t.done() for t in polls]

    assert asyncio.run(run()) == [True, True]


def _turn() -> dict:
    return {"first_ms": 10.0, "tokens": 5, "error": "", "engine_ttft_ms": 2.0, "updates": 3, "bytes": 10, "turn": 0}


def test_long_conversations_are_in_the_prefix_cache_before_they_are_timed(monkeypatch):
    """A 20-turn chat's history was the engine's prompt at the chat's previous turn, so a returning user's long chat
    finds it in the prefix cache. bench_app takes the long conversations once, untimed, before the timed runs (as it
    does the plain users), instead of timing the cold pass as its first run (round 10: every first long run was the
    outlier, its engine first token at 330-340 ms against 65-230 ms later)."""
    from bench import bench_app

    calls: list[str] = []

    def fake_browsers(url, users, turns, max_new, per_process=0, **kw):
        calls.append("long" if kw.get("histories") else "idle" if kw.get("idle_pages") else f"plain {users}")
        return [_turn() for _ in range(users * turns)], 1.0, {"idle_ticks": 0, "page_load_ms": []}

    async def fake_pages(url, users, turns, max_new, **kw):
        calls.append(f"warm {users}")
        return [], 1.0, {}

    long_case = {"histories": [[{"role": "user", "content": "x"}]] * 4}
    monkeypatch.setattr(bench_app, "users_in_browsers", fake_browsers)
    monkeypatch.setattr(bench_app, "users_on_pages", fake_pages)
    monkeypatch.setattr(bench_app, "cases", lambda a: {"idle": {"idle_pages": 3}, "long": long_case})
    a = bench_app.parse_args(["--runs", "2", "--users", "8", "--case-users", "4", "--turns", "1"])
    runs = bench_app.app_runs(a)
    assert calls[:2] == ["warm 8", "long"]  # both warmed before the clock runs
    assert calls[2:] == ["plain 8", "idle", "long"] * 2
    assert len(runs["long"]) == 2 and len(runs["idle"]) == 2 and len(runs["8"]) == 2


def test_raw_long_conversations_are_warmed_like_the_apps(monkeypatch):
    """The raw reference warms the same long conversations once before timing them, as bench_app does."""
    import sys

    import lmdeploy

    from bench import raw_reference

    measured: list[tuple[int, int]] = []

    def fake_measure(pipe, gen, users, turns, history_tokens=0):
        measured.append((users, history_tokens))
        return {"tok_s": 1.0}

    class Pipe:
        tokenizer = None

        def close(self):
            pass

    monkeypatch.setattr(lmdeploy, "pipeline", lambda *a, **k: Pipe())
    monkeypatch.setattr(raw_reference, "measure", fake_measure)
    monkeypatch.setattr("model_loader.engines.turbomind.keep_special_ids", lambda tok: None)
    argv = ["raw", "--runs", "2", "--users", "8", "--turns", "1", "--history-tokens", "600", "--history-users", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    raw_reference.main()
    assert measured[:2] == [(8, 0), (4, 600)]  # both warmed before the timed runs
    assert measured[2:] == [(8, 0), (4, 600)] * 2


def test_a_turns_prompt_tokens_are_read_from_the_stats_line_and_summarised():
    """The app's stats line names the prompt's tokens: the bench keeps them per turn, and a run's median, so the app's
    prompts can be compared with the raw engine's (its long chats ran faster than the raw engine's in every round)."""
    from bench.sse_client import chat_result

    line = "256 tokens · 540.2 tokens/s · first token 12 ms · 6123 prompt tokens · stopped at max new tokens"
    call = {"outputs": [None, None, line], "first": 1.0, "end": 2.0, "t0": 0.5, "updates": 3, "error": None}
    assert chat_result(call, stats_output=2)["prompt_tokens"] == 6123
    assert summarize([{**_turn(), "prompt_tokens": n} for n in (10, 30, 20)], 1.0)["prompt_tokens_median"] == 20
    assert "prompt_tokens_median" not in summarize([_turn()], 1.0)


def test_raw_users_start_together_however_long_their_conversations(monkeypatch):
    """The raw reference builds each user's long conversation before its clock starts, as bench_app does before
    its users press Enter. Built inside the timed run, on lmdeploy's loop, the 16 users' 6,000-token histories
    (counted with the tokenizer) held the last first turn back 0.9-1.7 s on the H100 (round 11), so the raw
    engine's long chats read slower than the app's."""
    from lmdeploy import GenerationConfig

    from bench import raw_reference
    from tests.fakes import FakePipe

    def slow_history(user, tokens, count, turn_tokens=250):  # the tokenizer's counting, on the calling thread
        time.sleep(0.05)
        return [{"role": "user", "content": f"user {user} " + "word " * tokens}, {"role": "assistant", "content": "ok"}]

    monkeypatch.setattr(raw_reference, "history_of", slow_history)
    monkeypatch.setattr(raw_reference, "token_counter", lambda path: lambda messages: 0)
    pipe = FakePipe(tokens=4, delay_s=0.001)
    try:
        s = raw_reference.measure(pipe, GenerationConfig(max_new_tokens=4, ignore_eos=True), 4, 1, history_tokens=100)
    finally:
        pipe.close()
    assert s["turns"] == 4 and s["errors"] == 0
    assert s["last_start_ms"][0] < 30  # every user's first turn starts with the clock


def test_bench_app_report_sets_each_case_against_the_plain_users(tmp_path, monkeypatch):
    """The report states the issue's relative figures itself: idle pages as the app's tok/s against the same users
    alone, long conversations as the app's share of the raw engine against the plain case's (both sides run the
    same conversations), and for both, what the app adds to the engine's first token."""
    from bench import bench_app

    monkeypatch.setattr(bench_app, "OUT", tmp_path)
    plain, idle, long = "16", "16 + 100 idle pages", "16, 6,000-token conversations"
    results = {
        "gpu": "test GPU",
        "args": {"turns": 2, "new_tokens": 256, "runs": 1, "burst": 0},
        "app": {plain: [_run(900, 50)], idle: [_run(882, 60)], long: [{**_run(270, 150), "client_minus_engine_ms": 6.0}]},
        "raw": {"runs": {plain: [_run(1000, 10)], long: [_run(300, 100)]}},
    }
    table = bench_app.write_report(results)
    assert f"{idle} against {plain} users alone: app tok/s −2.0 %; app − engine first token 5 vs 5 ms (+0.0 %)." in table
    assert (
        f"{long} against {plain} users' new ones: app / raw 0.90 vs 0.90 (+0.0 %); app − engine first token 6 vs 5 ms (+20.0 %)."
        in table
    )
    del results["raw"]  # the raw reference failed: unknown, not zero
    table = bench_app.write_report(results)
    assert f"{long} against {plain} users' new ones: app / raw ? vs ? (?); app − engine first token 6 vs 5 ms" in table
    results["args"]["case_users"] = 8  # no plain run of the cases' users
    assert "No plain run at 8 users to set the cases against." in bench_app.write_report(results)


def test_a_bench_run_names_the_host_it_ran_on(tmp_path):
    """H100 hosts differ in CPU, where the app spends its time (round 10-11: 0.84-0.94 at 32 users with the same
    code), so each run records the host's CPU model and cores, read from /proc/cpuinfo."""
    from bench.runs import host

    info = tmp_path / "cpuinfo"
    cpu = "model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
    info.write_text(f"processor\t: 0\n{cpu}\nprocessor\t: 1\n{cpu}")
    assert host(info) == {"cpu": "Intel(R) Xeon(R) Platinum 8480+", "cpus": 2}
    assert host(tmp_path / "absent") == {"cpu": None, "cpus": None}
