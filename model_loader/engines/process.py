"""The engines in a child process (`--engine-process`), seen from the page's process as ordinary ChatEngines.

At 16-32 users the page's interpreter is shared by the web server and lmdeploy's per-token Python (its generate
loop and detokenizer hold the GIL for about half of its busy time: docs/throughput.md, round 4). Here lmdeploy runs
in a child (model_loader/engines/child.py) that holds the only CUDA context, as the page's process holds none, so the
A10 memory plan is unchanged. The page's process sends each request and reads each reply's text in coalesced pieces
on one reader thread, which wakes the event loop once per message.

If the child dies, every call and reply in flight ends with the reason and the owner is told (model_loader.startup
starts it again and rebuilds the engines, a few times).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from model_loader.engines.child import CALL, CANCEL, CLOSE, FLUSH_S, OUT, RAISE, RESULT, STREAM, serve
from model_loader.engines.seam import Delta, EngineInfo, GenSettings, Stats
from model_loader.errors import EngineFailed

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # the child imports nothing heavy before saying it is ready
CALL_TIMEOUT_S = 60.0  # count_tokens and friends; a build has no limit (loading takes minutes)
READER_END_S = 2.0  # once the child has ended, its reader sees the end of the pipe at once


class EngineProcessGone(EngineFailed):
    """The engine process exited: every reply in flight ends with this, and the engines are gone until a restart."""


def _settle(fut: Future, value=None, error: BaseException | None = None) -> None:
    """Resolve a call's future unless its caller gave up on it (a cancelled Stop)."""
    if fut.done():
        return
    try:
        if error is None:
            fut.set_result(value)
        else:
            fut.set_exception(error)
    except Exception:  # noqa: BLE001 - cancelled between the check and the set
        log.debug("a call's answer came after its caller left", exc_info=True)


