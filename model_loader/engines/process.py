"""The engines in a child process (`--engine-process`), seen from the page's process as ordinary ChatEngines.

At 16-32 users the page's interpreter is shared by the web server and lmdeploy's per-token Python (its generate
loop and detokenizer hold the GIL for about half of its busy time: docs/throughput.md, round 4). Here lmdeploy runs
in a child (model_loader/engines/child.py) that holds the only CUDA context, as the page's process holds none, so the
A10 memory plan is unchanged. The page's process sends each request and reads each reply's text in coalesced pieces
on one reader thread, which wakes the event loop once per message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

from model_loader.engines.seam import Delta, EngineInfo, GenSettings, Stats
from model_loader.errors import EngineFailed

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # the child imports nothing heavy before saying it is ready
CALL_TIMEOUT_S = 60.0  # count_tokens and friends; a build has no limit (downloads are done, loading takes minutes)


class EngineProcessGone(EngineFailed):
    """The engine process exited: every reply in flight ends with this, and the engines are gone until a restart."""


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

    def __init__(self, log_level: str = "INFO", switch_interval_s: float | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads (the web server's)
        self.conn, child_end = ctx.Pipe()
        from model_loader.engines import child  # noqa: PLC0415

        self.proc = ctx.Process(target=child.serve, args=(child_end, log_level, switch_interval_s), name="engines", daemon=True)
        self._child_end = child_end
        self._send_lock = threading.Lock()
        self._calls: dict[int, Future] = {0: Future()}  # 0: the child's "ready"
        self._ids = itertools.count(1)
        self._sinks: dict[int, _Sink] = {}
        self.gone: str = ""  # why the child is gone, once it is
        self._closing = False
        self.on_exit: list[Callable[[str], None]] = []

    def start(self) -> None:
        """Start the child and wait until it reads requests."""
        self.proc.start()
        self._child_end.close()  # the child holds it now: its exit closes the pipe
        threading.Thread(target=self._read, name="engine-replies", daemon=True).start()
        pid = self._calls[0].result(timeout=START_TIMEOUT_S)
        log.info("engine process %d started", pid)

    def build(self, kind: str, builder: str, kwargs: dict) -> ProcessEngine:
        """Build the `kind` engine in the child with `builder` ('module:callable', called with `kwargs`); blocks
        until built.

        A failure raises EngineFailed whose text starts with the child's exception type, as `str` of the original
        would read after its name (startup.engine_error looks for the driver's signs there)."""
        info = self.call("build", kind, builder, kwargs, timeout=None)
        return ProcessEngine(self, kind, info)

    # -- the pipe -----------------------------------------------------------------------------------------------

    def send(self, message) -> None:
        if self.gone:
            raise EngineProcessGone(self.gone)
        with self._send_lock:
            self.conn.send(message)

    def call_async(self, method: str, *args) -> Future:
        """Ask the child; the future holds its answer or the error it raised."""
        fut: Future = Future()
        call_id = next(self._ids)
        self._calls[call_id] = fut
        try:
            self.send(("call", call_id, method, args))
        except Exception as e:  # noqa: BLE001 - the caller sees it through the future
            self._calls.pop(call_id, None)
            fut.set_exception(e)
        return fut

    def call(self, method: str, *args, timeout: float | None = CALL_TIMEOUT_S):
        return self.call_async(method, *args).result(timeout=timeout)

    def open_stream(self, kind: str, session_id: int, messages: list[dict], settings: GenSettings) -> tuple[int, _Sink]:
        rid = next(self._ids)
        sink = _Sink(asyncio.get_running_loop())
        self._sinks[rid] = sink
        try:
            self.send(("stream", rid, kind, session_id, messages, settings))
        except Exception as e:  # noqa: BLE001 - the reply ends with it, as any engine error does
            sink.put(Stats(0, 0, 0.0, 0.0, "error", str(e)))
        return rid, sink

    def close_stream(self, rid: int, ended: bool) -> None:
        """The reader is done with the reply; one that had not ended is cancelled in the child, freeing its slot."""
        self._sinks.pop(rid, None)
        if not ended and not self.gone:
            try:
                self.send(("cancel", rid))
            except (OSError, EngineFailed):
                pass

    def _read(self) -> None:
        """On a thread: answers resolve their calls; reply pieces go to their loops, one wake-up per message."""
        try:
            while True:
                message = self.conn.recv()
                tag = message[0]
                if tag == "out":
                    self._deliver(message[1])
                elif tag == "result":
                    fut = self._calls.pop(message[1], None)
                    if fut is not None:
                        fut.set_result(message[2])
                elif tag == "raise":
                    fut = self._calls.pop(message[1], None)
                    if fut is not None:
                        fut.set_exception(EngineFailed(f"{message[2]}: {message[3]}"))
        except (EOFError, OSError):
            pass
        self.proc.join(timeout=5)
        self._lost(f"The engine process exited (exit code {self.proc.exitcode}); restart the app to serve again.")

    def _deliver(self, items: list) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
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
        self.gone = why
        if self._closing:
            return
        log.error(why)
        for fut in list(self._calls.values()):
            if not fut.done():
                fut.set_exception(EngineProcessGone(why))
        self._calls.clear()
        for callback in self.on_exit:  # first: the page says the engines are gone before the replies end
            callback(why)
        self._deliver([(rid, Stats(0, 0, 0.0, 0.0, "error", why)) for rid in list(self._sinks)])

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the child to close its engines and exit; end it if it does not."""
        self._closing = True
        if self.proc.is_alive():
            try:
                self.send(("close",))
            except (OSError, EngineFailed):
                pass
            self.proc.join(timeout_s)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout_s)


def _put_all(batch: list) -> None:
    for sink, item in batch:
        sink.put(item)


class ProcessEngine:
    """A ChatEngine whose engine lives in the engine process."""

    def __init__(self, host: EngineProcess, kind: str, info: EngineInfo) -> None:
        self.host = host
        self.kind = kind
        self.info = info
        self._active = 0

    async def stream(self, session_id: int, messages: list[dict], settings: GenSettings) -> AsyncIterator[Delta | Stats]:
        rid, sink = self.host.open_stream(self.kind, session_id, messages, settings)
        self._active += 1
        ended = False
        try:
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
        if self.host.gone:
            return  # nothing runs any more
        await asyncio.wrap_future(self.host.call_async("stop", self.kind, session_id))

    def count_tokens(self, messages: list[dict]) -> int:
        return self.host.call("count_tokens", self.kind, messages)

    def active_sessions(self) -> int:
        """Replies in flight (counted here: the page asks every second)."""
        return self._active

    def close(self) -> None:
        self.host.close()
