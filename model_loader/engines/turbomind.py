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
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from model_loader.config import AppConfig
from model_loader.engines.lmdeploy_config import generation_config, pytorch_config, turbomind_config
from model_loader.engines.seam import Delta, EngineInfo, GenSettings, Stats

log = logging.getLogger(__name__)


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


# chat-template attributes that hold role markers (lmdeploy's BaseChatTemplate and its HF-template subclass)
_TEMPLATE_MARKERS = (
    "system",
    "eosys",
    "user",
    "eoh",
    "assistant",
    "eoa",
    "tool",
    "eotool",
    "system_start",
    "system_end",
    "user_start",
    "user_end",
    "assistant_start",
    "assistant_end",
)


def reserved_strings(tokenizer, chat_template) -> tuple[str, ...]:
    """What user text must not contain as-is: the tokenizer's special and added tokens, lmdeploy's image
    placeholder, and the template's plain-text role markers (llava-v1's "USER:" and "ASSISTANT:").

    `tokenizer` is lmdeploy's Tokenizer (the HF tokenizer is its `.model.model`), `chat_template` lmdeploy's.
    """
    from lmdeploy.vl.constants import IMAGE_TOKEN  # noqa: PLC0415

    hf = getattr(getattr(tokenizer, "model", None), "model", None)
    tokens = {IMAGE_TOKEN, *getattr(hf, "all_special_tokens", ())}
    tokens |= {str(getattr(t, "content", t)) for t in (getattr(hf, "added_tokens_decoder", None) or {}).values()}
    tokens = {t for t in tokens if len(t.strip()) > 1}
    markers = set()
    for attr in _TEMPLATE_MARKERS:
        marker = getattr(chat_template, attr, None)
        marker = marker.strip() if isinstance(marker, str) else ""
        if len(marker) > 1 and not any(t in marker for t in tokens):  # markers made of special tokens are covered
            markers.add(marker)
    return tuple(sorted(tokens | markers, key=lambda t: (-len(t), t)))


def keep_special_ids(tokenizer) -> None:
    """Make lmdeploy's tokenizer answer `all_special_ids` from the list it has now.

    transformers rebuilds that list at every read, and its `convert_ids_to_tokens(skip_special_tokens=True)`, which
    lmdeploy's incremental detokenizer calls for every step of every reply, reads it once per id: 17 % of the
    interpreter at 32 users (bench/results). lmdeploy adds no tokens once the pipeline is built, so the list cannot
    go stale. The tokenizer pickles as the transformers class it was. `tokenizer` is lmdeploy's Tokenizer; the HF
    tokenizer is its `.model.model`.
    """
    hf = getattr(getattr(tokenizer, "model", None), "model", None)
    if hf is None or not hasattr(hf, "all_special_ids"):
        return  # not a transformers tokenizer: nothing to keep
    hf._kept_special_ids = tuple(hf.all_special_ids)
    hf.__class__ = _kept_class(type(hf))


def _kept_class(base: type) -> type:
    """`base` answering `all_special_ids` from `_kept_special_ids` (a fresh list per read), pickled as `base`."""

    def reduce_ex(self, protocol):
        return _rebuilt, (base, {k: v for k, v in self.__dict__.items() if k != "_kept_special_ids"})

    attrs = {"all_special_ids": property(lambda self: list(self._kept_special_ids)), "__reduce_ex__": reduce_ex}
    return type(f"Kept{base.__name__}", (base,), attrs)


def _rebuilt(cls: type, state: dict):
    """A pickled kept tokenizer, back as its transformers class."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


@dataclass(eq=False)
class _Request:
    """One reply in flight. `task` and `rid` live on lmdeploy's loop; `stop` may be set from any thread."""

    stop: bool = False
    rid: int = 0
    task: asyncio.Task | None = None