class _Sink:
    """One reply's items as the reader thread hands them over, taken on the loop that reads the reply."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list = []
        self.wake = asyncio.Event()

    def put(self, item) -> None:  # on self.loop
        self.items.append(item)
        self.wake.set()

    async def take(self) -> list:
        await self.wake.wait()
        self.wake.clear()
        items, self.items = self.items, []
        return items


class EngineProcess:
    """The child process, its pipe, and the replies and calls in flight over it."""

    def __init__(self, log_level: str = "INFO", switch_interval_s: float | None = None, flush_s: float = FLUSH_S) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads (the web server's)
        self.conn, self._child_end = ctx.Pipe()
        self.proc = ctx.Process(
            target=serve, args=(self._child_end, log_level, switch_interval_s, flush_s), name="engines", daemon=True
        )
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # calls and sinks: registered on the loop, settled on the reader thread
        self._calls: dict[int, Future] = {0: Future()}  # 0: the child's "ready"
        self._ids = itertools.count(1)
        self._sinks: dict[int, _Sink] = {}
        self.gone: str = ""  # why the child is gone, once it is
        self._closing = False
        self._reader: threading.Thread | None = None
        self.on_exit: list[Callable[[str], None]] = []

    def start(self) -> None:
        """Start the child and wait until it reads requests."""
        self.proc.start()
        self._child_end.close()  # the child holds it now: its exit closes the pipe
        self._reader = threading.Thread(target=self._read, name="engine-replies", daemon=True)
        self._reader.start()
        try:
            pid = self._calls[0].result(timeout=START_TIMEOUT_S)
        except Exception as e:
            self.close(timeout_s=1)
            raise EngineProcessGone(f"The engine process did not start: {type(e).__name__}: {e}") from e
        log.info("engine process %d started", pid)

    def build(self, kind: str, builder: str, kwargs: dict) -> ProcessEngine:
        """Build the `kind` engine in the child with `builder` ('module:callable', called with `kwargs`); blocks
        until built. A failure raises EngineFailed("TypeName: text"), as the original would read after its name
        (startup.engine_error looks for the driver's signs there)."""
        info = self.call("build", kind, builder, kwargs, timeout=None)
        return ProcessEngine(self, kind, info)

    # -- the pipe -----------------------------------------------------------------------------------------------

    def send(self, message) -> None:
        if self.gone:
            raise EngineProcessGone(self.gone)
        try:
            with self._send_lock:  # also held to close the pipe (_close_pipe)
                if self.conn.closed:
                    raise OSError("the pipe is closed")
                self.conn.send(message)
        except OSError as e:  # the child is going: the reader thread will say why
            raise EngineProcessGone(f"The engine process is gone ({e}).") from e

    def call_async(self, method: str, *args) -> Future:
        """Ask the child; the future holds its answer or the error it raised."""
        fut: Future = Future()
        call_id = next(self._ids)
        with self._lock:
            self._calls[call_id] = fut
        try:
            self.send((CALL, call_id, method, args))
        except Exception as e:  # noqa: BLE001 - the caller sees it through the future
            with self._lock:
                self._calls.pop(call_id, None)
            _settle(fut, error=e)
        return fut

    def call(self, method: str, *args, timeout: float | None = CALL_TIMEOUT_S):
        return self.call_async(method, *args).result(timeout=timeout)

    def open_stream(self, loop: asyncio.AbstractEventLoop) -> tuple[int, _Sink]:
        rid = next(self._ids)
        sink = _Sink(loop)
        with self._lock:
            self._sinks[rid] = sink
            gone = self.gone
        if gone:  # lost before the sink was registered: it would never hear
            sink.put(Stats(0, 0, 0.0, 0.0, "error", gone))
        return rid, sink

    def close_stream(self, rid: int, ended: bool) -> None:
        """The reader is done with the reply; one that had not ended is cancelled in the child, freeing its slot."""
        with self._lock:
            self._sinks.pop(rid, None)
        if not ended and not self.gone:
            try:
                self.send((CANCEL, rid))
            except EngineFailed:
                log.debug("reply %d not cancelled: the engine process is gone", rid)

    def _read(self) -> None:
        """On a thread: answers settle their calls; reply pieces go to their loops, one wake-up per message."""
        try:
            while True:
                message = self.conn.recv()
                tag = message[0]
                if tag == OUT:
                    self._deliver(message[1])
                elif tag in (RESULT, RAISE):
                    with self._lock:
                        fut = self._calls.pop(message[1], None)
                    if fut is not None:
                        _settle(fut, *((message[2], None) if tag == RESULT else (None, EngineFailed(message[2]))))
        except (EOFError, OSError):
            pass
        except BaseException:  # noqa: BLE001 - never leave callers waiting on a reader that died
            log.exception("reading the engine process's answers failed")
            self.proc.terminate()
        self.proc.join(timeout=5)
        self._lost(f"The engine process stopped (exit code {self.proc.exitcode}).")

    def _deliver(self, items: list) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for rid, item in items:
                sink = self._sinks.get(rid)
                if sink is not None:
                    by_loop.setdefault(sink.loop, []).append((sink, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that loop is closed: its readers are gone
                pass

    def _lost(self, why: str) -> None:
        """The child is gone: every call fails, every reply in flight ends with the reason, and owners are told."""
        if self._closing:
            why = "The engine process was closed."
        with self._lock:
            self.gone = why
            calls, self._calls = list(self._calls.values()), {}
            rids = list(self._sinks)
        if not self._closing:
            log.error(why)
            for callback in self.on_exit:  # first: the page says the engines are gone before the replies end
                try:
                    callback(why)
                except Exception:  # noqa: BLE001 - the calls and replies below must still end
                    log.exception("telling of the engine process's exit failed")
        for fut in calls:
            _settle(fut, error=EngineProcessGone(why))
        self._deliver([(rid, Stats(0, 0, 0.0, 0.0, "error", why)) for rid in rids])
        self._close_pipe()

    def _close_pipe(self) -> None:
        """Close this end of the pipe once, whichever thread comes first, and never under a send: closing it twice
        closed whatever file had taken its number meanwhile, or raised `OSError: Bad file descriptor` at Ctrl+C."""
        with self._send_lock:
            if not self.conn.closed:
                self.conn.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the child to close its engines and exit; end it if it does not. Calls and replies in flight end."""
        self._closing = True
        if self.proc.is_alive():
            try:
                self.send((CLOSE,))
            except EngineFailed:
                pass
            self.proc.join(timeout_s)
        for end in (self.proc.terminate, self.proc.kill):
            if self.proc.is_alive():
                end()
                self.proc.join(timeout_s)
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(READER_END_S)  # it reads the end of the pipe, ends every call and reply in flight, and closes it
            if reader.is_alive():  # another process holds the child's end open
                log.warning("the engine process has ended, and its pipe is still open; closing it")
        self._close_pipe()


def _put_all(batch: list) -> None:
    for sink, item in batch:
        sink.put(item)


def _has_images(messages: list[dict]) -> bool:
    return any(isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"]) for m in messages)


def _without_images(messages: list[dict]) -> list[dict]:
    """The messages with each image as a bare part: counting tokens needs only how many there are."""
    return [
        {**m, "content": [{"type": "image"} if p.get("type") == "image" else p for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]


class ProcessEngine:
    """A ChatEngine whose engine lives in the engine process (closing one closes the process, both engines)."""

    def __init__(self, host: EngineProcess, kind: str, info: EngineInfo) -> None:
        self.host = host
        self.kind = kind
        self.info = info
        self._active = 0

    async def stream(self, session_id: int, messages: list[dict], settings: GenSettings) -> AsyncIterator[Delta | Stats]:
        rid, sink = self.host.open_stream(asyncio.get_running_loop())
        self._active += 1
        ended = False
        try:
            request = (STREAM, rid, self.kind, session_id, messages, settings)
            try:
                if _has_images(messages):  # megabytes to pickle and write: off the web server's loop
                    await asyncio.to_thread(self.host.send, request)
                else:
                    self.host.send(request)
            except EngineFailed as e:
                sink.put(Stats(0, 0, 0.0, 0.0, "error", str(e)))
            while not ended:
                for item in await sink.take():
                    if isinstance(item, Stats):
                        ended = True
                        yield item
                        break
                    yield Delta(item)
        finally:
            self._active -= 1
            self.host.close_stream(rid, ended)

    async def stop(self, session_id: int) -> None:
        try:
            await asyncio.wrap_future(self.host.call_async("stop", self.kind, session_id))
        except EngineProcessGone:
            pass  # nothing runs any more

    def count_tokens(self, messages: list[dict]) -> int:
        return self.count_tokens_each([messages])[0]

    def count_tokens_each(self, chats: list[list[dict]]) -> list[int]:
        """count_tokens of several conversations in one round trip (trimming counts every turn of a chat)."""
        return self.host.call("count_tokens_each", self.kind, [_without_images(c) for c in chats])

    def active_sessions(self) -> int:
        """Replies in flight (counted here: the page asks every second)."""
        return self._active

    def close(self) -> None:
        self.host.close()
