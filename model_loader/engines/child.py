"""The engine process's side: build engines on request and run their replies, sending text in coalesced pieces.

`serve` is the child's whole life. It reads requests from its end of a `multiprocessing` pipe on a thread and runs
them on its own event loop; every piece of reply text produced in one pass of that loop goes back in one message,
so the page's process handles a message per few milliseconds, not one per token (lmdeploy's api_server sends an
OpenAI chunk per token, which cost the page's process about what the detokenizer did: docs/throughput.md). When the
page's process goes away the pipe closes, and the child exits with it, freeing the GPU.

Messages, as tuples (the first item names them):
- to the child: ("call", call_id, method, args), ("stream", rid, kind, session_id, messages, settings),
  ("cancel", rid), ("close",);
- from it: ("result", call_id, value), ("raise", call_id, type_name, text), ("out", [(rid, text | Stats), ...]).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import sys
import threading
from multiprocessing.connection import Connection

from model_loader.engines.seam import Delta, Stats

log = logging.getLogger(__name__)

# how long the child gathers reply text before sending it, in one message for every reply (the page shows text
# at most every 0.25 s: ui/streaming.UI_INTERVAL_S)
FLUSH_S = 0.02


def resolve(target: str):
    """'package.module:Name.attr' -> the object (the engine builder the page's process names)."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Host:
    """The child's engines and the replies running on them, driven by messages from the pipe."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.loop = loop
        self.engines: dict = {}
        self.streams: dict[int, asyncio.Task] = {}
        self._text: dict[int, list[str]] = {}
        self._ends: list[tuple[int, Stats]] = []
        self._started: set[int] = set()  # replies whose first text was queued
        self._flush: asyncio.TimerHandle | None = None
        self._flush_soon = False
        self._send_lock = threading.Lock()
        self.closed = asyncio.Event()

    def send(self, message) -> None:
        with self._send_lock:
            self.conn.send(message)

    # -- requests -------------------------------------------------------------------------------------------------

    def handle(self, message) -> None:
        """On the child's loop: one request from the page's process."""
        tag = message[0]
        if tag == "call":
            _, call_id, method, args = message
            self.loop.create_task(self._call(call_id, method, args))
        elif tag == "stream":
            _, rid, kind, session_id, messages, settings = message
            self.streams[rid] = self.loop.create_task(self._stream(rid, kind, session_id, messages, settings))
        elif tag == "cancel":
            task = self.streams.pop(message[1], None)
            if task is not None:
                task.cancel()  # the reader went away: the engine's stream frees its slot as it unwinds
        elif tag == "close":
            self.closed.set()

    async def _call(self, call_id: int, method: str, args: tuple) -> None:
        try:
            value = await getattr(self, "do_" + method)(*args)
        except Exception as e:  # noqa: BLE001 - raised again in the page's process, by name
            log.debug("%s failed", method, exc_info=True)
            self.send(("raise", call_id, type(e).__name__, str(e)))
        else:
            self.send(("result", call_id, value))

    async def do_build(self, kind: str, builder: str, kwargs: dict):
        """Build an engine (off the loop: it takes minutes) and return what the System tab shows about it."""
        build = resolve(builder)
        engine = await asyncio.to_thread(build, **kwargs)
        self.engines[kind] = engine
        gc.collect()
        gc.freeze()  # the engine's long-lived objects stay out of later collections, as app.freeze_heap_after does
        return engine.info

    async def do_count_tokens(self, kind: str, messages: list[dict]) -> int:
        return self.engines[kind].count_tokens(messages)

    async def do_stop(self, kind: str, session_id: int) -> None:
        await self.engines[kind].stop(session_id)

    async def do_active(self, kind: str) -> int:
        return self.engines[kind].active_sessions()

    async def _stream(self, rid: int, kind: str, session_id: int, messages: list[dict], settings) -> None:
        ended = False
        try:
            async for item in self.engines[kind].stream(session_id, messages, settings):
                ended = isinstance(item, Stats)
                self.emit(rid, item.text if isinstance(item, Delta) else item)
        except asyncio.CancelledError:
            return  # cancelled for a reader that went away: nobody waits for its end
        except Exception as e:  # noqa: BLE001 - the reply ends with the error, as an in-process engine's would
            log.exception("the %s reply failed", kind)
            self.emit(rid, Stats(0, 0, 0.0, 0.0, "error", str(e)))
            ended = True
        finally:
            self.streams.pop(rid, None)
        if not ended:
            self.emit(rid, Stats(0, 0, 0.0, 0.0, "error", "the engine returned nothing"))

    # -- replies --------------------------------------------------------------------------------------------------

    def emit(self, rid: int, item) -> None:
        """Queue a reply's new text or its end. A reply's first text and its end are sent at the loop's next pass
        (the first text is what a user waits for); the rest is gathered for up to FLUSH_S, every reply's together."""
        urgent = not isinstance(item, str) or rid not in self._started
        if isinstance(item, str):
            self._started.add(rid)
            self._text.setdefault(rid, []).append(item)
        else:
            self._started.discard(rid)
            self._ends.append((rid, item))
        if self._flush is None or (urgent and self._flush_soon is False):
            if self._flush is not None:
                self._flush.cancel()
            self._flush = self.loop.call_later(0 if urgent else FLUSH_S, self.flush)
            self._flush_soon = urgent

    def flush(self) -> None:
        """Send every reply's text gathered since the last send, then the replies that ended (a reply's end is
        always its last item)."""
        out = [(rid, "".join(parts)) for rid, parts in self._text.items()] + self._ends
        self._text, self._ends, self._flush = {}, [], None
        if out:
            self.send(("out", out))


def _read(conn: Connection, host: Host) -> None:
    """On a thread: hand each request to the loop; the pipe closing (the page's process gone) ends the child."""
    try:
        while True:
            host.loop.call_soon_threadsafe(host.handle, conn.recv())
    except (EOFError, OSError):
        log.info("the page's process went away: the engine process exits")
        os._exit(0)


def serve(conn: Connection, log_level: str = "INFO", switch_interval_s: float | None = None) -> None:
    """The engine process's entry point (multiprocessing's target)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [engines] %(name)s: %(message)s")
    if switch_interval_s:
        sys.setswitchinterval(switch_interval_s)

    async def main() -> None:
        host = Host(conn, asyncio.get_running_loop())
        threading.Thread(target=_read, args=(conn, host), name="engine-requests", daemon=True).start()
        host.send(("result", 0, os.getpid()))  # ready
        await host.closed.wait()
        for engine in host.engines.values():
            close = getattr(engine, "close", None)
            if close is not None:
                close()

    asyncio.run(main())
    os._exit(0)  # lmdeploy's threads do not end by themselves
