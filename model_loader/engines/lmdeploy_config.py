"""The one place that maps the app's settings onto lmdeploy's own config classes."""

from __future__ import annotations

from model_loader.config import AppConfig
from model_loader.engines.seam import GenSettings
from model_loader.memory.kv_cache import CACHE_BLOCK_SEQ_LEN

# TurboMind's online KV-cache quantization: quant_policy 8 is int8, 4 is int4, 0 keeps fp16
QUANT_POLICY = {"none": 0, "int8": 8, "int4": 4}


def quant_policy(cfg: AppConfig, kind: str) -> int:
    """TurboMind's quant_policy for one engine; "auto" must have been resolved by the planner (engine_config)."""
    quant = cfg.text_kv_quant if kind == "text" else cfg.vision_kv_quant
    if quant not in QUANT_POLICY:
        raise ValueError(f"KV precision {quant!r} for the {kind} engine: 'auto' is resolved by planner.engine_config.")
    return QUANT_POLICY[quant]


def turbomind_config(cfg: AppConfig, kind: str, awq: bool = False):
    """TurbomindEngineConfig for the text ('text') or vision ('vision') engine."""
    from lmdeploy import TurbomindEngineConfig  # noqa: PLC0415

    text = kind == "text"
    return TurbomindEngineConfig(
        model_format="awq" if awq else None,
        cache_max_entry_count=cfg.kv_ratio_for(kind),
        session_len=cfg.text_session_len if text else cfg.vision_session_len,
        max_batch_size=cfg.text_batch_size if text else cfg.vision_batch_size,
        # prefix caching makes a growing conversation's next turn cheap; image embeddings are not cached by it
        enable_prefix_caching=cfg.prefix_caching and text,
        quant_policy=quant_policy(cfg, kind),
        cache_block_seq_len=CACHE_BLOCK_SEQ_LEN,  # the planner counts the cache in blocks of this many tokens
    )


def pytorch_config(cfg: AppConfig, kind: str):
    """PytorchEngineConfig with the same KV budget, for LLaVA layouts TurboMind cannot serve."""
    from lmdeploy import PytorchEngineConfig  # noqa: PLC0415

    text = kind == "text"
    return PytorchEngineConfig(
        cache_max_entry_count=cfg.kv_ratio_for(kind),
        session_len=cfg.text_session_len if text else cfg.vision_session_len,
        max_batch_size=cfg.text_batch_size if text else cfg.vision_batch_size,
    )


def generation_config(s: GenSettings):
    """lmdeploy's GenerationConfig; greedy is top-1 sampling, as lmdeploy's own greedy is, so that the
    repetition penalty still applies (lmdeploy 0.11.1 resets it to 1.0 when do_sample is off)."""
    from lmdeploy import GenerationConfig  # noqa: PLC0415

    greedy = not s.do_sample
    return GenerationConfig(
        do_sample=True,
        temperature=1.0 if greedy else s.temperature,
        top_p=1.0 if greedy else s.top_p,
        top_k=1 if greedy else s.top_k,
        max_new_tokens=s.max_new_tokens,
        repetition_penalty=s.repetition_penalty,
        random_seed=None if greedy or not s.seed else s.seed,
        ignore_eos=s.ignore_eos,
    )


def openai_payload(s: GenSettings) -> dict:
    """The same settings for lmdeploy's OpenAI-compatible api_server (which always samples)."""
    greedy = not s.do_sample
    body = dict(
        temperature=1.0 if greedy else s.temperature,
        top_p=1.0 if greedy else s.top_p,
        top_k=1 if greedy else s.top_k,
        max_tokens=s.max_new_tokens,
        repetition_penalty=s.repetition_penalty,
        ignore_eos=s.ignore_eos,
    )
    if s.seed and not greedy:
        body["seed"] = s.seed
    return body
