"""The app's settings: one frozen dataclass, read from flags and environment in `main()`.

Each field is declared once, with its environment variable and help text; argparse, the environment reader and
the README's table (checked by a test against `--help`) all come from these declarations.
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
KV_QUANTS = ("none", "int8", "int4")
TEXT_KV_QUANTS = (*KV_QUANTS, "auto")  # auto: resolved by the planner (kv_cache.resolve_text_kv_quant)
# "auto" for the text cache: int8 (lossless in lmdeploy's published figures) where it holds this many conversations of
# this many tokens at once, else int4 (up to ~3 points lost, docs/capacity.md), which memory then forces
AUTO_CONVERSATIONS, AUTO_CONVERSATION_TOKENS = 16, 4096
KV_RATIO_FIELDS = {"vision": "kv_ratio", "text": "text_kv_ratio"}  # each engine's share of the memory free


def setting(default, env: str, help: str, choices: tuple[str, ...] | None = None, flag: str = ""):
    """A config field with its environment variable, help text, allowed values and (when not the field's) flag."""
    return dataclasses.field(default=default, metadata={"env": env, "help": help, "choices": choices, "flag": flag})


@dataclass(frozen=True)
class AppConfig:
    """Everything the app needs to decide before it starts; defaults work on an OpenXLab A10 unchanged."""

    text_model: str = setting(
        "internlm/internlm2-chat-1_8b",
        "APP_TEXT_MODEL",
        "InternLM2 chat model: a local directory or a repo id on --hub (fp16 is quantized once).",
    )
    text_awq_repo: str = setting("", "APP_TEXT_AWQ_REPO", "Repo id of a ready 4-bit AWQ InternLM2, tried first.")
    vision_model: str = setting(
        "llava-hf/llava-1.5-7b-hf", "APP_VISION_MODEL", "LLaVA in the llava-hf layout: a local directory or a repo id."
    )
    hub: str = setting("hf", "APP_HUB", "Where repo ids are downloaded from; git lfs is the fallback.", HUBS)
    cache_dir: str = setting(
        "~/.cache/internlm-lmdeploy-chat", "APP_CACHE_DIR", "Where the quantized model (and OpenXLab/git downloads) are kept."
    )
    calib_file: str = setting(
        "", "APP_CALIB_FILE", "UTF-8 text file to calibrate 4-bit quantization on, instead of wikitext2 from the hub."
    )
    enable_text: bool = setting(True, "APP_ENABLE_TEXT", "Serve the text chat tab.")
    enable_vision: bool = setting(True, "APP_ENABLE_VISION", "Serve the image chat tab.")
    kv_ratio: float = setting(
        0.4, "APP_KV_RATIO", "Image engine (LLaVA): share of the GPU memory free when it is built that its KV cache takes."
    )
    text_kv_ratio: float = setting(
        0.7,
        "APP_TEXT_KV_RATIO",
        "Text engine (InternLM2): share of the GPU memory free when it is built that its KV cache takes.",
    )
    text_kv_quant: str = setting(
        "auto",
        "APP_TEXT_KV_QUANT",
        "Text KV cache precision: int8 holds 1.9x the tokens of none (fp16), int4 3.8x; auto: int8 where it holds "
        f"{AUTO_CONVERSATIONS} conversations of {AUTO_CONVERSATION_TOKENS // 1024}k tokens, else int4 (docs/capacity.md).",
        TEXT_KV_QUANTS,
    )
    vision_kv_quant: str = setting("int8", "APP_VISION_KV_QUANT", "Image KV cache precision.", KV_QUANTS)
    text_session_len: int = setting(8192, "APP_TEXT_SESSION_LEN", "Longest text conversation in tokens.")
    vision_session_len: int = setting(4096, "APP_VISION_SESSION_LEN", "Longest image conversation in tokens.")
    text_batch_size: int = setting(32, "APP_TEXT_BATCH_SIZE", "Text requests the engine runs at once.")
    vision_batch_size: int = setting(8, "APP_VISION_BATCH_SIZE", "Image requests the engine runs at once.")
    prefix_caching: bool = setting(True, "APP_PREFIX_CACHING", "Reuse the KV cache of a repeated conversation prefix.")
    load_order: str = setting("auto", "APP_LOAD_ORDER", "Which engine is built first (auto: the planner picks).", LOAD_ORDERS)
    backend: str = setting(
        "turbomind",
        "APP_BACKEND",
        "turbomind (lmdeploy's pipelines, in the engine process by default), or an lmdeploy api_server (--server-url "
        "URL for both models, or one per model below).",
        BACKENDS,
    )
    engine_process: bool = setting(
        True,
        "APP_ENGINE_PROCESS",
        "Run the TurboMind engines in a child process, off the web server's interpreter (docs/throughput.md); "
        "api_server engines are in their servers' processes already.",
    )
    text_server_url: str = setting("", "APP_TEXT_SERVER_URL", "api_server (or proxy) URL for the text model.")
    vision_server_url: str = setting("", "APP_VISION_SERVER_URL", "api_server (or proxy) URL for the vision model.")
    text_server_model: str = setting(
        "", "APP_TEXT_SERVER_MODEL", "Model name behind the proxy for the text tab (default: the server's first)."
    )
    vision_server_model: str = setting(
        "", "APP_VISION_SERVER_MODEL", "Model name behind the proxy for the image tab (default: the server's first)."
    )
    host: str = setting("0.0.0.0", "GRADIO_SERVER_NAME", "Address to listen on.")
    port: int = setting(7860, "GRADIO_SERVER_PORT", "Port to listen on (OpenXLab serves 7860).")
    max_queue: int = setting(256, "APP_MAX_QUEUE", "Requests that may wait in the queue before new ones are refused.")
    max_file_size_mb: int = setting(20, "APP_MAX_FILE_SIZE_MB", "Largest upload accepted, in MB.")
    max_image_pixels: int = setting(40_000_000, "APP_MAX_IMAGE_PIXELS", "Images with more pixels are refused.")
    auth: str = setting("", "APP_AUTH", "Optional login, user:password[,user2:password2]; never logged.")
    gpu_mem_gib: float = setting(
        0.0, "APP_GPU_MEM_GIB", "GPU memory to plan for, in GiB (0: ask the GPU; A10: 22.5).", flag="--gpu-mem"
    )
    log_level: str = setting("INFO", "APP_LOG_LEVEL", "Logging level.")

    def __post_init__(self) -> None:
        for name in KV_RATIO_FIELDS.values():
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {getattr(self, name)}.")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}.")
        for name in ("text_session_len", "vision_session_len", "text_batch_size", "vision_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1.")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1-65535, got {self.port}.")
        if self.auth and ":" not in self.auth:
            raise ConfigError("auth must look like user:password (several separated by commas).")
        urls = {"text": (self.enable_text, self.text_server_url), "vision": (self.enable_vision, self.vision_server_url)}
        if self.backend == "api_server":
            missing = [kind for kind, (enabled, url) in urls.items() if enabled and not url]
            if missing:
                raise ConfigError(
                    f"backend api_server needs a URL for the {' and '.join(missing)} model: --server-url (or "
                    f"--{missing[0]}-server-url), or --no-enable-{missing[0]}.",
                    "Point it at `lmdeploy serve api_server` or its proxy, e.g. http://127.0.0.1:23333.",
                )
        elif any(url for _, url in urls.values()):
            raise ConfigError("A server URL is set but the backend is turbomind: add --backend api_server to use it.")
        if not (self.enable_text or self.enable_vision):
            raise ConfigError("Both models are disabled: enable at least one.")

    @property
    def engines_in_child(self) -> bool:
        """TurboMind's engines are built and run in the engine process (api_server engines never are)."""
        return self.engine_process and self.backend == "turbomind"

    def kv_ratio_for(self, kind: str) -> float:
        """The KV ratio of the 'text' or 'vision' engine."""
        return getattr(self, KV_RATIO_FIELDS[kind])

    def with_kv_ratio(self, kind: str, ratio: float) -> AppConfig:
        """These settings with another KV ratio for one engine (an engine built out of the plan's order)."""
        return dataclasses.replace(self, **{KV_RATIO_FIELDS[kind]: ratio})

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


