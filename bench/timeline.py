"""Where a turn's wait goes, from the client's press of Enter to its first text: wall-clock marks taken in the app
(`record_timeline`, installed by bench.serve with BENCH_TIMELINE=path) joined with the client's own (bench/pages.py).

Marks per queued event, on the app's side: `push` (Gradio's queue got the POST), `process` (the queue started the
event), `shown` (the update showing the user's message went to the SSE stream), `stream` (the engine was asked),
`delta` (the engine's first text reached the page's loop), `sent` (the update with it went to the SSE stream),
`last` (the engine's last word reached the page's loop), `done` (the event ended).
Both processes run on one machine, so `time.time()` is shared.
"""

from __future__ import annotations

import contextvars
import json
import statistics
import time
from pathlib import Path

# the segments of a turn's first-text wait, each from one mark to the next
SEGMENTS = (
    ("client → queue", "t0", "push"),
    ("queue → started", "push", "process"),
    ("started → message shown", "process", "shown"),
    ("message shown → engine asked", "shown", "stream"),
    ("engine asked → first text in the page's loop", "stream", "delta"),
    ("first text → update handed to SSE", "delta", "sent"),
    ("SSE → client", "sent", "first"),
)

TAIL = (("engine asked → last word in the page's loop", "stream", "last"), ("last word → client saw the end", "last", "end"))

_event = contextvars.ContextVar("bench_timeline_event", default=None)


def record_timeline(path: str | Path, engine_classes: tuple[type, ...], patch=setattr) -> None:
    """Mark every queued event's steps (above) and append one JSON line per event to `path` when it ends.

    `engine_classes` are the ChatEngine classes whose `stream` the page's turns may call. The queue runs each event in its own
    task, and the turn's generator runs in that task's context, so a context variable carries the event's record.
    `patch` sets each wrapper in place (a test passes monkeypatch.setattr)."""
    from gradio import queueing  # noqa: PLC0415
    from gradio.server_messages import ProcessGeneratingMessage  # noqa: PLC0415

    from model_loader.engines.seam import Delta  # noqa: PLC0415

    out = Path(path)
    records: dict[str, dict] = {}
    push, process, send = queueing.Queue.push, queueing.Queue.process_events, queueing.Queue.send_message

    async def timed_push(self, body, *args, **kwargs):
        t = time.time()
        result = await push(self, body, *args, **kwargs)
        if result[0]:
            records[result[1]] = {"event_id": result[1], "session": body.session_hash, "fn": body.fn_index, "push": t}
        return result

    async def timed_process(self, events, *args, **kwargs):
        rec = records.pop(events[0]._id, None)
        if rec is not None:
            rec["process"] = time.time()
        _event.set(rec)
        try:
            await process(self, events, *args, **kwargs)
        finally:
            if rec is not None:
                rec["done"] = time.time()
                with out.open("a") as f:
                    f.write(json.dumps(rec) + "\n")

    def timed_send(self, event, message):
        rec = _event.get()
        if rec is not None and isinstance(message, ProcessGeneratingMessage):
            key = "sent" if "delta" in rec else "shown"  # the reply's first text, or the message shown before it
            rec.setdefault(key, time.time())
        return send(self, event, message)

    def timed(stream):
        async def timed_stream(self, *args, **kwargs):
            rec = _event.get()
            if rec is not None:
                rec.setdefault("stream", time.time())
            async for item in stream(self, *args, **kwargs):
                if rec is not None and "delta" not in rec and isinstance(item, Delta):
                    rec["delta"] = time.time()
                if rec is not None and not isinstance(item, Delta):
                    rec["last"] = time.time()  # the reply's end reached the page's loop (its reader stops there)
                yield item

        return timed_stream

    patch(queueing.Queue, "push", timed_push)
    patch(queueing.Queue, "process_events", timed_process)
    patch(queueing.Queue, "send_message", timed_send)
    for cls in engine_classes:
        patch(cls, "stream", timed(cls.stream))


def read_events(path: str | Path) -> list[dict]:
    """The app's marks, one record per ended event (none before the app has written any)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def events_for(path: str | Path, turns: list[dict], timeout_s: float = 5.0) -> list[dict]:
    """The app's marks once it has written one for each of these turns (it writes an event's marks as it ends,
    just after the client saw the end), or what there is after `timeout_s`."""
    wanted = {t.get("event_id") for t in turns}
    deadline = time.monotonic() + timeout_s
    while True:
        events = read_events(path)
        if wanted <= {e.get("event_id") for e in events} or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def joined(client_turns: list[dict], events: list[dict]) -> list[dict]:
    """Each client turn (its `event_id`, `wall_t0`, `wall_first`) with the app's marks for that event."""
    by_id = {e.get("event_id"): e for e in events}
    out = []
    for t in client_turns:
        marks = by_id.get(t.get("event_id"))
        if marks is not None and t.get("wall_first"):
            out.append({**marks, "t0": t["wall_t0"], "first": t["wall_first"], "end": t.get("wall_end")})
    return out


def segments(turns: list[dict]) -> dict[str, float | None]:
    """Mean ms of each segment over joined turns, and the mean wait they add up to (means, unlike medians, add
    up); how many turns."""
    res: dict[str, float | None] = {}
    for name, a, b in SEGMENTS:
        d = [1000 * (t[b] - t[a]) for t in turns if t.get(a) is not None and t.get(b) is not None]
        res[name] = round(statistics.fmean(d), 1) if d else None
    waits = [1000 * (t["first"] - t["t0"]) for t in turns]
    res["first text (mean)"] = round(statistics.fmean(waits), 1) if waits else None
    for name, a, b in TAIL:  # after the first text: the reply's own time, and its end's way to the client
        d = [1000 * (t[b] - t[a]) for t in turns if t.get(a) is not None and t.get(b) is not None]
        res[name] = round(statistics.fmean(d), 1) if d else None
    res["turns"] = len(turns)
    return res
