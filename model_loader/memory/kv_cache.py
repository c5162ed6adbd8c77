"""TurboMind's KV cache in numbers: bytes per token of each KV setting, whole blocks, and the conversations a cache
holds at once. Pure; the planner sizes the caches (model_loader/memory/planner.py), this says what fits in them.

The layout is lmdeploy 0.11.1's (src/turbomind/kernels/attention/block.h, models/llama/SequenceManager.cc): blocks
of cache_block_seq_len tokens; per layer, KV head and token, K and V each hold head_dim values of the cache's bits,
and when quantized (quant_policy 8 or 4) an fp16 scale and an fp16 zero each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model_loader.config import AUTO_CONVERSATION_TOKENS, AUTO_CONVERSATIONS

if TYPE_CHECKING:
    from model_loader.memory.planner import EnginePlan

CACHE_BLOCK_SEQ_LEN = 64
KV_BITS = {"none": 16, "int8": 8, "int4": 4}
KV_PARAM_BYTES = 2 * 2  # fp16 scale + fp16 zero, per token, head and K or V
CONVERSATION_SIZES = (1024, 4096)  # what --plan and the System tab count conversations of


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, kv_quant: str = "none") -> int:
    """Bytes one token takes in TurboMind's KV cache at this setting ("none" is fp16), scales and zeros included."""
    params = 0 if kv_quant == "none" else KV_PARAM_BYTES
    return layers * kv_heads * 2 * (head_dim * KV_BITS[kv_quant] // 8 + params)


def conversations_held(engine: EnginePlan, conversation_tokens: int) -> int:
    """How many conversations of this many tokens (history and reply) the cache holds at once, in whole blocks."""
    per_conversation = -(-max(1, conversation_tokens) // CACHE_BLOCK_SEQ_LEN)
    return engine.kv_blocks // per_conversation


def concurrency_for(engine: EnginePlan, conversation_tokens: int, batch_size: int) -> int:
    """Conversations to run at once: what the cache holds, capped by the batch size, and at least one (TurboMind
    still runs one conversation longer than its cache, cut to what fits)."""
    return max(1, min(batch_size, conversations_held(engine, conversation_tokens)))


def resolve_text_kv_quant(setting: str, int8_cache: EnginePlan | None) -> tuple[str, str]:
    """The text cache's precision for `setting`, and why when it was "auto": int8 when the int8 cache (planned at the
    text engine's ratio on this GPU) holds AUTO_CONVERSATIONS conversations of AUTO_CONVERSATION_TOKENS at once, else
    int4; int8 with no plan to go by."""
    if setting != "auto":
        return setting, ""
    if int8_cache is None:
        return "int8", "auto -> int8 (no GPU plan to size it by)"
    held, size = conversations_held(int8_cache, AUTO_CONVERSATION_TOKENS), f"{AUTO_CONVERSATION_TOKENS // 1024}k"
    if held >= AUTO_CONVERSATIONS:
        return "int8", f"auto -> int8 (the int8 cache holds {held} conversations of {size})"
    return "int4", f"auto -> int4 (the int8 cache would hold only {held} conversations of {size})"


def capacity(e: EnginePlan) -> dict:
    """One engine's cache as plain data (for the System tab): tokens, precision and conversations held at once."""
    return {
        "kv_quant": e.kv_quant,
        "kv_quant_why": e.kv_quant_why,
        "kv_ratio": e.ratio,
        "kv_tokens": e.kv_tokens,
        "kv_blocks": e.kv_blocks,
        "kv_bytes_per_token": e.kv_bytes_per_token,
        "session_len": e.session_len,
        "session_fits": e.session_fits,
        "conversations": {f"{n // 1024}k": conversations_held(e, n) for n in CONVERSATION_SIZES},
    }


def capacity_line(e: EnginePlan) -> str:
    """'text cache (int8, 49.5 KiB/token): 21,888 tokens; at once 21 conversations of 1k, 5 of 4k; session ...'."""
    held = [conversations_held(e, n) for n in CONVERSATION_SIZES]
    sizes = [f"{h} of {n // 1024}k" for h, n in zip(held, CONVERSATION_SIZES)]
    sizes[0] = sizes[0].replace(" of ", " conversation of " if held[0] == 1 else " conversations of ", 1)
    session = ""
    if e.session_len:
        session = f"; session {e.session_len:,} " + ("fits" if e.session_fits else "does not fit")
    return (
        f"{e.kind} cache ({e.kv_quant if e.kv_quant != 'none' else 'fp16'}, {e.kv_bytes_per_token / 1024:.1f} KiB/token): "
        f"{e.kv_tokens:,} tokens; at once {', '.join(sizes)}{session}"
    )
