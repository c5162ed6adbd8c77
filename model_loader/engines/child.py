"""The engine process's side: build engines on request and run their replies, sending text in coalesced pieces.

`serve` is the child's whole life. It reads requests from its end of a `multiprocessing` pipe on a thread and runs
them on its own event loop; the text produced meanwhile goes back in one message for every reply, so the page's
process handles a message per few milliseconds, not one per token (lmdeploy's api_server sends an OpenAI chunk per
token, which cost the page's process about what the detokenizer did: docs/throughput.md). When the page's process
goes away the pipe closes, and the child exits with it, freeing the GPU; anything else going wrong with the pipe
ends the child too, so the page's process is never left waiting on a child that no longer listens.

Messages are tuples whose first item is one of the tags below.
- to the child: (CALL, call_id, method, args), (STREAM, rid, kind, session_id, messages, settings), (CANCEL, rid),
  (CLOSE,);
- from it: (RESULT, call_id, value), (RAISE, call_id, "TypeName: text"), (OUT, [(rid, text | Stats), ...]).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from model_loader.engines.seam import Delta, Stats
from model_loader.heap import freeze_long_lived

log = logging.getLogger(__name__)

CALL, STREAM, CANCEL, CLOSE = "call", "stream", "cancel", "close"
RESULT, RAISE, OUT = "result", "raise", "out"

# how long the child gathers reply text before sending it, in one message for every reply (the page shows text
# at most every 0.25 s: ui/streaming.UI_INTERVAL_S); a reply's first text and its end do not wait
FLUSH_S = 0.02


def load_builder(target: str) -> Callable:
    """'package.module:Name.attr' -> the engine builder the page's process names."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Host:
    """The child's engines and the replies running on them, driven by messages from the pipe."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop, flush_s: float = FLUSH_S) -> None:
        self.conn = conn
        self.loop = loop
        self.flush_s = flush_s
        self.engines: dict = {}
        self.streams: dict[int, asyncio.Task] = {}
        self._calls: set[asyncio.Task] = set()
        self._cancelled: set[int] = set()  # cancelled before they arrived
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
        if tag == CALL:
            _, call_id, method, args = message
            task = self.loop.create_task(self._call(call_id, method, args))
            self._calls.add(task)  # the loop holds tasks weakly
            task.add_done_callback(self._calls.discard)
        elif tag == STREAM:
            _, rid, kind, session_id, messages, settings = message
            if rid in self._cancelled:  # its reader left before it arrived (an image request is sent from a thread)
                self._cancelled.discard(rid)
                return
            self.streams[rid] = self.loop.create_task(self._stream(rid, kind, session_id, messages, settings))
        elif tag == CANCEL:
            task = self.streams.pop(message[1], None)
            if task is not None:
                task.cancel()  # the reader went away: the engine's stream frees its slot as it unwinds
            else:
                self._cancelled.add(message[1])
        elif tag == CLOSE:
            self.closed.set()

    async def _call(self, call_id: int, method: str, args: tuple) -> None:
        try:
            value = await getattr(self, "do_" + method)(*args)
            answer = (RESULT, call_id, value)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - raised again in the page's process (lmdeploy's checks exit)
            log.debug("%s failed", method, exc_info=True)
            answer = (RAISE, call_id, f"{type(e).__name__}: {e}")
        try:
            self.send(answer)
        except Exception as e:  # noqa: BLE001 - an answer that does not pickle still answers
            self.send((RAISE, call_id, f"{type(e).__name__}: {e}"))

    async def do_build(self, kind: str, builder: str, kwargs: dict):
        """Build an engine (off the loop: it takes minutes) and return what the System tab shows about it."""
        engine = await asyncio.to_thread(load_builder(builder), **kwargs)
        self.engines[kind] = engine
        log.info("%d objects left out of garbage collection from now on", freeze_long_lived())
        return engine.info

    async def do_count_tokens_each(self, kind: str, chats: list[list[dict]]) -> list[int]:
        count = self.engines[kind].count_tokens
        return await asyncio.to_thread(lambda: [count(c) for c in chats])  # the loop keeps streaming meanwhile

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
            self._started.discard(rid)
        if not ended:
            self.emit(rid, Stats(0, 0, 0.0, 0.0, "error", "the engine returned nothing"))

    # -- replies --------------------------------------------------------------------------------------------------

    def emit(self, rid: int, item) -> None:
        """Queue a reply's new text or its end. A reply's first text and its end are sent at the loop's next pass
        (the first text is what a user waits for); the rest is gathered for up to flush_s, every reply's together."""
        urgent = not isinstance(item, str) or rid not in self._started
        if isinstance(item, str):
            self._started.add(rid)
            self._text.setdefault(rid, []).append(item)
        else:
            self._ends.append((rid, item))
        if self._flush is None or (urgent and not self._flush_soon):
            if self._flush is not None:
                self._flush.cancel()
            self._flush = self.loop.call_later(0 if urgent else self.flush_s, self.flush)
            self._flush_soon = urgent

    def flush(self) -> None:
        """Send every reply's text gathered since the last send, then the replies that ended (a reply's end is
        always its last item)."""
        out = [(rid, "".join(parts)) for rid, parts in self._text.items()] + self._ends
        self._text, self._ends, self._flush = {}, [], None
        if out:
            self.send((OUT, out))


def _read(conn: Connection, host: Host) -> None:
    """On a thread: hand each request to the loop. The pipe closing (the page's process gone) or failing ends the
    child: the page's process then sees it gone instead of waiting for answers."""
    try:
        while True:
            host.loop.call_soon_threadsafe(host.handle, conn.recv())
    except (EOFError, OSError):
        log.info("the page's process went away: the engine process exits")
        os._exit(0)
    except BaseException:  # noqa: BLE001 - a request that does not unpickle, a closed loop
        log.exception("the engine process cannot read requests any more")
        os._exit(1)


class _KeptLevel(logging.StreamHandler):
    """The engine process's log handler. lmdeploy sets every plain StreamHandler of the root logger to ERROR when it
    makes its own logger (`type(handler) is logging.StreamHandler`), which silenced this process after its first
    build; a subclass keeps its level."""


def serve(conn: Connection, log_level: str = "INFO", switch_interval_s: float | None = None, flush_s: float = FLUSH_S) -> None:
    """The engine process's entry point (multiprocessing's target)."""
    level = getattr(logging, str(log_level).upper(), logging.INFO)  # as app.configure_logging reads it
    fmt = "%(asctime)s %(levelname)s [engines] %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[_KeptLevel()])
    if switch_interval_s:
        sys.setswitchinterval(switch_interval_s)
    # Ctrl+C reaches the terminal's whole process group; the page's process closes this one as it exits (or its
    # pipe closes), so the interrupt must not end it first and be taken for a crash
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        host = Host(conn, asyncio.get_running_loop(), flush_s)
        threading.Thread(target=_read, args=(conn, host), name="engine-requests", daemon=True).start()
        host.send((RESULT, 0, os.getpid()))  # ready
        await host.closed.wait()
        for engine in host.engines.values():
            close = getattr(engine, "close", None)
            if close is not None:
                close()
        os._exit(0)  # now: a build still running, or lmdeploy's threads, would otherwise hold the exit

    asyncio.run(main())
