"""The GPU benches' pure parts on CPU: workloads, summaries, TurboMind's block report, and the browser-like client
against the launched app (fake engines)."""

from __future__ import annotations

import asyncio

import pytest

from bench.runs import percentile
from bench.workload import blocks_from_log, history_of, match_blocks, spread, summarize

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
    from bench.sse_client import users_on_pages

    url, (text, _), _ = launched
    turns, wall, loads = asyncio.run(users_on_pages(url, 2, 2, 16))
    assert len(turns) == 4 and not any(t["error"] for t in turns) and wall > 0
    assert len(loads["page_load_ms"]) == 2
    sessions = {sid for sid, _, _ in text.calls}
    assert len(sessions) == 2  # one engine session per page, kept across its turns
    second_turn = [msgs for _, msgs, _ in text.calls if len(msgs) > 1]
    assert second_turn and second_turn[0][-2]["role"] == "assistant"
