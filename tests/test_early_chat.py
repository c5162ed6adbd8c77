"""Chat before LLaVA arrives: both models are fetched at once, the text engine is built as soon as its model is here,
with a KV ratio that leaves LLaVA what the plan gives it, and LLaVA is built when its download completes. Also: an
NVIDIA driver older than TurboMind needs is named, with the minimum version."""

from __future__ import annotations

import json
import threading
import time

import pytest

from model_loader.config import AppConfig
from model_loader.engines.turbomind import LmdeployEngine
from model_loader.memory import planner
from model_loader.memory.gpu import GpuMemory
from model_loader.startup import Startup
from model_loader.weights import resolve
from model_loader.weights.sources import Resolved
from tests.fakes import FakeEngine
from ui.page import status_line

A10 = GpuMemory("NVIDIA A10", 23028.0, 0.0, 22.5 * 1024)
SPECS = [planner.INTERNLM2_1_8B_AWQ, planner.LLAVA_1_5_7B]


def simulate(specs_in_order, free_at_start, ratios) -> list:
    """What TurboMind would take, engine by engine, built in this order with these ratios (the planner's model)."""
    free = free_at_start - planner.CUDA_CONTEXT_MIB
    out = []
    for s in specs_in_order:
        e = planner.plan_engine(s, free, ratios[s.kind])
        out.append(e)
        free -= e.total_mib
    return out


def test_text_first_ratios_end_where_the_vision_first_plan_ends():
    plan = planner.best_plan(SPECS, A10.total_mib, A10.free_mib, 0.4)
    assert plan.order == ("vision", "text") and plan.fits
    ratios = planner.ratios_for_order(SPECS, plan, ["text", "vision"])
    assert 0 < ratios["text"] < 0.4 and 0 < ratios["vision"] < 1
    text, vision = simulate(SPECS, A10.free_mib, ratios)
    planned = {e.kind: e for e in plan.engines}
    assert text.fits and vision.fits
    assert text.kv_mib == pytest.approx(planned["text"].kv_mib) and vision.kv_mib == pytest.approx(planned["vision"].kv_mib)
    assert text.total_mib + vision.total_mib == pytest.approx(sum(e.total_mib for e in plan.engines))
    # the plain ratio built text-first would not leave LLaVA room on an A10
    assert not planner.plan_order(SPECS, A10.total_mib, A10.free_mib, 0.4).fits


def test_text_first_ratios_with_a_ratio_per_engine():
    """The plan gives LLaVA 0.4 and the text engine 0.7 of what is free when each is built (vision first); built
    text-first, both caches still end the size the plan gives them."""
    ratios_in = {"vision": 0.4, "text": 0.7}
    plan = planner.best_plan(SPECS, A10.total_mib, A10.free_mib, ratios_in)
    assert plan.fits and {e.kind: e.ratio for e in plan.engines} == ratios_in
    ratios = planner.ratios_for_order(SPECS, plan, ["text", "vision"])
    text, vision = simulate(SPECS, A10.free_mib, ratios)
    planned = {e.kind: e for e in plan.engines}
    assert text.kv_mib == pytest.approx(planned["text"].kv_mib) and vision.kv_mib == pytest.approx(planned["vision"].kv_mib)
    assert 0 < ratios["text"] < 0.7 and ratios["vision"] > 0.4
    same = planner.ratios_for_order(SPECS, planner.best_plan(SPECS, A10.total_mib, A10.free_mib, 0.4), ["text", "vision"])
    assert ratios["text"] > same["text"]  # the text engine's larger share shows in its early ratio


def test_no_ratios_when_the_plan_does_not_fit():
    plan = planner.plan_order([planner.LLAVA_1_5_7B, planner.INTERNLM2_1_8B_AWQ], 16 * 1024, 16 * 1024, 0.4)
    assert not plan.fits and planner.ratios_for_order(SPECS, plan, ["text", "vision"]) is None


@pytest.fixture
def full_size_text(tiny_models, copy_model):
    """The tiny AWQ files with the real InternLM2-1.8B shape in config.json: the planner reads only the config."""
    d = copy_model(tiny_models["awq"], "internlm2-chat-1_8b-awq")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=8)
    cfg.update(num_hidden_layers=24, vocab_size=92544)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture
