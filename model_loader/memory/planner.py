"""Predict each engine's GPU memory and KV-cache capacity before building anything.

TurboMind loads the weights, reserves its runtime buffers, then gives the KV cache `ratio` x the memory free at
that moment; each engine has its own ratio (AppConfig.kv_ratio for LLaVA, text_kv_ratio for InternLM2). So the
order matters: the first engine's cache takes a share of a bigger free pool and can leave the second without room
for its weights. All figures are MiB.

Why the 4-bit InternLM2-1.8B is ~1.5 GB and not a quarter of its 3.6 GB fp16 size: only the transformer's linear
layers are 4-bit (plus fp16 scales and zeros per 128 weights); the token embedding and output head (92,544 x
2,048 each) stay fp16, and they are 0.76 GB of it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from model_loader.config import KV_RATIO_FIELDS
from model_loader.memory.kv_cache import (
    CACHE_BLOCK_SEQ_LEN,
    KV_BITS,
    capacity_line,
    kv_bytes_per_token,
    resolve_text_kv_quant,
)

if TYPE_CHECKING:
    from model_loader.config import AppConfig

MIB = 2**20

# Fitted by least squares to the four H100 80GB measurements of the InternLM2 AWQ engine with lmdeploy 0.11.1
# TurboMind (alone in a fresh process at ratios 0.01, 0.4 and 0.8, and built after LLaVA at 0.4; bench/results/):
# what the first engine in a process pays once (CUDA context, cuBLAS, TurboMind's kernels), the memory an engine
# takes before TurboMind sizes its KV cache (`pre_kv`), and what of it stays afterwards (`overhead`).
CUDA_CONTEXT_MIB = 640.0
TEXT_PRE_KV_MIB, TEXT_OVERHEAD_MIB = 330.0, 705.0
# LLaVA beside the A10 ballast. Its pre-KV share: fitted to the KV blocks TurboMind reported it allocated
# (a10-capacity-h200.json: 104 blocks of 32 MiB at ratio 0.4 out of 23,039 MiB free), which also brings the text
# engine built after it within 5% of its reported blocks at every KV setting. Its overhead: what stays besides
# weights and that cache when the text engine is sized (the H200 run: text blocks 161 reported, 161 planned). The
# H100 run left 129 MiB more free after both had answered (engines-h100.json): the plan errs on the safe side.
VISION_PRE_KV_MIB, VISION_OVERHEAD_MIB = 607.0, 1366.0
# What a plan leaves free after both engines, at least: the planner's largest miss on a held-out point was 229 MiB
# (free memory at the end beside the A10 ballast, before the refit; 129 MiB on the safe side since), and LLaVA's
# vision tower keeps more working memory once it has answered (74 MiB measured).
SPARE_MIB = 256.0


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know of one model, read from its config.json."""

    name: str
    kind: str  # "text" or "vision"
    weights_mib: float
    layers: int
    kv_heads: int
    head_dim: int
    runtime_mib: float  # what stays besides weights and KV cache
    pre_kv_mib: float = 0.0  # what is taken before the KV cache is sized from free memory
    kv_quant: str = "none"  # the KV cache's precision: "none" (fp16), "int8" or "int4"

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer, scales included."""
        return kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim, self.kv_quant)

    @property
    def kv_block_bytes(self) -> int:
        """One of TurboMind's KV blocks: CACHE_BLOCK_SEQ_LEN tokens."""
        return self.kv_bytes_per_token * CACHE_BLOCK_SEQ_LEN


@dataclass(frozen=True)
class EnginePlan:
    """One engine's predicted memory."""

    name: str
    kind: str
    free_before_mib: float
    weights_mib: float
    runtime_mib: float
    kv_mib: float
    kv_tokens: int
    fits: bool
    kv_quant: str = "none"
    kv_blocks: int = 0
    kv_bytes_per_token: int = 0
    session_len: int = 0  # the longest conversation the engine must hold (0: not asked)
    ratio: float = 0.0  # the share of `free_before_mib` (less weights and pre-KV memory) its KV cache takes
    kv_quant_why: str = ""  # how "auto" was resolved, for --plan and the System tab

    @property
    def session_fits(self) -> bool:
        return self.kv_tokens >= self.session_len

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.runtime_mib + self.kv_mib


