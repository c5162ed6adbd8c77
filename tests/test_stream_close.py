"""Closing a reply while it waits for a free slot (Stop, a closed tab) closes the engine's stream at once."""

from __future__ import annotations

import asyncio

from ui import streaming


def test_closing_while_waiting_for_a_slot_closes_the_engine_stream(monkeypatch):
    monkeypatch.setattr(streaming, "WAIT_POLL_S", 0.01)
    closed = asyncio.Event()

    async def engine_stream():
        try:
            await asyncio.sleep(60)  # the engine is full: no first token yet
            yield None
        finally:
            closed.set()

    async def run():
        reply = streaming.stream_into([], engine_stream(), active=lambda: 3, capacity=2)
        await anext(reply)  # the empty assistant bubble
        _, line = await anext(reply)
        assert "Waiting for a free slot" in line
        await reply.aclose()  # raised "aclose(): asynchronous generator is already running" before
        await asyncio.wait_for(closed.wait(), 1)

    asyncio.run(run())