@dataclass(frozen=True)
class Setting:
    """One configurable field as argparse and the environment reader see it."""

    field: str
    env: str
    kind: type
    help: str
    choices: tuple[str, ...] | None
    flag: str
    default: object


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(
        f.name,
        f.metadata["env"],
        {"str": str, "int": int, "float": float, "bool": bool}[f.type],
        f.metadata["help"],
        f.metadata["choices"],
        f.metadata["flag"] or "--" + f.name.replace("_", "-"),
        f.default,
    )
    for f in dataclasses.fields(AppConfig)
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
    """Flags for every setting, plus the app's actions (--check, --plan, --quantize-only)."""
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Chat with InternLM2-Chat-1.8B (4-bit AWQ) and ask LLaVA about images, served by LMDeploy "
        "TurboMind, in one Gradio app. Every flag also reads the environment variable shown.",
    )
    p.add_argument("--check", action="store_true", help="Resolve and validate both models, print the memory plan, exit.")
    p.add_argument("--plan", action="store_true", help="Print the GPU memory plan and exit (1 if the models do not fit).")
    p.add_argument("--download", action="store_true", help="With --check: download what is missing (else nothing is fetched).")
    p.add_argument(
        "--quantize-only", action="store_true", help="Get the text model as 4-bit AWQ (quantizing it once), print where, exit."
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="With --quantize-only: upload the 4-bit model to this Hugging Face repo (token from HF_TOKEN).",
    )
    p.add_argument("--server-url", default=None, help="Shorthand: the same api_server URL for both models.")
    for s in SETTINGS:
        help_text = f"{s.help} [env {s.env}; default {s.default!r}]"
        if s.kind is bool:
            p.add_argument(s.flag, dest=s.field, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(s.flag, dest=s.field, default=None, type=s.kind, choices=s.choices, help=help_text)
    return p


def from_args(argv: Sequence[str], env: Mapping[str, str]) -> tuple[AppConfig, argparse.Namespace]:
    """Flags win over the environment, which wins over the defaults."""
    ns = build_parser().parse_args(list(argv))
    overrides = {s.field: getattr(ns, s.field) for s in SETTINGS}
    if ns.server_url:
        overrides["text_server_url"] = overrides.get("text_server_url") or ns.server_url
        overrides["vision_server_url"] = overrides.get("vision_server_url") or ns.server_url
    return from_env(env, **overrides), ns
