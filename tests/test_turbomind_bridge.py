"""LmdeployEngine over a fake pipeline: generation runs on lmdeploy's loop, deltas reach ours, stop frees it."""

from __future__ import annotations

import asyncio

from model_loader.engines.seam import Delta, EngineInfo, GenSettings, Stats
from model_loader.engines.turbomind import LmdeployEngine, to_lmdeploy_messages
from tests.fakes import FakePipe


def make(tokens=50, delay=0.002):
    pipe = FakePipe(tokens, delay)
    return LmdeployEngine(pipe, EngineInfo(kind="text", name="fake", backend="turbomind")), pipe


def test_stream_delivers_every_token_and_stats():
    eng, pipe = make(40)

    async def run():
        items = [x async for x in eng.stream(1, [{"role": "user", "content": "hi"}], GenSettings())]
        return items

    items = asyncio.run(run())
    text = "".join(i.text for i in items if isinstance(i, Delta))
    assert text.split() == [f"t{i}" for i in range(40)]
    stats = items[-1]
    assert isinstance(stats, Stats) and stats.output_tokens == 40 and stats.finish_reason == "stop"
    assert eng.active_sessions() == 0
    pipe.close()


def test_sampling_settings_reach_lmdeploy():
    eng, pipe = make(3)

    async def run():
        return [
            x
            async for x in eng.stream(
                1, [{"role": "user", "content": "hi"}], GenSettings(temperature=0.7, top_p=0.9, top_k=20, seed=5)
            )
        ]

    asyncio.run(run())
    gen = pipe.seen[-1][1]
    assert gen.do_sample is True and gen.temperature == 0.7 and gen.top_k == 20 and gen.random_seed == 5
    pipe.close()


def test_consumer_leaving_mid_stream_stops_the_request():
    eng, pipe = make(10_000, 0.001)

    async def run():
        agen = eng.stream(7, [{"role": "user", "content": "hi"}], GenSettings())
        async for item in agen:
            if isinstance(item, Delta):
                break
        await agen.aclose()
        for _ in range(200):
            if not pipe.running:
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert pipe.cancelled, "stop_session was not called"
    assert not pipe.running and eng.active_sessions() == 0
    pipe.close()


def test_stop_ends_the_stream_with_abort():
    eng, pipe = make(10_000, 0.001)

    async def run():
        items = []
        async for item in eng.stream(3, [{"role": "user", "content": "hi"}], GenSettings()):
            items.append(item)
            if len(items) == 5:
                await eng.stop(3)
        return items

    items = asyncio.run(run())
    assert items[-1].finish_reason == "abort" and len(items) < 100
    pipe.close()


def test_image_parts_become_lmdeploy_image_data():
    img = object()
    out = to_lmdeploy_messages([{"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image", "image": img}]}])
    assert out[0]["content"][1] == {"type": "image_data", "image_data": {"data": img}}


def test_detokenizing_a_reply_does_not_recompute_the_special_tokens_at_every_token(tiny_models, monkeypatch):
    """transformers rebuilds `all_special_ids` at every access, and lmdeploy's incremental detokenizer asks for it
    for every token of every reply: 17 % of the interpreter at 32 users on the H200 (issue 14). The engine keeps
    the list it had when built; the text it produces stays the same, special tokens still left out."""
    from lmdeploy.tokenizer import DetokenizeState, Tokenizer
    from transformers.tokenization_utils_base import SpecialTokensMixin

    from model_loader.engines.turbomind import keep_special_ids

    def detokenize(tok, ids):
        state, text = DetokenizeState(), ""
        for n in range(1, len(ids) + 1):
            piece, state = tok.detokenize_incrementally(ids[:n], state, skip_special_tokens=True)
            text += piece
        return text

    plain = Tokenizer(str(tiny_models["awq"]))
    ids = plain.encode("hello there, how are you today?", add_bos=False)
    ids = ids[:3] + list(plain.model.model.all_special_ids)[:2] + ids[3:]
    expected = detokenize(plain, ids)

    tok = Tokenizer(str(tiny_models["awq"]))
    keep_special_ids(tok)
    real = SpecialTokensMixin.all_special_tokens
    counted = []
    monkeypatch.setattr(SpecialTokensMixin, "all_special_tokens", property(lambda self: counted.append(1) or real.fget(self)))
    assert detokenize(tok, ids) == expected
    assert not counted, f"the special tokens were rebuilt {len(counted)} times for {len(ids)} tokens"


def test_a_tokenizer_that_keeps_its_special_ids_still_pickles_and_hands_out_copies(tiny_models):
    """The review: the kept tokenizer's class lived only in this process, so pickling it failed, and every caller got
    the same list to change. It pickles as the transformers class it was, and each read is a fresh list."""
    import pickle

    from lmdeploy.tokenizer import Tokenizer

    from model_loader.engines.turbomind import keep_special_ids

    tok = Tokenizer(str(tiny_models["awq"]))
    base = type(tok.model.model)
    keep_special_ids(tok)
    hf = tok.model.model
    ids = hf.all_special_ids
    ids.append(-1)
    assert -1 not in hf.all_special_ids
    back = pickle.loads(pickle.dumps(hf))
    assert type(back) is base and back.all_special_ids == hf.all_special_ids
    some = tok.encode("hello there", add_bos=False)
    assert back.decode(some) == hf.decode(some)
