"""The one place that maps the app's settings onto lmdeploy's own config classes."""

from __future__ import annotations

from model_loader.config import AppConfig
from model_loader.engines.seam import GenSettings
from model_loader.memory.kv_cache import CACHE_BLOCK_SEQ_LEN

# TurboMind's online KV-cache quantization: quant_policy 8 is int8, 4 is int4, 0 keeps fp16
QUANT_POLICY = {"none": 0, "int8": 8, "int4": 4}


def turbomind_config(cfg: AppConfig, kind: str, awq: bool = False):
    """TurbomindEngineConfig for the text ('text') or vision ('vision') engine."""
    from lmdeploy import TurbomindEngineConfig  # noqa: PLC0415

    text = kind == "text"
    return TurbomindEngineConfig(
        model_format="awq" if awq else None,
        cache_max_entry_count=cfg.kv_ratio,
        session_len=cfg.text_session_len if text else cfg.vision_session_len,
        max_batch_size=cfg.text_batch_size if text else cfg.vision_batch_size,
        # prefix caching makes a growing conversation's next turn cheap; image embeddings are not cached by it
        enable_prefix_caching=cfg.prefix_caching and text,
        quant_policy=QUANT_POLICY[cfg.text_kv_quant if text else cfg.vision_kv_quant],
        cache_block_seq_len=CACHE_BLOCK_SEQ_LEN,  # the planner counts the cache in blocks of this many tokens
    )


def pytorch_config(cfg: AppConfig, kind: str):
    """PytorchEngineConfig with the same KV budget, for LLaVA layouts TurboMind cannot serve."""
    from lmdeploy import PytorchEngineConfig  # noqa: PLC0415

    text = kind == "text"
    return PytorchEngineConfig(
        cache_max_entry_count=cfg.kv_ratio,
        session_len=cfg.text_session_len if text else cfg.vision_session_len,
        max_batch_size=cfg.text_batch_size if text else cfg.vision_batch_size,
    )


def generation_config(s: GenSettings):
    """lmdeploy 0.11.1 decodes greedily unless do_sample=True, so sampling is switched on explicitly."""
    from lmdeploy import GenerationConfig  # noqa: PLC0415

    return GenerationConfig(
        do_sample=s.do_sample,
        temperature=s.temperature if s.do_sample else 1.0,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
        repetition_penalty=s.repetition_penalty,
        random_seed=s.seed or None,
        ignore_eos=s.ignore_eos,
    )


def openai_payload(s: GenSettings) -> dict:
    """The same settings for lmdeploy's OpenAI-compatible api_server."""
    # the api_server always samples; greedy is top_k 1 there
    body = dict(
        temperature=s.temperature if s.do_sample else 1.0,
        top_p=s.top_p,
        top_k=s.top_k if s.do_sample else 1,
        max_tokens=s.max_new_tokens,
        repetition_penalty=s.repetition_penalty,
        ignore_eos=s.ignore_eos,
    )
    if s.seed:
        body["seed"] = s.seed
    return body
