"""The in-process engine: an lmdeploy pipeline (TurboMind, or PyTorch for LLaVA layouts TurboMind lacks).

Requests are stateless (the whole conversation each turn, `sequence_start=sequence_end=True`) with prefix caching,
so regenerate, undo and edit need no engine state and a stopped request frees its slot at once. lmdeploy runs
every request on its own event-loop thread; replies cross to the caller's loop through a coalescing bridge, so a
busy engine wakes the UI once per batch of tokens rather than once per token.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from model_loader.config import AppConfig
from model_loader.engines.lmdeploy_config import generation_config, pytorch_config, turbomind_config
from model_loader.engines.seam import Delta, EngineInfo, GenSettings, Stats

log = logging.getLogger(__name__)
_request_ids = itertools.count(1)


class _Bridge:
    """Carries items from lmdeploy's loop thread to the consumer's loop, waking it once per burst."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: list = []
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._pending = False

    def push(self, item) -> None:
        with self._lock:
            self._items.append(item)
            notify = not self._pending
            self._pending = True
        if notify:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def take(self) -> list:
        await self._wake.wait()
        with self._lock:
            items, self._items = self._items, []
            self._pending = False
            self._wake.clear()
        return items


def to_lmdeploy_messages(messages: list[dict]) -> list[dict]:
    """Our content parts ({'type': 'image', 'image': PIL}) as lmdeploy's ({'type': 'image_data', ...})."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    parts.append({"type": "image_data", "image_data": {"data": p["image"]}})
                else:
                    parts.append({"type": "text", "text": p["text"]})
            content = parts
        out.append({"role": m["role"], "content": content})
    return out


class LmdeployEngine:
    """A ChatEngine over an lmdeploy pipeline built in this process."""

    def __init__(self, pipe, info: EngineInfo) -> None:
        self.pipe = pipe
        self.info = info
        self._active: dict[int, int] = {}  # UI session -> lmdeploy request id
        self._loop = pipe.internal_thread.loop

    @classmethod
    def build(
        cls, kind: str, path: Path, cfg: AppConfig, backend: str = "turbomind", awq: bool = False, source: str = ""
    ) -> LmdeployEngine:
        """Build the pipeline from a local directory (never a repo id: lmdeploy would ask the hub even offline)."""
        from lmdeploy import ChatTemplateConfig, pipeline  # noqa: PLC0415

        engine_cfg = turbomind_config(cfg, kind, awq) if backend == "turbomind" else pytorch_config(cfg, kind)
        kwargs = {}
        if kind == "vision":
            kwargs["chat_template_config"] = ChatTemplateConfig("llava-v1")
        t0 = time.perf_counter()
        pipe = pipeline(str(path), backend_config=engine_cfg, log_level="WARNING", **kwargs)
        info = EngineInfo(
            kind=kind,
            name=path.name,
            backend=backend,
            path=str(path),
            source=source,
            session_len=engine_cfg.session_len,
            batch_size=engine_cfg.max_batch_size,
            load_s=time.perf_counter() - t0,
        )
        return cls(pipe, info)

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens of the templated prompt (image parts count as LLaVA's 576 patches)."""
        texts, images = [], 0
        for m in messages:
            c = m["content"]
            if isinstance(c, list):
                texts.append(" ".join(p.get("text", "") for p in c if p.get("type") == "text"))
                images += sum(1 for p in c if p.get("type") == "image")
            else:
                texts.append(c)
        plain = [{"role": m["role"], "content": t} for m, t in zip(messages, texts)]
        prompt = self.pipe.chat_template.messages2prompt(plain, True)
        return len(self.pipe.tokenizer.encode(prompt)) + 576 * images

    def active_sessions(self) -> int:
        return len(self._active)

    async def stop(self, session_id: int) -> None:
        rid = self._active.get(session_id)
        if rid is not None:
            fut = asyncio.run_coroutine_threadsafe(self.pipe.stop_session(rid), self._loop)
            await asyncio.wrap_future(fut)

    async def stream(self, session_id: int, messages: list[dict], settings: GenSettings) -> AsyncIterator[Delta | Stats]:
        rid = next(_request_ids)
        bridge = _Bridge(asyncio.get_running_loop())
        gen_cfg = generation_config(settings)
        msgs = to_lmdeploy_messages(messages)
        t0 = time.perf_counter()
        done = object()

        async def produce() -> None:
            last = None
            try:
                async for out in self.pipe.generate(
                    msgs, rid, gen_config=gen_cfg, stream_response=True, sequence_start=True, sequence_end=True
                ):
                    last = out
                    bridge.push(out)
            except Exception as e:  # noqa: BLE001 - reported to the consumer as an error Stats
                log.exception("generation failed")
                bridge.push(e)
            bridge.push(done if last is not None else RuntimeError("the engine returned nothing"))

        self._active[session_id] = rid
        fut = asyncio.run_coroutine_threadsafe(produce(), self._loop)
        first = None
        n_in = n_out = 0
        reason = "error"
        error = ""
        try:
            while True:
                for item in await bridge.take():
                    if item is done:
                        yield Stats(n_in, n_out, (first or time.perf_counter()) - t0, time.perf_counter() - t0, reason, error)
                        return
                    if isinstance(item, Exception):
                        yield Stats(
                            n_in, n_out, (first or time.perf_counter()) - t0, time.perf_counter() - t0, "error", str(item)
                        )
                        return
                    n_in, n_out = item.input_token_len, item.generate_token_len
                    if first is None and n_out > 0:
                        first = time.perf_counter()  # time to first token, even if it decodes to no text yet
                    reason = item.finish_reason or reason
                    if item.finish_reason == "error":
                        error = item.response
                        continue
                    if item.response:
                        yield Delta(item.response)
        finally:
            self._active.pop(session_id, None)
            if not fut.done():  # the consumer went away (Stop, disconnect): free the engine slot now
                asyncio.run_coroutine_threadsafe(self.pipe.stop_session(rid), self._loop)

    def close(self) -> None:
        self.pipe.close()
