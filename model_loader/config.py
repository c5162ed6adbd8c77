"""The app's settings: one frozen dataclass, read from flags and environment in `main()`.

Every field has a flag and an environment variable; `SETTINGS` drives both argparse and the README's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from model_loader.errors import ConfigError

HUBS = ("hf", "openxlab", "git")
BACKENDS = ("turbomind", "api_server")
LOAD_ORDERS = ("auto", "vision-first", "text-first")


@dataclass(frozen=True)
class Setting:
    """One configurable field: its flag, env variable, type and help text."""

    field: str
    env: str
    kind: type
    help: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class AppConfig:
    """Everything the app needs to decide before it starts; defaults work on an OpenXLab A10 unchanged."""

    text_model: str = "internlm/internlm2-chat-1_8b"
    text_awq_repo: str = ""
    vision_model: str = "llava-hf/llava-1.5-7b-hf"
    hub: str = "hf"
    cache_dir: str = "~/.cache/internlm-lmdeploy-chat"
    enable_text: bool = True
    enable_vision: bool = True
    kv_ratio: float = 0.4
    text_session_len: int = 8192
    vision_session_len: int = 4096
    text_batch_size: int = 32
    vision_batch_size: int = 8
    prefix_caching: bool = True
    load_order: str = "auto"
    backend: str = "turbomind"
    text_server_url: str = ""
    vision_server_url: str = ""
    host: str = "0.0.0.0"
    port: int = 7860
    max_queue: int = 256
    max_file_size_mb: int = 20
    max_image_pixels: int = 40_000_000
    auth: str = ""
    gpu_mem_gib: float = 0.0
    log_level: str = "INFO"
    bench_ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.kv_ratio < 1.0:
            raise ConfigError(f"kv_ratio must be between 0 and 1, got {self.kv_ratio}.")
        if self.hub not in HUBS:
            raise ConfigError(f"hub must be one of {', '.join(HUBS)}, got {self.hub!r}.")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}.")
        if self.load_order not in LOAD_ORDERS:
            raise ConfigError(f"load_order must be one of {', '.join(LOAD_ORDERS)}, got {self.load_order!r}.")
        for name in ("text_session_len", "vision_session_len", "text_batch_size", "vision_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1.")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1-65535, got {self.port}.")
        if self.auth and ":" not in self.auth:
            raise ConfigError("auth must look like user:password (several separated by commas).")
        if self.backend == "api_server" and not (self.text_server_url or self.vision_server_url):
            raise ConfigError(
                "backend api_server needs --server-url (or --text-server-url / --vision-server-url).",
                "Point it at `lmdeploy serve api_server` or its proxy, e.g. http://127.0.0.1:23333.",
            )
        if not (self.enable_text or self.enable_vision):
            raise ConfigError("Both models are disabled: enable at least one.")

    @property
    def cache_path(self) -> Path:
        """The cache directory with ~ expanded."""
        return Path(os.path.expanduser(self.cache_dir))

    def auth_pairs(self) -> list[tuple[str, str]]:
        """`user:pass,user2:pass2` as Gradio's auth list; empty when no login is wanted."""
        pairs = []
        for item in filter(None, (s.strip() for s in self.auth.split(","))):
            user, _, password = item.partition(":")
            pairs.append((user, password))
        return pairs

    def redacted(self) -> dict[str, object]:
        """The settings as a dict with secrets masked, for logs and the System tab."""
        d = dataclasses.asdict(self)
        if d["auth"]:
            d["auth"] = "***"
        return d


