"""Checks on a model directory, without a GPU and without loading weights.

Each check returns a list of problems; a problem names the file, what is wrong, and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

from model_loader.errors import WeightsInvalid

TEXT_ARCHS = ("InternLM2ForCausalLM",)
VISION_ARCHS = ("LlavaForConditionalGeneration",)
# Layouts TurboMind cannot serve in lmdeploy 0.11.1 but its PyTorch engine can.
PYTORCH_ONLY_VISION_ARCHS = ("LlavaNextForConditionalGeneration",)
LIUHAOTIAN_ARCHS = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
PROCESSOR_FILES = ("preprocessor_config.json",)


def read_config(path: Path) -> tuple[dict | None, list[str]]:
    """config.json as a dict, or the problem that prevents reading it."""
    f = path / "config.json"
    if not f.is_file():
        return None, [f"{f} is missing: this is not a Hugging Face model directory (download it again)"]
    try:
        return json.loads(f.read_text(encoding="utf-8")), []
    except (OSError, ValueError) as e:
        return None, [f"{f} is not valid JSON ({e}); delete it and download again"]


def architectures(cfg: dict) -> list[str]:
    """The architectures a config declares."""
    return list(cfg.get("architectures") or [])


def quantization_problems(cfg: dict, where: Path) -> list[str]:
    """TurboMind 0.11.1 takes AWQ with 4 bits and the gemm packing (what lmdeploy's auto_awq writes)."""
    q = cfg.get("quantization_config")
    if not q:
        return [f"{where} has no quantization_config: this is not a 4-bit AWQ model (let the app quantize it)"]
    problems = []
    if str(q.get("quant_method", "")).lower() != "awq":
        problems.append(f"{where}: quantization_config.quant_method is {q.get('quant_method')!r}, TurboMind needs 'awq'")
    if int(q.get("bits", q.get("w_bit", 0)) or 0) != 4:
        problems.append(f"{where}: quantization_config.bits is {q.get('bits')!r}, TurboMind needs 4")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        problems.append(f"{where}: quantization_config.version is {version!r}, TurboMind needs 'gemm'")
    group = int(q.get("group_size", q.get("q_group_size", 128)) or 0)
    if group != 128:
        problems.append(f"{where}: quantization_config.group_size is {group}, TurboMind needs 128")
    return problems


def safetensors_problem(f: Path) -> str | None:
    """What is wrong with one safetensors file, read by safetensors itself (header, and that it covers the file)."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        with safe_open(str(f), framework="np"):
            return None
    except (SafetensorError, OSError) as e:
        return f"{f.name} is not a complete safetensors file ({e}; truncated download?)"


def shard_problems(path: Path) -> list[str]:
    """Every shard the index names is present, its header readable, and its size what the header says."""
    index = path / "model.safetensors.index.json"
    problems: list[str] = []
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            return [f"{index} is unreadable ({e}); download it again"]
    elif (path / "model.safetensors").is_file():
        names = ["model.safetensors"]
    elif list(path.glob("pytorch_model*.bin")):
        return []  # .bin checkpoints are loaded by torch; only safetensors headers can be checked cheaply
    else:
        return [f"{path} has no model.safetensors nor model.safetensors.index.json: the weights are missing"]
    for name in names:
        f = path / name
        if not f.is_file():
            problems.append(f"{f} is missing (named by the index); the download is incomplete, run again to resume it")
            continue
        err = safetensors_problem(f)
        if err:
            problems.append(f"{path}/{err}; delete it and run again to fetch it anew")
    return problems


def tokenizer_problems(path: Path, need_chat_template: bool) -> list[str]:
    """A tokenizer the engine can load and, for chat models, a chat template."""
    problems = []
    if not any((path / n).is_file() for n in TOKENIZER_FILES):
        problems.append(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); download the model again")
    tc = path / "tokenizer_config.json"
    if not tc.is_file():
        problems.append(f"{tc} is missing; download the model again")
    elif need_chat_template:
        try:
            cfg = json.loads(tc.read_text(encoding="utf-8"))
        except ValueError as e:
            return problems + [f"{tc} is not valid JSON ({e})"]
        if not cfg.get("chat_template") and not (path / "chat_template.jinja").is_file():
            problems.append(f"{tc} has no chat_template; use a chat model (e.g. internlm2-chat-1_8b), not a base model")
    return problems


def folder_config(path: Path) -> tuple[dict | None, list[str]]:
    """A model folder's config.json, or why there is none (not a folder, missing, unreadable)."""
    if not path.is_dir():
        return None, [f"{path} is not a directory"]
    return read_config(path)


def text_model_problems(path: Path, require_awq: bool) -> list[str]:
    """Everything wrong with an InternLM2 chat checkpoint at `path` (fp16 source or AWQ result)."""
    cfg, problems = folder_config(path)
    if cfg is None:
        return problems
    archs = architectures(cfg)
    if not set(archs) & set(TEXT_ARCHS):
        problems.append(
            f"{path / 'config.json'}: architecture {archs or 'missing'} is not InternLM2ForCausalLM; "
            "point --text-model at internlm/internlm2-chat-1_8b or its 4-bit AWQ version"
        )
    if require_awq:
        problems += quantization_problems(cfg, path / "config.json")
    problems += tokenizer_problems(path, need_chat_template=True)
    problems += shard_problems(path)
    return problems


def vision_model_problems(path: Path) -> list[str]:
    """Everything wrong with a llava-hf checkpoint at `path`."""
    cfg, problems = folder_config(path)
    if cfg is None:
        return problems
    archs = architectures(cfg)
    if set(archs) & set(LIUHAOTIAN_ARCHS):
        return [
            f"{path / 'config.json'}: {archs[0]} is the original liuhaotian LLaVA layout, which lmdeploy's TurboMind "
            "does not load here; use the llava-hf layout instead, e.g. --vision-model llava-hf/llava-1.5-7b-hf"
        ]
    if not set(archs) & set(VISION_ARCHS + PYTORCH_ONLY_VISION_ARCHS):
        problems.append(
            f"{path / 'config.json'}: architecture {archs or 'missing'} is not a llava-hf model "
            "(LlavaForConditionalGeneration); use e.g. llava-hf/llava-1.5-7b-hf"
        )
    problems += tokenizer_problems(path, need_chat_template=False)
    for name in PROCESSOR_FILES:
        if not (path / name).is_file():
            problems.append(f"{path / name} is missing: LLaVA needs its image processor config; download again")
    problems += shard_problems(path)
    return problems


def vision_engine_kind(path: Path) -> str:
    """'turbomind' for llava-hf LLaVA-1.5 layouts, 'pytorch' for layouts only lmdeploy's PyTorch engine serves."""
    cfg, _ = read_config(path)
    archs = architectures(cfg or {})
    return "pytorch" if set(archs) & set(PYTORCH_ONLY_VISION_ARCHS) else "turbomind"


def ensure_valid(problems: list[str], path: Path) -> None:
    """Raise WeightsInvalid naming every problem, or return."""
    if problems:
        raise WeightsInvalid(problems, str(path))
