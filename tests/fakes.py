"""Test doubles: a ChatEngine that streams scripted or echoed replies, and a fake lmdeploy pipeline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass

from model_loader.engines.seam import Delta, EngineInfo, GenSettings, Stats


class FakeEngine:
    """Streams a reply word by word; `enqueue()` scripts the next replies, otherwise it echoes the question."""

    def __init__(self, kind: str = "text", delay_s: float = 0.01, session_len: int = 8192) -> None:
        self.info = EngineInfo(kind=kind, name=f"fake-{kind}", backend="fake", session_len=session_len, batch_size=64)
        self.delay_s = delay_s
        self.queue: deque[str] = deque()
        self.calls: list[tuple[int, list[dict], GenSettings]] = []
        self._active: dict[int, asyncio.Event] = {}
        self.stopped: list[int] = []

    def enqueue(self, *replies: str) -> None:
        self.queue.extend(replies)

    def count_tokens(self, messages: list[dict]) -> int:
        n = 0
        for m in messages:
            c = m["content"]
            if isinstance(c, list):
                n += sum(576 if p.get("type") == "image" else len(p.get("text", "").split()) for p in c)
            else:
                n += len(c.split())
            n += 4
        return n

    def active_sessions(self) -> int:
        return len(self._active)

    async def stop(self, session_id: int) -> None:
        ev = self._active.get(session_id)
        if ev:
            ev.set()
        self.stopped.append(session_id)

    def reply_for(self, messages: list[dict]) -> str:
        if self.queue:
            return self.queue.popleft()
        last = messages[-1]["content"]
        if isinstance(last, list):
            text = " ".join(p.get("text", "") for p in last if p.get("type") == "text")
            img = next((p["image"] for p in last if p.get("type") == "image"), None)
            size = f"{img.size[0]}x{img.size[1]}" if img is not None else "none"
            return f"I see an image of {size} and you asked: {text}"
        return f"You said: {last}"

    async def stream(self, session_id: int, messages: list[dict], settings: GenSettings):
        self.calls.append((session_id, messages, settings))
        stop = asyncio.Event()
        self._active[session_id] = stop
        t0 = time.perf_counter()
        words = self.reply_for(messages).split(" ")
        words = words[: settings.max_new_tokens]
        n = 0
        reason = "stop"
        try:
            for i, w in enumerate(words):
                if stop.is_set():
                    reason = "abort"
                    break
                await asyncio.sleep(self.delay_s)
                n += 1
                yield Delta(w if i == 0 else " " + w)
            yield Stats(self.count_tokens(messages), n, self.delay_s, time.perf_counter() - t0, reason)
        finally:
            self._active.pop(session_id, None)


@dataclass
class _Out:
    response: str
    input_token_len: int
    generate_token_len: int
    finish_reason: str | None = None


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()


class FakePipe:
    """Just enough of lmdeploy's AsyncEngine for LmdeployEngine: generate on its own loop thread, stop_session."""

    def __init__(self, tokens: int = 50, delay_s: float = 0.002) -> None:
        self.internal_thread = _LoopThread()
        self.tokens, self.delay_s = tokens, delay_s
        self.running: set[int] = set()
        self.cancelled: list[int] = []
        self.seen: list = []

        class _T:
            def messages2prompt(self, msgs, start):
                return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)

        class _Tok:
            def encode(self, text):
                return list(range(len(text.split())))

        self.chat_template, self.tokenizer = _T(), _Tok()

    async def generate(self, messages, session_id, gen_config=None, **kw):
        assert asyncio.get_running_loop() is self.internal_thread.loop, "generate must run on lmdeploy's loop"
        self.seen.append((messages, gen_config))
        self.running.add(session_id)
        try:
            for i in range(self.tokens):
                if session_id in self.cancelled:
                    yield _Out("", 5, i, "abort")
                    return
                await asyncio.sleep(self.delay_s)
                yield _Out(f"t{i} ", 5, i + 1)
            yield _Out("", 5, self.tokens, "length")
        finally:
            self.running.discard(session_id)

    async def stop_session(self, session_id):
        self.cancelled.append(session_id)

    def close(self):
        self.internal_thread.loop.call_soon_threadsafe(self.internal_thread.loop.stop)
