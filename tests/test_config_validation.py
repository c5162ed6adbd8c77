"""Settings from env and flags; validation failures each named with file and remedy."""

from __future__ import annotations

import json

import pytest

from model_loader.config import SETTINGS, AppConfig, from_args, from_env
from model_loader.errors import ConfigError
from model_loader.weights.validation import text_model_problems, vision_model_problems


def test_env_then_flags_override():
    cfg, _ = from_args(["--kv-ratio", "0.3"], {"APP_KV_RATIO": "0.5", "GRADIO_SERVER_PORT": "7999", "APP_ENABLE_VISION": "false"})
    assert cfg.kv_ratio == 0.3 and cfg.port == 7999 and cfg.enable_vision is False


def test_each_engine_has_its_kv_ratio_and_the_help_says_which():
    cfg, _ = from_args(["--text-kv-ratio", "0.55"], {"APP_KV_RATIO": "0.3"})
    assert (cfg.kv_ratio, cfg.text_kv_ratio) == (0.3, 0.55)
    assert from_env({"APP_TEXT_KV_RATIO": "0.6"}).text_kv_ratio == 0.6
    assert from_env({"APP_TEXT_KV_QUANT": "auto"}).text_kv_quant == "auto"
    helps = {s.field: s.help for s in SETTINGS}
    assert "LLaVA" in helps["kv_ratio"] and "text" not in helps["kv_ratio"].split("(")[0]
    assert "text engine" in helps["text_kv_ratio"].lower() and "InternLM2" in helps["text_kv_ratio"]
    assert "auto" in helps["text_kv_quant"]


def test_defaults_match_openxlab():
    cfg = from_env({})
    assert (cfg.kv_ratio, cfg.port, cfg.host) == (0.4, 7860, "0.0.0.0")


@pytest.mark.parametrize(
    "env",
    [
        {"APP_KV_RATIO": "1.5"},
        {"APP_TEXT_KV_RATIO": "1.0"},
        {"APP_TEXT_KV_RATIO": "0"},
        {"APP_VISION_KV_QUANT": "auto"},  # auto is the text cache's rule (16 conversations of 4k)
        {"APP_HUB": "nowhere"},
        {"APP_ENABLE_TEXT": "maybe"},
        {"APP_BACKEND": "api_server"},
        {"APP_AUTH": "nopassword"},
        {"APP_BACKEND": "api_server", "APP_TEXT_SERVER_URL": "http://127.0.0.1:23333"},  # vision enabled, no URL
        {"APP_TEXT_SERVER_URL": "http://127.0.0.1:23333"},  # a URL the turbomind backend would ignore
    ],
)
def test_bad_settings_are_named_errors(env):
    with pytest.raises(ConfigError):
        from_env(env)


def test_the_engines_run_in_their_own_process_by_default_and_the_api_server_backend_needs_no_switch():
    """TurboMind runs in a child process unless --no-engine-process (docs/throughput.md, round 5: more tokens/s and a
    sooner first text at 16-32 users); with api_server the engines are in their servers' processes already, so the
    setting has nothing to move and an api_server configuration is valid as it is."""
    assert from_env({}).engine_process and not from_env({"APP_ENGINE_PROCESS": "0"}).engine_process
    urls = {"APP_TEXT_SERVER_URL": "http://a:1", "APP_VISION_SERVER_URL": "http://b:1"}
    served = from_env({"APP_BACKEND": "api_server", **urls})
    assert served.engine_process and not served.engines_in_child and from_env({}).engines_in_child
    cfg, _ = from_args(["--no-engine-process"], {})
    assert not cfg.engine_process


def test_auth_is_redacted():
    cfg = AppConfig(auth="me:secret")
    assert cfg.auth_pairs() == [("me", "secret")] and "secret" not in json.dumps(cfg.redacted())


def test_good_tiny_checkpoints_validate(tiny_models):
    assert text_model_problems(tiny_models["awq"], require_awq=True) == []
    assert text_model_problems(tiny_models["fp16"], require_awq=False) == []
    assert vision_model_problems(tiny_models["llava"]) == []


def _shard(path):
    return sorted(path.glob("model-*.safetensors"))[0]


def test_truncated_shard(tiny_models, copy_model):
    m = copy_model(tiny_models["awq"])
    f = _shard(m)
    f.write_bytes(f.read_bytes()[:-100])
    problems = text_model_problems(m, True)
    assert any(f.name in p and "truncated" in p for p in problems)


def test_missing_shard(tiny_models, copy_model):
    m = copy_model(tiny_models["llava"])
    _shard(m).unlink()
    assert any("missing" in p and "resume" in p for p in vision_model_problems(m))


def test_missing_tokenizer(tiny_models, copy_model):
    m = copy_model(tiny_models["awq"])
    (m / "tokenizer.json").unlink()
    assert any("no tokenizer" in p for p in text_model_problems(m, True))


def test_wrong_architecture(tiny_models, copy_model):
    m = copy_model(tiny_models["awq"])
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (m / "config.json").write_text(json.dumps(cfg))
    assert any("not InternLM2ForCausalLM" in p for p in text_model_problems(m, True))


@pytest.mark.parametrize(
    "q,expect",
    [
        (None, "no quantization_config"),
        ({"quant_method": "gptq", "bits": 4}, "quant_method"),
        ({"quant_method": "awq", "bits": 8}, "bits"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version"),
    ],
)
def test_quantization_config(tiny_models, copy_model, q, expect):
    m = copy_model(tiny_models["awq"])
    cfg = json.loads((m / "config.json").read_text())
    cfg.pop("quantization_config")
    if q:
        cfg["quantization_config"] = q
    (m / "config.json").write_text(json.dumps(cfg))
    assert any(expect in p for p in text_model_problems(m, True))


def test_liuhaotian_layout_is_explained(tiny_models, copy_model):
    m = copy_model(tiny_models["llava"])
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["LlavaLlamaForCausalLM"]
    (m / "config.json").write_text(json.dumps(cfg))
    (p,) = vision_model_problems(m)
    assert "liuhaotian" in p and "llava-hf/llava-1.5-7b-hf" in p


def test_missing_processor_config(tiny_models, copy_model):
    m = copy_model(tiny_models["llava"])
    (m / "preprocessor_config.json").unlink()
    assert any("preprocessor_config.json" in p for p in vision_model_problems(m))