class LmdeployEngine:
    """A ChatEngine over an lmdeploy pipeline built in this process.

    Stop is honoured in every phase: once lmdeploy has registered the request (`id2inst`), through its own
    `stop_session`; before that (templating, image preprocessing, waiting for a free instance), where 0.11.1's
    `stop_session` would drop it, by cancelling the request's task, which lmdeploy unwinds without ever starting
    it. Both are decided on lmdeploy's loop, so a request cannot register between the check and the stop.
    Request ids come from a pool and are reused, because lmdeploy keeps every id it sees in `id2step` forever.
    """

    def __init__(self, pipe, info: EngineInfo) -> None:
        self.pipe = pipe
        self.info = info
        info.reserved = reserved_strings(pipe.tokenizer, pipe.chat_template)
        keep_special_ids(pipe.tokenizer)
        self._active: dict[int, set[_Request]] = {}  # UI session -> its replies in flight
        self._loop = pipe.internal_thread.loop
        self._free_ids: deque[int] = deque()  # touched only on lmdeploy's loop; oldest released first
        self._new_ids = itertools.count(1)

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
        """Replies in flight."""
        return sum(len(reqs) for reqs in self._active.values())

    async def stop(self, session_id: int) -> None:
        """Stop every reply of the session, whatever phase it is in."""
        for req in list(self._active.get(session_id, ())):
            req.stop = True
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._halt(req), self._loop))

    async def _halt(self, req: _Request) -> None:
        """On lmdeploy's loop: end the request by lmdeploy's own stop if registered, else cancel it unstarted."""
        if req.task is None or req.task.done():
            return  # not started (`_start` sees req.stop) or already over
        if req.rid in self.pipe.id2inst:
            await self.pipe.stop_session(req.rid)  # ends with finish_reason 'abort' and frees the instance
        else:
            req.task.cancel()  # still templating, preprocessing or waiting for an instance

    def _start(self, req: _Request, run, done) -> None:
        """On lmdeploy's loop: take a request id and start generating, unless a stop came first."""
        if req.stop:
            done(None)
            return
        req.rid = self._free_ids.popleft() if self._free_ids else next(self._new_ids)
        req.task = self._loop.create_task(run(req.rid))

        def finished(task: asyncio.Task) -> None:
            self._free_ids.append(req.rid)  # lmdeploy is done with the id: generate has returned
            done(task)

        req.task.add_done_callback(finished)

    async def stream(self, session_id: int, messages: list[dict], settings: GenSettings) -> AsyncIterator[Delta | Stats]:
        bridge = _Bridge(asyncio.get_running_loop())
        gen_cfg = generation_config(settings)
        msgs = to_lmdeploy_messages(messages)
        t0 = time.perf_counter()
        ended = object()

        async def run(rid: int) -> None:
            try:
                async for out in self.pipe.generate(
                    msgs, rid, gen_config=gen_cfg, stream_response=True, sequence_start=True, sequence_end=True
                ):
                    bridge.push(out)
            except Exception as e:  # noqa: BLE001 - reported to the consumer as an error Stats
                log.exception("generation failed")
                bridge.push(e)

        req = _Request()
        self._active.setdefault(session_id, set()).add(req)
        self._loop.call_soon_threadsafe(self._start, req, run, lambda task: bridge.push(ended))
        first = None
        n_in = n_out = 0
        reason = None
        error = ""
        try:
            while True:
                for item in await bridge.take():
                    if item is ended:
                        if reason is None:
                            reason = "abort" if req.stop else "error"
                            error = "" if req.stop else "the engine returned nothing"
                        now = time.perf_counter()
                        yield Stats(n_in, n_out, (first or now) - t0, now - t0, reason, error)
                        return
                    if isinstance(item, Exception):
                        reason, error = "error", str(item)
                        continue
                    n_in, n_out = item.input_token_len, item.generate_token_len
                    if first is None and n_out > 0:
                        first = time.perf_counter()  # time to first token, even if it decodes to no text yet
                    if item.finish_reason:
                        reason = item.finish_reason
                    if item.finish_reason == "error":
                        error = item.response
                        continue
                    if item.response:
                        yield Delta(item.response)
        finally:
            mine = self._active.get(session_id, set())
            mine.discard(req)
            if not mine:
                self._active.pop(session_id, None)
            if not req.stop and reason is None:  # the reader went away (Stop, a closed tab): free the engine now
                req.stop = True
                asyncio.run_coroutine_threadsafe(self._halt(req), self._loop)

    def close(self) -> None:
        self.pipe.close()