@dataclass(frozen=True)
class Plan:
    """The whole card: engines in load order, what is left, and whether it works."""

    gpu_total_mib: float
    free_at_start_mib: float
    order: tuple[str, ...]
    engines: tuple[EnginePlan, ...]
    spare_mib: float
    fits: bool
    advice: tuple[str, ...] = field(default_factory=tuple)
    used_at_start_mib: float | None = None  # nvidia-smi's "used"; total - free also counts the driver's reserve

    @property
    def ratios(self) -> dict[str, float]:
        """Each engine's KV ratio."""
        return {e.kind: e.ratio for e in self.engines}

    def used_after(self, i: int) -> float:
        """Predicted GPU memory in use after engine i is built (as nvidia-smi shows it)."""
        start = self.gpu_total_mib - self.free_at_start_mib if self.used_at_start_mib is None else self.used_at_start_mib
        return start + CUDA_CONTEXT_MIB + sum(e.total_mib for e in self.engines[: i + 1])


def linear_params(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int) -> int:
    """Parameters in a Llama-style block stack's linear layers (q, k, v, o, gate, up, down)."""
    head_dim = hidden // heads
    attn = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * intermediate
    return layers * (attn + mlp)


def weights_mib(cfg: dict, awq: bool) -> float:
    """Bytes TurboMind holds for the language model's weights."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    lin = linear_params(h, i, heads, kv, layers)
    if awq:
        group = (cfg.get("quantization_config") or {}).get("group_size", 128)
        lin_bytes = lin / 2 + lin / group * 4  # 4-bit weights + fp16 scale and zero per group
    else:
        lin_bytes = lin * 2
    embed_bytes = 2 * vocab * h * 2  # input embedding + output head, fp16
    norm_bytes = (2 * layers + 1) * h * 2
    return (lin_bytes + embed_bytes + norm_bytes) / MIB


def vision_tower_mib(vcfg: dict, text_hidden: int) -> float:
    """CLIP vision tower plus projector, fp16; it runs in PyTorch beside TurboMind."""
    h, i, n = vcfg.get("hidden_size", 1024), vcfg.get("intermediate_size", 4096), vcfg.get("num_hidden_layers", 24)
    patches = (vcfg.get("image_size", 336) // vcfg.get("patch_size", 14)) ** 2 + 1
    params = n * (4 * h * h + 2 * h * i) + patches * h + 3 * 14 * 14 * h
    projector = h * text_hidden + text_hidden * text_hidden
    return (params + projector) * 2 / MIB


def spec_from_config(cfg: dict, name: str) -> ModelSpec:
    """A ModelSpec from a config.json dict (InternLM2 or llava-hf)."""
    if "text_config" in cfg:  # llava-hf
        t = dict(cfg["text_config"])
        t.setdefault("hidden_size", 4096)
        t.setdefault("intermediate_size", 11008)
        t.setdefault("num_attention_heads", 32)
        t.setdefault("num_hidden_layers", 32)
        t.setdefault("vocab_size", 32064)
        w = weights_mib(t, awq=bool(t.get("quantization_config") or cfg.get("quantization_config")))
        w += vision_tower_mib(cfg.get("vision_config", {}), t["hidden_size"])
        kind, runtime, pre_kv = "vision", VISION_OVERHEAD_MIB, VISION_PRE_KV_MIB
    else:
        t = cfg
        w = weights_mib(t, awq=bool(t.get("quantization_config")))
        kind, runtime, pre_kv = "text", TEXT_OVERHEAD_MIB, TEXT_PRE_KV_MIB
    heads = t["num_attention_heads"]
    return ModelSpec(
        name=name,
        kind=kind,
        weights_mib=w,
        layers=t["num_hidden_layers"],
        kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t["hidden_size"] // heads,
        runtime_mib=runtime,
        pre_kv_mib=pre_kv,
    )


def spec_from_path(path: str | Path, name: str) -> ModelSpec:
    """A ModelSpec read from a model directory's config.json."""
    return spec_from_config(json.loads((Path(path) / "config.json").read_text(encoding="utf-8")), name)


# The shipped models' shapes, so `--plan` works before anything is downloaded.
INTERNLM2_1_8B_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "num_hidden_layers": 24,
    "vocab_size": 92544,
}
INTERNLM2_1_8B_AWQ = spec_from_config(
    {**INTERNLM2_1_8B_SHAPE, "quantization_config": {"group_size": 128}}, "internlm2-chat-1_8b (4-bit AWQ)"
)
INTERNLM2_1_8B_FP16 = spec_from_config(INTERNLM2_1_8B_SHAPE, "internlm2-chat-1_8b (fp16)")
LLAVA_1_5_7B = spec_from_config({"text_config": {"vocab_size": 32064}, "vision_config": {}}, "llava-1.5-7b-hf (fp16)")
LLAVA_1_5_7B_AWQ = spec_from_config(
    {"text_config": {"vocab_size": 32064, "quantization_config": {"group_size": 128}}, "vision_config": {}},
    "llava-1.5-7b (4-bit AWQ)",
)


