"""Test doubles: a ChatEngine that streams scripted or echoed replies, and a faithful fake of lmdeploy's pipeline.

FakePipe follows lmdeploy 0.11.1's AsyncEngine (serve/async_engine.py, vl_async_engine.py) where the app can go
wrong: `generate`'s keywords, the `max_batch_size`-deep instance pool, registration in `id2inst` only after
templating, image preprocessing and the wait for an instance, `stop_session` dropping ids not registered yet, and
`id2step` keeping every id it ever saw.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from copy import deepcopy
from dataclasses import dataclass
from types import SimpleNamespace

from model_loader.engines.seam import Delta, EngineInfo, GenSettings, Stats

# what the real InternLM2 and LLaVA tokenizers and templates reserve (LmdeployEngine reads them from lmdeploy)
FAKE_RESERVED = {
    "text": ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>")
    + ("<s>", "</s>", "<unk>", "<IMAGE_TOKEN>"),
    "vision": ("<s>", "</s>", "<unk>", "<image>", "<pad>", "<IMAGE_TOKEN>", "USER:", "ASSISTANT:"),
}


class FakeEngine:
    """Streams a reply word by word; `enqueue()` scripts the next replies, otherwise it echoes the question.

    Like LmdeployEngine, a stop reaches only requests whose stream has begun, and two streams of one session are
    two requests (a stop ends both).
    """

    def __init__(self, kind: str = "text", delay_s: float = 0.01, session_len: int = 8192) -> None:
        self.info = EngineInfo(
            kind=kind,
            name=f"fake-{kind}",
            backend="fake",
            session_len=session_len,
            batch_size=64,
            reserved=FAKE_RESERVED[kind],
        )
        self.delay_s = delay_s
        self.queue: deque[str] = deque()
        self.calls: list[tuple[int, list[dict], GenSettings]] = []
        self._active: dict[int, set[asyncio.Event]] = {}
        self.stopped: list[int] = []

    def enqueue(self, *replies: str) -> None:
        self.queue.extend(replies)

    def count_tokens(self, messages: list[dict]) -> int:
        return self._tokens(messages)

    def _tokens(self, messages: list[dict]) -> int:
        """The prompt's tokens, as the engine counts them when asked and reports them with every reply."""
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
        return sum(len(s) for s in self._active.values())

    async def stop(self, session_id: int) -> None:
        self.stopped.append(session_id)
        for ev in self._active.get(session_id, ()):
            ev.set()

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
        self._active.setdefault(session_id, set()).add(stop)
        t0 = time.perf_counter()
        words = self.reply_for(messages).split(" ")
        reason = "length" if len(words) > settings.max_new_tokens else "stop"  # as lmdeploy reports a cut reply
        words = words[: settings.max_new_tokens]
        n = 0
        try:
            for i, w in enumerate(words):
                if stop.is_set():
                    reason = "abort"
                    break
                await asyncio.sleep(self.delay_s)
                n += 1
                yield Delta(w if i == 0 else " " + w)
            yield Stats(self._tokens(messages), n, self.delay_s, time.perf_counter() - t0, reason)
        finally:
            mine = self._active.get(session_id, set())
            mine.discard(stop)
            if not mine:
                self._active.pop(session_id, None)


# ----------------------------------------------------------------------------------------------------------------
# lmdeploy 0.11.1's AsyncEngine, faithfully where it matters


@dataclass
class GenOut:
    """lmdeploy.serve.async_engine.GenOut (that module needs psutil, so it is not imported here)."""

    response: str
    history_token_len: int
    input_token_len: int
    generate_token_len: int
    finish_reason: str | None = None


@dataclass
class _EngineOutput:
    status: object  # lmdeploy.messages.ResponseType
    token_ids: list


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()


class _WordTokenizer:
    """One token per word; `model.model` stands where lmdeploy's Tokenizer keeps the HF tokenizer."""

    model = SimpleNamespace(model=SimpleNamespace(all_special_tokens=["<s>", "</s>"], added_tokens_decoder={}))

    def encode(self, s: str, add_bos: bool = True, **kw) -> list[int]:
        return ([1] if add_bos else []) + [7] * len(s.split())