SETTINGS: tuple[Setting, ...] = (
    Setting("text_model", "APP_TEXT_MODEL", str, "InternLM2 chat model: a local directory or a repo id on --hub."),
    Setting("text_awq_repo", "APP_TEXT_AWQ_REPO", str, "Optional repo id of a ready 4-bit AWQ InternLM2 (tried first)."),
    Setting("vision_model", "APP_VISION_MODEL", str, "LLaVA model in the llava-hf layout: a local directory or repo id."),
    Setting("hub", "APP_HUB", str, "Where repo ids are downloaded from; git lfs is the fallback.", HUBS),
    Setting("cache_dir", "APP_CACHE_DIR", str, "Where downloads and the quantized model are kept."),
    Setting("enable_text", "APP_ENABLE_TEXT", bool, "Serve the text chat tab."),
    Setting("enable_vision", "APP_ENABLE_VISION", bool, "Serve the image chat tab."),
    Setting("kv_ratio", "APP_KV_RATIO", float, "Share of free GPU memory each engine gives its KV cache."),
    Setting("text_session_len", "APP_TEXT_SESSION_LEN", int, "Longest text conversation in tokens."),
    Setting("vision_session_len", "APP_VISION_SESSION_LEN", int, "Longest image conversation in tokens."),
    Setting("text_batch_size", "APP_TEXT_BATCH_SIZE", int, "Text requests the engine runs at once."),
    Setting("vision_batch_size", "APP_VISION_BATCH_SIZE", int, "Image requests the engine runs at once."),
    Setting("prefix_caching", "APP_PREFIX_CACHING", bool, "Reuse the KV cache of a repeated conversation prefix."),
    Setting("load_order", "APP_LOAD_ORDER", str, "Which engine is built first (auto: the planner picks).", LOAD_ORDERS),
    Setting("backend", "APP_BACKEND", str, "turbomind in this process, or an lmdeploy api_server.", BACKENDS),
    Setting("text_server_url", "APP_TEXT_SERVER_URL", str, "api_server (or proxy) URL for the text model."),
    Setting("vision_server_url", "APP_VISION_SERVER_URL", str, "api_server (or proxy) URL for the vision model."),
    Setting("host", "GRADIO_SERVER_NAME", str, "Address to listen on."),
    Setting("port", "GRADIO_SERVER_PORT", int, "Port to listen on (OpenXLab serves 7860)."),
    Setting("max_queue", "APP_MAX_QUEUE", int, "Requests that may wait in Gradio's queue before new ones are refused."),
    Setting("max_file_size_mb", "APP_MAX_FILE_SIZE_MB", int, "Largest upload accepted, in MB."),
    Setting("max_image_pixels", "APP_MAX_IMAGE_PIXELS", int, "Images with more pixels are refused (image bombs)."),
    Setting("auth", "APP_AUTH", str, "Optional login, user:password[,user2:password2]; never logged."),
    Setting("gpu_mem_gib", "APP_GPU_MEM_GIB", float, "GPU memory to plan for with --plan (0: ask the GPU)."),
    Setting("log_level", "APP_LOG_LEVEL", str, "Logging level."),
    Setting("bench_ignore_eos", "APP_BENCH_IGNORE_EOS", bool, "Benchmarks only: generate max_new_tokens every time."),
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(setting: Setting, raw: str) -> object:
    if setting.kind is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{setting.env} must be true or false, got {raw!r}.")
    try:
        return setting.kind(raw)
    except ValueError as e:
        raise ConfigError(f"{setting.env}: cannot read {raw!r} as {setting.kind.__name__}.") from e


def from_env(env: Mapping[str, str], **overrides: object) -> AppConfig:
    """Build the config from an environment mapping, then apply explicit overrides (from flags)."""
    values: dict[str, object] = {}
    for s in SETTINGS:
        if env.get(s.env, "") != "":
            values[s.field] = _parse(s, env[s.env])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return AppConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    """Flags for every setting, plus the app's actions (--check, --plan)."""
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Chat with InternLM2-Chat-1.8B (4-bit AWQ) and ask LLaVA about images, served by LMDeploy "
        "TurboMind, in one Gradio app. Every flag also reads the environment variable shown.",
    )
    p.add_argument("--check", action="store_true", help="Resolve and validate both models, print the memory plan, exit.")
    p.add_argument("--plan", action="store_true", help="Print the GPU memory plan and exit (1 if the models do not fit).")
    p.add_argument("--server-url", default=None, help="Shorthand: the same api_server URL for both models.")
    defaults = AppConfig()
    for s in SETTINGS:
        flag = "--" + s.field.replace("_", "-")
        if s.field == "gpu_mem_gib":
            flag = "--gpu-mem"
        default = getattr(defaults, s.field)
        help_text = f"{s.help} [env {s.env}; default {default!r}]"
        if s.kind is bool:
            p.add_argument(flag, dest=s.field, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(flag, dest=s.field, default=None, type=s.kind, choices=s.choices, help=help_text)
    return p


def from_args(argv: Sequence[str], env: Mapping[str, str]) -> tuple[AppConfig, argparse.Namespace]:
    """Flags win over the environment, which wins over the defaults."""
    ns = build_parser().parse_args(list(argv))
    overrides = {s.field: getattr(ns, s.field) for s in SETTINGS}
    if ns.server_url:
        overrides["text_server_url"] = overrides.get("text_server_url") or ns.server_url
        overrides["vision_server_url"] = overrides.get("vision_server_url") or ns.server_url
    return from_env(env, **overrides), ns