def expected_spec(kind: str, ref: str) -> ModelSpec:
    """The shape of a model before it is here: its config.json when `ref` is a local folder, else the default model's.

    A text model much larger than the 4-bit InternLM2 is an fp16 source, served after quantization: plan the AWQ.
    """
    folder = Path(ref).expanduser()
    if (folder / "config.json").is_file():
        spec = spec_from_path(folder, folder.name)
        if kind == "vision" or spec.weights_mib <= INTERNLM2_1_8B_AWQ.weights_mib * 1.5:
            return spec
    return INTERNLM2_1_8B_AWQ if kind == "text" else LLAVA_1_5_7B


def plan_engine(spec: ModelSpec, free_mib: float, ratio: float, session_len: int = 0) -> EnginePlan:
    """Build one engine out of `free_mib`: weights and runtime first, then whole KV blocks in ratio x what is left.

    It fits when its weights do, its cache holds `session_len`, and what it takes after the cache is sized (runtime
    beyond `pre_kv_mib`) is still there: at a ratio near 1 TurboMind would run out of memory building it."""
    after_weights = free_mib - spec.weights_mib - max(spec.pre_kv_mib, spec.runtime_mib)
    budget = max(0.0, ratio * (free_mib - spec.weights_mib - spec.pre_kv_mib))
    blocks = int(budget * MIB // spec.kv_block_bytes)
    kv_mib = blocks * spec.kv_block_bytes / MIB
    left = free_mib - spec.weights_mib - spec.runtime_mib - kv_mib
    return EnginePlan(
        spec.name,
        spec.kind,
        free_mib,
        spec.weights_mib,
        spec.runtime_mib,
        kv_mib,
        blocks * CACHE_BLOCK_SEQ_LEN,
        after_weights > 0 and left >= 0 and blocks * CACHE_BLOCK_SEQ_LEN >= session_len,
        spec.kv_quant,
        blocks,
        spec.kv_bytes_per_token,
        session_len,
        ratio,
    )


def ratio_of(ratios: Mapping[str, float] | float, kind: str) -> float:
    """One engine's KV ratio: from a mapping by kind, or the same float for every engine."""
    return ratios if isinstance(ratios, int | float) else ratios[kind]


def plan_order(
    specs: list[ModelSpec],
    gpu_total_mib: float,
    free_mib: float,
    ratios: Mapping[str, float] | float,
    min_kv_tokens: dict[str, int] | None = None,
    used_mib: float | None = None,
) -> Plan:
    """Plan engines built in the given order on a card with `free_mib` free, each with its KV ratio (by kind, or one
    for all); it fits when every engine does and SPARE_MIB stay free."""
    min_kv_tokens = min_kv_tokens or {}
    free = free_mib - CUDA_CONTEXT_MIB
    engines = []
    ok = free > 0
    for s in specs:
        e = plan_engine(s, free, ratio_of(ratios, s.kind), min_kv_tokens.get(s.kind, 0))
        engines.append(e)
        ok = ok and e.fits
        free -= e.total_mib
    ok = ok and free >= SPARE_MIB
    return Plan(gpu_total_mib, free_mib, tuple(s.kind for s in specs), tuple(engines), free, ok, used_at_start_mib=used_mib)


def best_plan(
    specs: list[ModelSpec],
    gpu_total_mib: float,
    free_mib: float,
    ratios: Mapping[str, float] | float,
    load_order: str = "auto",
    min_kv_tokens: dict[str, int] | None = None,
    used_mib: float | None = None,
) -> Plan:
    """Pick the load order (the biggest model first unless told), and say what to change when nothing fits."""
    by_kind = {s.kind: s for s in specs}
    if load_order == "text-first":
        orders = [sorted(specs, key=lambda s: s.kind != "text")]
    elif load_order == "vision-first":
        orders = [sorted(specs, key=lambda s: s.kind != "vision")]
    else:
        # the larger model first: its weights need the room that the other's KV cache would take
        orders = [sorted(specs, key=lambda s: -s.weights_mib), sorted(specs, key=lambda s: s.weights_mib)]
    plans = [plan_order(o, gpu_total_mib, free_mib, ratios, min_kv_tokens, used_mib) for o in orders]
    good = [p for p in plans if p.fits]
    if good:
        return good[0]
    ways = advice(specs, by_kind, gpu_total_mib, free_mib, ratios, min_kv_tokens)
    return dataclasses.replace(plans[0], fits=False, advice=tuple(ways))


def ratios_for_order(specs: list[ModelSpec], plan: Plan, order: list[str]) -> dict[str, float] | None:
    """KV ratios that build the engines in `order` yet end with the memory `plan` gives each (same KV caches).

    TurboMind sizes an engine's KV cache as ratio x what is free when it is built, so an engine built earlier than
    planned must ask for a smaller ratio, and the next one then for what the plan gave it out of what is left. Lets
    the text engine come up first (its download is small) while LLaVA still downloads, ending as the plan ends.
    None when some engine would need a ratio outside (0, 1). Each engine keeps the share the plan gave it.
    """
    planned = {e.kind: e for e in plan.engines}
    by_kind = {s.kind: s for s in specs}
    free = plan.free_at_start_mib - CUDA_CONTEXT_MIB
    ratios = {}
    for kind in order:
        e, s = planned[kind], by_kind[kind]
        room = free - s.weights_mib - s.pre_kv_mib
        budget = e.ratio * (e.free_before_mib - s.weights_mib - s.pre_kv_mib)  # before TurboMind's whole blocks
        if free - s.weights_mib - max(s.pre_kv_mib, s.runtime_mib) <= 0 or room <= 0 or not 0 < budget / room < 1:
            return None
        ratios[kind] = budget / room
        free -= e.total_mib
    return ratios


RATIO_TRIALS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
ENGINE_NAMES = {"text": "text engine's", "vision": "image engine's"}


def advice(specs, by_kind, gpu_total_mib, free_mib, ratios, min_kv_tokens) -> list[str]:
    """The ways out when the engines do not fit, each checked with the planner itself."""
    need = dict(min_kv_tokens or {})
    ratios = {s.kind: ratio_of(ratios, s.kind) for s in specs}

    def fits(candidates=specs, r=ratios, sessions=need) -> Plan:
        return plan_order(sorted(candidates, key=lambda s: -s.weights_mib), gpu_total_mib, free_mib, r, sessions)

    out = []
    for kind, now in ratios.items():  # one engine's ratio changed, the other's kept: the flag that changes it
        for r in sorted(set(RATIO_TRIALS) - {now}, key=lambda r: abs(r - now)):
            if fits(r={**ratios, kind: r}).fits:
                field_name = KV_RATIO_FIELDS[kind]
                out.append(f"{'lower' if r < now else 'raise'} the {ENGINE_NAMES[kind]} KV ratio: {flag(field_name)} {r} fits")
                break
    short = [e for e in fits().engines if not e.session_fits and e.kind in by_kind]
    if short:
        out.extend(session_advice(specs, short, fits, need))
    if "vision" in by_kind and by_kind["vision"].weights_mib > LLAVA_1_5_7B_AWQ.weights_mib * 1.2:
        alt = [dataclasses.replace(LLAVA_1_5_7B_AWQ, kv_quant=s.kv_quant) if s.kind == "vision" else s for s in specs]
        if fits(alt).fits:
            out.append("use a 4-bit AWQ LLaVA (--vision-model pointing at an AWQ llava-hf checkpoint)")
    for kind, other in (("text", "vision"), ("vision", "text")):
        if kind in by_kind and plan_order([by_kind[kind]], gpu_total_mib, free_mib, ratios, need).fits:
            out.append(f"serve the {kind} model only ({flag('enable_' + other, negate=True)})")
    if not out:
        out.append("use a GPU with more free memory, or --backend api_server with lmdeploy serving elsewhere")
    return out


def session_advice(specs, short: list[EnginePlan], fits, need: dict[str, int]) -> list[str]:
    """For caches shorter than their session: the KV precision that holds it, and the session lengths that fit."""
    out = []
    alt, flags = list(specs), []
    for e in short:
        for quant in (q for q in ("int8", "int4") if KV_BITS[q] < KV_BITS[e.kv_quant]):
            trial = [dataclasses.replace(s, kv_quant=quant) if s.kind == e.kind else s for s in alt]
            if next(x for x in fits(trial).engines if x.kind == e.kind).session_fits:
                alt = trial
                flags.append(f"{flag(e.kind + '_kv_quant')} {quant}")
                break
    if flags and fits(alt).fits:
        out.append("quantize the KV cache to hold the sessions: " + " ".join(flags))
    shorter = {**need, **{e.kind: e.kv_tokens for e in short if e.kv_tokens}}
    if fits(sessions=shorter).fits:
        lengths = " ".join(f"{flag(e.kind + '_session_len')} {e.kv_tokens}" for e in short)
        out.append(f"shorter sessions fit what the caches hold: {lengths}")
    return out


def flag(field: str, negate: bool = False) -> str:
    """The command-line flag of a config field, as `--help` shows it."""
    from model_loader.config import SETTINGS  # noqa: PLC0415 - config imports nothing of ours but errors

    name = next(s.flag for s in SETTINGS if s.field == field)
    return "--no-" + name[2:] if negate else name


def plan_for_config(
    cfg: AppConfig, specs: list[ModelSpec], gpu_total_mib: float, free_mib: float, used_mib: float | None = None
) -> Plan:
    """The plan for these settings: each engine's KV ratio and precision ("auto" resolved on this plan), and a cache
    that holds its session length."""
    ratios = {kind: cfg.kv_ratio_for(kind) for kind in ("text", "vision")}
    sessions = {"text": cfg.text_session_len, "vision": cfg.vision_session_len}

    def plan(text_quant: str) -> Plan:
        quant = {"text": text_quant, "vision": cfg.vision_kv_quant}
        with_quant = [dataclasses.replace(s, kv_quant=quant[s.kind]) for s in specs]
        return best_plan(with_quant, gpu_total_mib, free_mib, ratios, cfg.load_order, sessions, used_mib)

    if cfg.text_kv_quant != "auto" or not any(s.kind == "text" for s in specs):
        return plan(cfg.text_kv_quant)
    int8 = next(e for e in plan("int8").engines if e.kind == "text")
    quant, why = resolve_text_kv_quant("auto", int8)
    p = plan(quant)
    engines = tuple(dataclasses.replace(e, kv_quant_why=why) if e.kind == "text" else e for e in p.engines)
    return dataclasses.replace(p, engines=engines)


def engine_config(cfg: AppConfig, plan: Plan | None, ratios: Mapping[str, float] | None = None) -> AppConfig:
    """The settings the engines are built with: the text KV precision as the plan resolved it ("auto" -> int8 or
    int4; int8 with no plan), and `ratios` for engines built out of the plan's order."""
    text = next((e for e in plan.engines if e.kind == "text"), None) if plan else None
    quant = text.kv_quant if text else resolve_text_kv_quant(cfg.text_kv_quant, None)[0]
    out = dataclasses.replace(cfg, text_kv_quant=quant)
    for kind, r in (ratios or {}).items():
        out = out.with_kv_ratio(kind, r)
    return out


def format_plan(p: Plan) -> str:
    """The plan as a text table for --plan, --check and the logs."""
    ratios = ", ".join(f"{e.kind} {e.ratio:g}" for e in p.engines)
    lines = [
        f"GPU: {p.gpu_total_mib / 1024:.1f} GiB total, {p.free_at_start_mib / 1024:.1f} GiB free; "
        f"KV ratio: {ratios}; load order: {' then '.join(p.order)}",
        f"{'engine':<34}{'free before':>12}{'weights':>10}{'runtime':>10}{'KV cache':>10}{'KV tokens':>11}{'in use after':>14}",
    ]
    for i, e in enumerate(p.engines):
        lines.append(
            f"{e.name:<34}{e.free_before_mib:>10.0f}M{e.weights_mib:>9.0f}M{e.runtime_mib:>9.0f}M{e.kv_mib:>9.0f}M"
            f"{e.kv_tokens:>11,}{p.used_after(i):>13.0f}M" + ("" if e.fits else "  DOES NOT FIT")
        )
    lines.append(
        f"spare after both: {p.spare_mib:.0f} MiB (at least {SPARE_MIB:.0f} kept) -> {'fits' if p.fits else 'DOES NOT FIT'}"
    )
    lines.extend(f"{e.kind} KV {e.kv_quant_why}" for e in p.engines if e.kv_quant_why)
    lines.extend(capacity_line(e) for e in p.engines)
    for a in p.advice:
        lines.append(f"  way out: {a}")
    return "\n".join(lines)