def _chatml():
    from lmdeploy.model import BaseChatTemplate  # noqa: PLC0415

    return BaseChatTemplate(
        system="<|im_start|>system\n",
        eosys="<|im_end|>\n",
        user="<|im_start|>user\n",
        eoh="<|im_end|>\n",
        assistant="<|im_start|>assistant\n",
        eoa="<|im_end|>",
        separator="\n",
    )


class _Instance:
    """One of TurboMind's `max_batch_size` model instances (TurboMindInstance): one request at a time."""

    def __init__(self, pipe: FakePipe) -> None:
        self.pipe = pipe
        self._cancel = False
        self._active: asyncio.Event | None = None

    async def async_cancel(self, session_id: int | None = None) -> None:
        """model_inst.cancel(): ends whatever runs on this instance at its next step."""
        self._cancel = True
        self.pipe.cancelled.append(session_id)

    async def async_stream_infer(self, session_id, input_ids, gen_config=None, stream_output=False, **kwargs):
        from lmdeploy.messages import ResponseType  # noqa: PLC0415

        self._cancel = False  # forward() submits the request before the first await, as the real one does
        pipe = self.pipe
        pipe.running.add(session_id)
        limit = min(gen_config.max_new_tokens, pipe.tokens + 1)  # `tokens` words, then EOS
        n = 0
        try:
            while True:
                await asyncio.sleep(pipe.delay_s)  # one decode step of the whole batch
                if self._cancel:
                    yield _EngineOutput(ResponseType.CANCEL, [])
                    break
                n += 1
                done = n >= limit
                yield _EngineOutput(ResponseType.FINISH if done else ResponseType.SUCCESS, [pipe.EOS if n > pipe.tokens else 9])
                if done:
                    break
        except (GeneratorExit, asyncio.CancelledError):
            self._cancel = True
        finally:
            pipe.running.discard(session_id)


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class FakePipe:
    """lmdeploy 0.11.1's AsyncEngine as LmdeployEngine uses it; the time before registration is controllable.

    - `template_s`: templating and tokenizing block lmdeploy's loop this long (they have no await in 0.11.1);
    - `preprocess_s`, `preprocess_gate`: image preprocessing (on the vision encoder's one worker thread) takes
      this long, then waits until the gate is set;
    - `max_batch_size` instances: a request waits for a free one before it is registered.
    `entered[phase]` counts requests that reached 'generate', 'preprocess', 'template', 'instance', 'registered';
    `wait_for(predicate)` blocks until a predicate over the pipe holds.
    """

    EOS = 2

    def __init__(
        self,
        tokens: int = 50,
        delay_s: float = 0.002,
        max_batch_size: int = 8,
        template_s: float = 0.0,
        kind: str = "text",
        tokenizer=None,
        chat_template=None,
        burn_s: float = 0.0,
    ) -> None:
        from lmdeploy.model import MODELS  # noqa: PLC0415

        self.burn_s = burn_s  # Python work per token per reply on lmdeploy's loop, holding the GIL (its detokenizer)
        self.internal_thread = _LoopThread()
        self.tokens, self.delay_s, self.template_s = tokens, delay_s, template_s
        self.instance_num = max_batch_size
        self.instances = [_Instance(self) for _ in range(max_batch_size)]
        self.free_insts: asyncio.Queue | None = None
        self.id2step: dict[int, int] = {}
        self.id2inst: dict[int, _Instance] = {}
        self.chat_template = chat_template or (MODELS.get("llava-v1")() if kind == "vision" else _chatml())
        self.tokenizer = tokenizer or _WordTokenizer()
        self.preprocess_s = 0.0  # image preprocessing + vision encoder time, on the vision thread
        self.preprocess_gate = threading.Event()
        self.preprocess_gate.set()
        self._vision_executor = ThreadPoolExecutor(max_workers=1)  # ImageEncoder's executor
        # what tests read
        self.running: set[int] = set()  # requests the engine is computing
        self.cancelled: list[int] = []  # ids whose instance was cancelled
        self.seen: list = []  # (messages, gen_config as passed)
        self.effective: list = []  # gen_config after lmdeploy's own adjustments
        self.entered: Counter[str] = Counter()
        self._cond = threading.Condition()

    # -- what tests use to time their stops --------------------------------------------------------------------

    def _enter(self, phase: str) -> None:
        with self._cond:
            self.entered[phase] += 1
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[FakePipe], bool], timeout: float = 10.0) -> None:
        """Block until `predicate(self)` holds (checked whenever a request changes phase, and every 10 ms)."""
        end = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                if time.monotonic() > end:
                    raise TimeoutError(f"not reached within {timeout} s; phases so far: {dict(self.entered)}")
                self._cond.wait(0.01)

    def free_instances(self) -> int:
        return self.free_insts.qsize() if self.free_insts is not None else self.instance_num

    # -- AsyncEngine -----------------------------------------------------------------------------------------------

    def _get_free_insts(self) -> asyncio.Queue:
        if self.free_insts is None:
            self.free_insts = asyncio.Queue()
            for inst in self.instances:
                self.free_insts.put_nowait(inst)
        return self.free_insts

    async def stop_session(self, session_id: int) -> None:
        """Cancels only a registered request; any other id is dropped, as lmdeploy 0.11.1 does."""
        inst = self.id2inst.get(session_id)
        if inst:
            await inst.async_cancel(session_id)

    @asynccontextmanager
    async def _model_inst(self, session_id: int):
        assert session_id not in self.id2inst
        free_insts = self._get_free_insts()
        self._enter("instance")
        inst = await free_insts.get()
        inst._active = asyncio.Event()
        self.id2inst[session_id] = inst
        self._enter("registered")
        try:
            yield inst
        except (Exception, asyncio.CancelledError, GeneratorExit):  # noqa: BLE001 - 0.11.1 logs and swallows these
            pass
        finally:
            self.id2inst.pop(session_id)
            inst._active.set()
            free_insts.put_nowait(inst)

    @asynccontextmanager
    async def _safe_run(self, inst: _Instance, session_id: int, **kwargs):
        generator = inst.async_stream_infer(session_id, **kwargs)
        try:
            yield generator
        except (Exception, asyncio.CancelledError, GeneratorExit):
            await inst.async_cancel(session_id)
            raise
        finally:
            await generator.aclose()

    def _preprocess(self) -> None:
        time.sleep(self.preprocess_s)
        self.preprocess_gate.wait()

    async def _get_prompt_input(self, messages, sequence_start: bool) -> list[int]:
        images = sum(
            1
            for m in messages
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] in ("image_url", "image_data")
        )
        if images:
            return await self._vision_prompt_input(messages, sequence_start)
        self._enter("template")
        time.sleep(self.template_s)  # templating + tokenizing: on the loop, no await
        merged = [
            {
                **m,
                "content": m["content"] if isinstance(m["content"], str) else "\n".join(p.get("text", "") for p in m["content"]),
            }
            for m in messages
        ]
        prompt = self.chat_template.messages2prompt(merged, sequence_start)
        return self.tokenizer.encode(prompt, add_bos=sequence_start)

    async def _vision_prompt_input(self, messages, sequence_start: bool) -> list[int]:
        """VLAsyncEngine: preprocess and encode on the vision thread, then lmdeploy's own LLaVA prompt packing."""
        import torch  # noqa: PLC0415
        from lmdeploy.vl.model.base import VisionModel  # noqa: PLC0415
        from lmdeploy.vl.model.llava_hf import LlavaHfVisionModel  # noqa: PLC0415

        self._enter("preprocess")
        await asyncio.get_running_loop().run_in_executor(self._vision_executor, self._preprocess)
        msgs = []
        for m in messages:
            if isinstance(m["content"], list):
                parts = [
                    {"type": "image", "image": p["image_data"]["data"]} if p["type"] == "image_data" else p for p in m["content"]
                ]
                msgs.append({"role": m["role"], "content": parts})
            else:
                msgs.append(m)
        n = sum(1 for m in msgs if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")
        msgs.append({"role": "forward", "content": [torch.zeros(576, 4) for _ in range(n)]})
        self._enter("template")
        time.sleep(self.template_s)
        prompt, image_token = LlavaHfVisionModel.proc_messages(msgs, self.chat_template, sequence_start)
        packed = VisionModel.to_turbomind_aux(
            SimpleNamespace(image_token_id=0), msgs, prompt, image_token, self.tokenizer, sequence_start
        )
        return packed["input_ids"]

    async def generate(
        self,
        messages,
        session_id: int,
        gen_config=None,
        tools=None,
        reasoning_effort=None,
        stream_response: bool = True,
        sequence_start: bool = True,
        sequence_end: bool = True,
        step: int = 0,
        do_preprocess: bool = True,
        adapter_name=None,
        rewind_stop_tokens: bool = False,
        input_ids=None,
        enable_thinking=None,
        chat_template_kwargs=None,
        mm_processor_kwargs=None,
    ):
        """AsyncEngine.generate's keywords. The real one also takes **kwargs and silently drops them; here an
        unknown keyword is a TypeError, so a misspelt one fails a test instead of being ignored."""
        from lmdeploy.messages import GenerationConfig, ResponseType  # noqa: PLC0415

        assert asyncio.get_running_loop() is self.internal_thread.loop, "generate must run on lmdeploy's loop"
        if (messages is not None) ^ (input_ids is None):
            raise ValueError("You must specify exactly one of messages or input_ids")
        self._enter("generate")
        if session_id not in self.id2step:
            self.id2step[session_id] = 0
        if step != 0:
            self.id2step[session_id] = step
        gen_config = GenerationConfig() if gen_config is None else deepcopy(gen_config)
        self.seen.append((messages, deepcopy(gen_config)))
        if not gen_config.do_sample:  # lmdeploy's greedy decode drops these
            gen_config.top_k = 1
            gen_config.temperature = 1.0
            gen_config.repetition_penalty = 1.0
        elif gen_config.random_seed is None and sequence_start:
            gen_config.random_seed = random.getrandbits(64)
        self.effective.append(gen_config)
        if messages:
            input_ids = await self._get_prompt_input(messages, sequence_start)

        async with self._model_inst(session_id) as inst:
            history_len = self.id2step[session_id]
            n_in, n_out, outputs = len(input_ids), 0, None
            async with self._safe_run(
                inst,
                session_id,
                input_ids=input_ids,
                gen_config=gen_config,
                stream_output=stream_response,
                sequence_start=sequence_start,
                sequence_end=sequence_end,
                step=history_len,
            ) as gen:
                async for outputs in gen:
                    if outputs.status not in (ResponseType.SUCCESS, ResponseType.FINISH, ResponseType.CANCEL):
                        break
                    if not outputs.token_ids:
                        continue
                    n_out += len(outputs.token_ids)
                    if outputs.token_ids[-1] == self.EOS:
                        continue
                    _burn(self.burn_s)
                    yield GenOut(f"t{n_out - 1} ", history_len, n_in, n_out)
                if outputs.status == ResponseType.CANCEL:
                    reason = "abort"
                else:
                    reason = "stop" if outputs.token_ids[-1] == self.EOS else "length"
                yield GenOut("", self.id2step[session_id], n_in, n_out - (reason == "stop"), reason)
            if sequence_end:
                self.id2step[session_id] = 0

    def close(self) -> None:
        self.preprocess_gate.set()
        self._vision_executor.shutdown(wait=False)
        self.internal_thread.loop.call_soon_threadsafe(self.internal_thread.loop.stop)


def fake_lmdeploy_engine(
    kind: str = "text", fail: str = "", path=None, cfg=None, backend="turbomind", awq=False, source="", **pipe_kwargs
):
    """LmdeployEngine over a FakePipe, as the engine process builds it for tests ('tests.fakes:fake_lmdeploy_engine');
    takes LmdeployEngine.build's arguments (and ignores them). `fail` raises a RuntimeError with that text instead,
    as a failed lmdeploy build does."""
    from model_loader.engines.turbomind import LmdeployEngine  # noqa: PLC0415

    if fail:
        raise RuntimeError(fail)
    pipe = FakePipe(kind=kind, **pipe_kwargs)
    return LmdeployEngine(pipe, EngineInfo(kind=kind, name=f"fake-{kind}", backend="turbomind"))


_builds = [0]


def slow_second_engine(kind: str = "text", **kwargs):
    """fake_lmdeploy_engine, but the second engine a process builds takes 3 s (a process can die while it builds)."""
    _builds[0] += 1
    if _builds[0] == 2:
        time.sleep(3)
    return fake_lmdeploy_engine(kind=kind, **kwargs)


def vision_build_aborts(kind: str = "text", **kwargs):
    """fake_lmdeploy_engine, but building the vision engine ends the process at once, as TurboMind does when it
    aborts (an allocation it cannot make): the crash repeats at every try."""
    if kind == "vision":
        os._exit(134)
    return fake_lmdeploy_engine(kind=kind, **kwargs)