def full_size_vision(tmp_path):
    """A llava-1.5-7b-hf config.json (the engine is faked; the planner reads only the config)."""
    d = tmp_path / "llava-1.5-7b-hf"
    d.mkdir()
    cfg = {"architectures": ["LlavaForConditionalGeneration"], "text_config": {"vocab_size": 32064}, "vision_config": {}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_chat_answers_while_llava_is_still_downloading(full_size_text, full_size_vision, monkeypatch):
    llava_arrives = threading.Event()
    built: list[tuple[str, float]] = []

    def slow_vision(cfg, env, progress=None, **kw):
        progress("Downloading llava-hf/llava-1.5-7b-hf: 40% of 13.2 GB")
        assert llava_arrives.wait(20)
        return Resolved(full_size_vision, "hf", "llava-hf/llava-1.5-7b-hf")

    def text(cfg, env, progress=None, **kw):
        progress("Using cached internlm2-chat-1_8b-awq")
        return Resolved(full_size_text, "cache", "me/internlm2-chat-1_8b-awq")

    def build(kind, path, cfg, backend="turbomind", awq=False, source=""):
        built.append((kind, cfg.kv_ratio_for(kind)))
        return FakeEngine(kind)

    monkeypatch.setattr(resolve, "resolve_vision", slow_vision)
    monkeypatch.setattr(resolve, "resolve_text", text)
    monkeypatch.setattr(LmdeployEngine, "build", staticmethod(build))
    monkeypatch.setattr("model_loader.startup.gpu_memory", lambda: A10)
    # the default LLaVA's shape is what the plan assumes until its files are here
    st = Startup(
        AppConfig(vision_model="llava-hf/llava-1.5-7b-hf", text_model="internlm/internlm2-chat-1_8b", engine_process=False), {}
    )
    st.start()
    assert wait_for(lambda: st.slots["text"].ready), st.slots["text"].message
    vision = st.slots["vision"]
    assert not vision.ready and "Downloading" in status_line(vision) and "40%" in status_line(vision)
    assert status_line(st.slots["text"]) == ""  # the Chat tab shows no banner: it answers
    expected = planner.ratios_for_order(
        [planner.spec_from_path(full_size_text, "t"), planner.LLAVA_1_5_7B], st.plan, ["text", "vision"]
    )
    assert built == [("text", pytest.approx(expected["text"]))] and expected["text"] < 0.4
    llava_arrives.set()
    assert wait_for(lambda: vision.ready), vision.message
    assert built[1] == ("vision", pytest.approx(expected["vision"]))
    text_spec = planner.spec_from_path(full_size_text, "t")
    text_e, vision_e = simulate([text_spec, planner.LLAVA_1_5_7B], A10.free_mib, dict(built))
    # equal up to TurboMind's whole KV blocks (one 64-token block of LLaVA is at most 32 MiB)
    assert text_e.total_mib + vision_e.total_mib == pytest.approx(sum(e.total_mib for e in st.plan.engines), abs=64)


def test_vision_first_when_it_arrives_first(full_size_text, full_size_vision, monkeypatch):
    built = []
    monkeypatch.setattr(resolve, "resolve_vision", lambda cfg, env, progress=None, **kw: Resolved(full_size_vision, "local"))
    text_arrives = threading.Event()

    def slow_text(cfg, env, progress=None, **kw):
        progress("Quantizing: calibrating layer 3/24")
        assert text_arrives.wait(20)
        return Resolved(full_size_text, "quantized")

    monkeypatch.setattr(resolve, "resolve_text", slow_text)
    monkeypatch.setattr(
        LmdeployEngine,
        "build",
        staticmethod(
            lambda kind, path, cfg, **k: built.append((kind, cfg.kv_ratio_for(kind), cfg.text_kv_quant)) or FakeEngine(kind)
        ),
    )
    monkeypatch.setattr("model_loader.startup.gpu_memory", lambda: A10)
    st = Startup(AppConfig(engine_process=False), {})
    st.start()
    assert wait_for(lambda: st.slots["vision"].ready)
    assert "calibrating layer 3/24" in status_line(st.slots["text"])
    text_arrives.set()
    assert wait_for(lambda: st.slots["text"].ready)
    # the plan's own order and each engine's ratio; the text cache's "auto" precision as the A10 plan resolved it
    assert built == [("vision", 0.4, "int4"), ("text", AppConfig().text_kv_ratio, "int4")]
    # each engine says how many replies its cache runs at once; past that the page says "waiting for a free slot"
    text_plan = next(e for e in st.plan.engines if e.kind == "text")
    info = st.slots["text"].engine.info
    assert info.capacity == min(info.batch_size, text_plan.kv_tokens // 2048) > 1


def test_an_old_nvidia_driver_is_named(tiny_models, monkeypatch):
    def build(kind, path, cfg, **k):
        if kind == "text":
            raise ImportError(
                "/usr/lib/python3.10/site-packages/lmdeploy/lib/_turbomind.cpython-310-x86_64-linux-gnu.so: "
                "undefined symbol: cuMulticastCreate"
            )
        return FakeEngine(kind)

    monkeypatch.setattr(LmdeployEngine, "build", staticmethod(build))
    monkeypatch.setattr("model_loader.startup.gpu_memory", lambda: None)
    monkeypatch.setattr("model_loader.startup.driver_version", lambda: "525.147.05")
    st = Startup(AppConfig(text_model=str(tiny_models["awq"]), vision_model=str(tiny_models["llava"]), engine_process=False), {})
    st.build_all()
    msg = st.slots["text"].message
    assert st.slots["text"].state == "failed" and "driver 535 or newer" in msg and "525.147.05" in msg
    assert "nvidia-smi" in msg and st.slots["vision"].ready
