"""LmdeployEngine against a faithful lmdeploy 0.11.1 double: a Stop is never lost, ids are reused, settings arrive.

FakePipe (tests/fakes.py) registers a request only after templating, image preprocessing and the wait for a
free instance, and drops stops for ids not registered yet, as lmdeploy 0.11.1 does.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path

import lmdeploy
import pytest
from PIL import Image

from model_loader.engines.seam import Delta, EngineInfo, GenSettings, Stats
from model_loader.engines.turbomind import LmdeployEngine
from tests.fakes import FakePipe

pytestmark = pytest.mark.timeout(60)

TEXT = [{"role": "user", "content": "hi"}]
LONG = GenSettings(max_new_tokens=3000)  # ~3 s of tokens: a lost stop shows as 'length'


def image_question(text: str = "what is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image", "image": Image.new("RGB", (8, 8))}]}]


@pytest.fixture
def make():
    made = []

    def _make(kind: str = "text", **kw) -> tuple[LmdeployEngine, FakePipe]:
        pipe = FakePipe(delay_s=kw.pop("delay_s", 0.001), tokens=kw.pop("tokens", 100_000), kind=kind, **kw)
        made.append(pipe)
        return LmdeployEngine(pipe, EngineInfo(kind=kind, name="fake", backend="turbomind")), pipe

    yield _make
    for pipe in made:
        pipe.close()


async def reached(pipe: FakePipe, predicate) -> None:
    await asyncio.to_thread(pipe.wait_for, predicate)


async def settled(pipe: FakePipe) -> None:
    """Nothing runs in lmdeploy and every instance is back in its pool."""
    await reached(pipe, lambda p: not p.running and not p.id2inst and p.free_instances() == p.instance_num)


def start(eng: LmdeployEngine, sid: int, messages: list[dict], settings: GenSettings = LONG):
    """Consume a stream in a task; returns (task, items so far)."""
    items: list = []

    async def consume():
        async for item in eng.stream(sid, messages, settings):
            items.append(item)
        return items

    return asyncio.create_task(consume()), items


async def until_text(items: list) -> None:
    while not any(isinstance(i, Delta) for i in items):
        await asyncio.sleep(0.001)


def one_stats(items: list) -> Stats:
    stats = [i for i in items if isinstance(i, Stats)]
    assert len(stats) == 1 and items[-1] is stats[0], items[-3:]
    return stats[0]


def test_fake_generate_takes_lmdeploys_keywords():
    """The double's keywords are the installed lmdeploy's, read from its source (it cannot be imported on CPU)."""
    src = Path(lmdeploy.__file__).parent / "serve" / "async_engine.py"
    tree = ast.parse(src.read_text())
    real = next(
        n
        for c in tree.body
        if isinstance(c, ast.ClassDef) and c.name == "AsyncEngine"
        for n in c.body
        if isinstance(n, ast.AsyncFunctionDef) and n.name == "generate"
    )
    real_names = [a.arg for a in real.args.args][1:]
    fake = inspect.signature(FakePipe.generate).parameters
    assert list(fake)[1:] == real_names
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in fake.values())


WINDOWS = ["0 ms", "templating", "waiting for an instance", "image 0 ms", "image preprocessing", "mid-stream"]


@pytest.mark.parametrize("when", WINDOWS)
def test_stop_in_any_window_ends_the_request_with_abort(make, when):
    kind = "vision" if when.startswith("image") else "text"
    eng, pipe = make(kind, max_batch_size=1 if when == "waiting for an instance" else 4, template_s=0.2 * (when == "templating"))
    question = image_question() if kind == "vision" else TEXT

    async def run():
        blocker = None
        if when == "waiting for an instance":  # another user holds the only instance
            blocker, _ = start(eng, 1, TEXT)
            await reached(pipe, lambda p: p.entered["registered"] == 1)
        if when == "image preprocessing":
            pipe.preprocess_gate.clear()
        task, items = start(eng, 2, question)
        await asyncio.sleep(0)  # the stream has begun
        if when == "templating":
            await reached(pipe, lambda p: p.entered["template"] == 1)  # lmdeploy's loop is busy templating now
        elif when == "waiting for an instance":
            await reached(pipe, lambda p: p.entered["instance"] == 2)
        elif when == "image preprocessing":
            await reached(pipe, lambda p: p.entered["preprocess"] == 1)
        elif when == "mid-stream":
            await until_text(items)
        await eng.stop(2)
        pipe.preprocess_gate.set()
        await asyncio.wait_for(task, 20)
        if blocker:
            await eng.stop(1)
            await blocker
        await settled(pipe)
        return items

    items = asyncio.run(run())
    assert one_stats(items).finish_reason == "abort"
    assert eng.active_sessions() == 0


@pytest.mark.parametrize("when", ["image preprocessing", "waiting for an instance"])
def test_reader_leaving_before_registration_never_runs_the_request(make, when):
    """Gradio cancels the event (Stop's `cancels=`, a closed tab) before lmdeploy registered the request."""
    kind = "vision" if when.startswith("image") else "text"
    eng, pipe = make(kind, max_batch_size=1)
    question = image_question() if kind == "vision" else TEXT

    async def run():
        blocker = None
        if when == "waiting for an instance":
            blocker, _ = start(eng, 1, TEXT)
            await reached(pipe, lambda p: p.entered["registered"] == 1)
        else:
            pipe.preprocess_gate.clear()
        task, _ = start(eng, 2, question)
        await reached(pipe, lambda p: p.entered["instance" if blocker else "preprocess"] == (2 if blocker else 1))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pipe.preprocess_gate.set()
        if blocker:
            await eng.stop(1)
            await blocker
        # a later request queues behind the left one (instances and the vision thread are first come, first served)
        pipe.tokens = 3
        after, items = start(eng, 3, question, GenSettings())
        await after
        await settled(pipe)
        return items

    items = asyncio.run(run())
    assert one_stats(items).finish_reason == "stop"
    assert pipe.entered["registered"] == (2 if when == "waiting for an instance" else 1), "the left request ran"


def test_two_replies_of_one_session_are_both_stopped(make):
    eng, pipe = make()

    async def run():
        (t1, i1), (t2, i2) = start(eng, 5, TEXT), start(eng, 5, TEXT)
        await until_text(i1)
        await until_text(i2)
        assert eng.active_sessions() == 2
        await eng.stop(5)
        await asyncio.wait_for(asyncio.gather(t1, t2), 20)
        await settled(pipe)
        return i1, i2

    for items in asyncio.run(run()):
        assert one_stats(items).finish_reason == "abort"


def test_stop_reaches_the_reply_still_running_after_another_of_its_session_ended(make):
    eng, pipe = make()

    async def run():
        short, s_items = start(eng, 5, TEXT, GenSettings(max_new_tokens=3))
        long, l_items = start(eng, 5, TEXT)
        await short
        await until_text(l_items)
        await eng.stop(5)
        await asyncio.wait_for(long, 20)
        await settled(pipe)
        return s_items, l_items

    s_items, l_items = asyncio.run(run())
    assert one_stats(s_items).finish_reason == "length"
    assert one_stats(l_items).finish_reason == "abort"


def test_1000_requests_leave_lmdeploys_id_bookkeeping_bounded(make):
    eng, pipe = make(tokens=3, delay_s=0.0, max_batch_size=8)

    async def run():
        for batch in range(50):
            started = [start(eng, i, TEXT, GenSettings(max_new_tokens=8)) for i in range(20)]
            if batch % 5 == 0:  # some are stopped at once
                await asyncio.sleep(0)
                await asyncio.gather(*[eng.stop(i) for i in range(0, 20, 3)])
            await asyncio.gather(*[t for t, _ in started])
        await settled(pipe)

    asyncio.run(run())
    assert pipe.entered["generate"] >= 900
    assert len(pipe.id2step) <= 20, f"{len(pipe.id2step)} ids kept by lmdeploy"


def test_greedy_keeps_the_repetition_penalty(make):
    """lmdeploy drops the penalty when do_sample is off; greedy must still honour the slider."""
    eng, pipe = make(tokens=2)

    async def run():
        return [x async for x in eng.stream(1, TEXT, GenSettings(temperature=0, repetition_penalty=1.3, top_k=40))]

    asyncio.run(run())
    g = pipe.effective[-1]
    assert g.repetition_penalty == 1.3 and g.top_k == 1


def test_image_questions_get_every_sampling_setting(make):
    eng, pipe = make("vision", tokens=2)
    s = GenSettings(temperature=0.5, top_p=0.6, top_k=7, repetition_penalty=1.2, seed=11, max_new_tokens=99)

    async def run():
        return [x async for x in eng.stream(1, image_question(), s)]

    items = asyncio.run(run())
    assert one_stats(items).finish_reason == "stop"
    g = pipe.effective[-1]
    assert (g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.random_seed, g.max_new_tokens) == (
        0.5,
        0.6,
        7,
        1.2,
        11,
        99,
    )
