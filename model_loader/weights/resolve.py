"""Resolve both models to validated local directories, in the order the issue asks for."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from model_loader.config import AppConfig
from model_loader.errors import AppError, NotDownloaded, WeightsInvalid
from model_loader.weights import sources
from model_loader.weights.quantize import ensure_awq
from model_loader.weights.sources import Resolved
from model_loader.weights.validation import read_config, text_model_problems, vision_model_problems

log = logging.getLogger(__name__)

# (fp16 source, progress) -> the 4-bit model's directory
Quantize = Callable[[Resolved, Callable[[str], None]], Path]


def _text_any(path: Path) -> list[str]:
    """An InternLM2 checkpoint that is either AWQ already or fp16 to quantize."""
    return text_model_problems(path, require_awq=False)


def quantizer(cfg: AppConfig, env: Mapping[str, str]) -> Quantize:
    """lmdeploy's auto_awq into the cache, keyed by the source (its revision, or its files), on --calib-file if set."""

    def quantize(src: Resolved, progress: Callable[[str], None]) -> Path:
        name = src.repo.rsplit("/", 1)[-1] if src.repo else src.path.name
        return ensure_awq(
            src.path, cfg.cache_path, progress, name=name, revision=src.revision, calib_file=cfg.calib_file, env=env
        )

    return quantize


def resolve_text(
    cfg: AppConfig,
    env: Mapping[str, str],
    progress: Callable[[str], None] = log.info,
    quantize: Quantize | None = None,
    download_ok: bool = True,
) -> Resolved:
    """Local directory; else a pre-quantized repo; else the fp16 repo, quantized once and cached."""
    cache = cfg.cache_path
    if sources.is_local(cfg.text_model):
        r = sources.fetch_model(cfg.text_model, cache, cfg.hub, env, _text_any, progress, download_ok)
    else:
        r = None
        if cfg.text_awq_repo:
            try:
                r = sources.fetch_model(
                    cfg.text_awq_repo,
                    cache,
                    cfg.hub,
                    env,
                    lambda p: text_model_problems(p, require_awq=True),
                    progress,
                    download_ok,
                )
            except NotDownloaded:
                raise
            except AppError as e:
                log.warning("pre-quantized %s unavailable (%s); falling back to %s", cfg.text_awq_repo, e, cfg.text_model)
        if r is None:
            r = sources.fetch_model(cfg.text_model, cache, cfg.hub, env, _text_any, progress, download_ok)
    config, _ = read_config(r.path)
    if config and config.get("quantization_config"):
        problems = text_model_problems(r.path, require_awq=True)
        if problems:
            raise WeightsInvalid(problems, str(r.path))
        return r
    return Resolved((quantize or quantizer(cfg, env))(r, progress), "quantized", r.repo or str(r.path), r.revision)


def resolve_vision(
    cfg: AppConfig, env: Mapping[str, str], progress: Callable[[str], None] = log.info, download_ok: bool = True
) -> Resolved:
    """A llava-hf directory or repo id, validated."""
    return sources.fetch_model(cfg.vision_model, cfg.cache_path, cfg.hub, env, vision_model_problems, progress, download_ok)
