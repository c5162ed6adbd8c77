"""Gradio 6.17's queue keeps a row of timings for every event it has ever run, and after each event it builds a
pandas table of all of them (for the View API page's latency figures) in a worker thread holding the interpreter:
~3 ms at first, 50 ms at 50,000 events. Nothing is ever dropped, so a long-running app slowed down with its uptime
(issue 14). Upstream keeps the last 10,000 rows since https://github.com/gradio-app/gradio/pull/13756, and still
summarises after every event.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

log = logging.getLogger(__name__)

ANALYTICS_EVENTS = 10_000  # rows kept
ANALYTICS_SUMMARY_EVERY = 1_000  # events between two summaries, unless GRADIO_ANALYTICS_CACHE_FREQUENCY says


class _RecentEvents(OrderedDict):
    """The queue's per-event rows, the oldest dropped past `limit`.

    The queue summarises when the row count grew by its frequency since the last summary, so each drop moves that
    mark back by one, as if the count kept growing. The queue writes to the row of an event that is still waiting
    or running without looking: a row dropped meanwhile answers with a scratch row, never stored, rather than a
    KeyError that would stop the queue (review)."""

    def __init__(self, queue, limit: int) -> None:
        super().__init__(queue.event_analytics)
        self.queue, self.limit = queue, limit

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            self.popitem(last=False)
            self.queue.event_count_at_last_cache -= 1

    def __missing__(self, key) -> dict:
        return {}


def keep_queue_analytics_small(queue, events: int = ANALYTICS_EVENTS, every: int | None = None) -> None:
    """Bound the rows `queue` (a gradio.queueing.Queue) keeps and summarise them every `every` events (by default
    GRADIO_ANALYTICS_CACHE_FREQUENCY when set, else ANALYTICS_SUMMARY_EVERY). A Gradio whose queue lacks these
    attributes is left as it is, with a warning: the pin says 6.17.3, and its names are private."""
    if not isinstance(getattr(queue, "event_analytics", None), dict) or not hasattr(queue, "ANAYLTICS_CACHE_FREQUENCY"):
        log.warning("Gradio's queue has changed: its per-event analytics are left unbounded")
        return
    queue.event_analytics = _RecentEvents(queue, events)
    if every is None:
        every = int(os.environ.get("GRADIO_ANALYTICS_CACHE_FREQUENCY") or ANALYTICS_SUMMARY_EVERY)
    queue.ANAYLTICS_CACHE_FREQUENCY = every  # sic: Gradio's spelling
