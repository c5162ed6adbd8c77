"""The app's settings land in lmdeploy's own config classes (the real ones, imported on CPU)."""

from __future__ import annotations

import pytest
from lmdeploy import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig

from model_loader.config import AppConfig
from model_loader.engines.lmdeploy_config import generation_config, openai_payload, pytorch_config, turbomind_config
from model_loader.engines.seam import GenSettings


def test_turbomind_config_mapping():
    cfg = AppConfig(
        kv_ratio=0.3, text_kv_ratio=0.3, text_kv_quant="int8", text_session_len=4096, text_batch_size=16, vision_batch_size=4
    )
    t = turbomind_config(cfg, "text", awq=True)
    assert isinstance(t, TurbomindEngineConfig)
    assert (t.model_format, t.cache_max_entry_count, t.session_len, t.max_batch_size, t.enable_prefix_caching) == (
        "awq",
        0.3,
        4096,
        16,
        True,
    )
    v = turbomind_config(cfg, "vision")
    assert v.model_format is None and v.max_batch_size == 4 and v.enable_prefix_caching is False
    p = pytorch_config(cfg, "vision")
    assert isinstance(p, PytorchEngineConfig) and p.cache_max_entry_count == 0.3


def test_sampling_really_applies():
    g = generation_config(GenSettings(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=99, seed=3, repetition_penalty=1.1))
    assert isinstance(g, GenerationConfig)
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.max_new_tokens, g.random_seed, g.repetition_penalty) == (
        True,
        0.7,
        0.9,
        20,
        99,
        3,
        1.1,
    )
    greedy = generation_config(GenSettings(temperature=0))
    assert greedy.top_k == 1  # greedy: top-1 (tests/test_generation_settings.py)
    assert openai_payload(GenSettings(temperature=0))["top_k"] == 1


def test_kv_cache_defaults_to_int8_in_the_planners_blocks():
    """docs/capacity.md: int8 KV holds ~1.9x the tokens at no measurable accuracy cost (lmdeploy's evaluation)."""
    from model_loader.memory.kv_cache import CACHE_BLOCK_SEQ_LEN

    cfg = AppConfig(text_kv_quant="int8")
    for kind in ("text", "vision"):
        t = turbomind_config(cfg, kind, awq=kind == "text")
        assert t.quant_policy == 8 and t.cache_block_seq_len == CACHE_BLOCK_SEQ_LEN
    assert turbomind_config(AppConfig(text_kv_quant="none"), "text").quant_policy == 0
    assert turbomind_config(AppConfig(vision_kv_quant="int4"), "vision").quant_policy == 4


def test_each_engine_gets_its_own_kv_ratio():
    """LLaVA's cache takes --kv-ratio, the text engine's --text-kv-ratio, in TurboMind's and PyTorch's configs."""
    cfg = AppConfig(kv_ratio=0.3, text_kv_ratio=0.65, text_kv_quant="int8")
    assert turbomind_config(cfg, "text", awq=True).cache_max_entry_count == 0.65
    assert turbomind_config(cfg, "vision").cache_max_entry_count == 0.3
    assert pytorch_config(cfg, "vision").cache_max_entry_count == 0.3
    assert pytorch_config(cfg, "text").cache_max_entry_count == 0.65


def test_auto_kv_quant_reaches_turbomind_as_the_plan_resolved_it():
    """auto is resolved by the planner; the engine gets int4 (quant_policy 4) on an A10, int8 (8) on 80 GB."""
    from model_loader.memory import planner

    cfg = AppConfig()
    specs = [planner.LLAVA_1_5_7B, planner.INTERNLM2_1_8B_AWQ]
    for gib, policy in ((22.5, 4), (80, 8)):
        plan = planner.plan_for_config(cfg, specs, gib * 1024, gib * 1024)
        built = planner.engine_config(cfg, plan)
        assert turbomind_config(built, "text", awq=True).quant_policy == policy
        assert turbomind_config(built, "vision").quant_policy == 8
    with pytest.raises(ValueError, match="auto"):  # never silently: auto unresolved is a bug, not a precision
        turbomind_config(cfg, "text", awq=True)
