"""The seam between the UI and whatever runs the model: stream a reply, stop it, describe yourself.

`ui/` depends only on this module. lmdeploy is imported only by the implementations (`turbomind.py`,
`api_server.py`; `process.py` runs `turbomind.py`'s engines in a child process); the test doubles live in
tests/fakes.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class GenSettings:
    """Sampling settings from the UI; temperature 0 means greedy."""

    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 40
    max_new_tokens: int = 1024
    repetition_penalty: float = 1.0
    seed: int = 0  # 0: a new random seed each time
    ignore_eos: bool = False  # benchmarks only

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


def ignored_settings(s: GenSettings) -> list[str]:
    """Names of the settings that change nothing with these values, for the UI to say so.

    Greedy (temperature 0) takes the most likely token, so top-p, top-k and the seed do not matter (the
    repetition penalty still does: lmdeploy_config.generation_config keeps it); top-k 1 is greedy too.
    """
    if not s.do_sample:
        ignored = {"top_p": s.top_p < 1.0, "top_k": s.top_k > 1, "seed": s.seed != 0}
    elif s.top_k == 1:
        ignored = {"temperature": True, "top_p": s.top_p < 1.0}
    else:
        return []
    return [name for name, yes in ignored.items() if yes]


@dataclass(frozen=True)
class Delta:
    """New text of a streamed reply."""

    text: str


@dataclass(frozen=True)
class Stats:
    """The end of a reply: token counts, timings and why it ended ('stop', 'length', 'abort', 'error')."""

    input_tokens: int
    output_tokens: int
    ttft_s: float
    total_s: float
    finish_reason: str
    error: str = ""

    @property
    def tokens_per_s(self) -> float:
        decode = self.total_s - self.ttft_s
        return (self.output_tokens - 1) / decode if self.output_tokens > 1 and decode > 0 else 0.0


# InternLM2's and LLaVA's control tokens, lmdeploy's image placeholder and llava-v1's role markers
COMMON_RESERVED = (
    "<|im_start|>",
    "<|im_end|>",
    "<|action_start|>",
    "<|action_end|>",
    "<|interpreter|>",
    "<|plugin|>",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<pad>",
    "<IMAGE_TOKEN>",
    "USER:",
    "ASSISTANT:",
)


@dataclass
class EngineInfo:
    """What the System tab shows about an engine."""

    kind: str  # "text" or "vision"
    name: str
    backend: str  # "turbomind", "pytorch" or "api_server"
    path: str = ""
    source: str = ""
    session_len: int = 0
    batch_size: int = 0
    load_s: float = 0.0
    # strings user text must not contain as-is: special and added tokens, the image placeholder, plain-text role
    # markers; the UI breaks them up before sending (ui/conversation.neutralize). Engines holding the tokenizer
    # replace this common set with their own (LmdeployEngine); the api_server's tokenizer lives on the server.
    reserved: tuple[str, ...] = COMMON_RESERVED
    capacity: int = 0  # conversations the engine can serve at once (its KV cache and batch); 0 = unknown
    # count_tokens runs the engine's own tokenizer and template; False for an estimate (the api_server's), whose
    # chats are then not judged by the prompt sizes the engine reported (ui/prompt_sizes.py)
    exact_counts: bool = True


@runtime_checkable
class ChatEngine(Protocol):
    """A model that streams replies to OpenAI-style messages; images are PIL images in content parts."""

    info: EngineInfo

    def stream(self, session_id: int, messages: list[dict], settings: GenSettings) -> AsyncIterator[Delta | Stats]:
        """Yield Delta items, then exactly one Stats; cancelling the iterator stops the request."""
        ...

    async def stop(self, session_id: int) -> None:
        """Stop every reply of the session now, whatever phase it is in, freeing its engine slot."""
        ...

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens the messages take once templated (for trimming long conversations)."""
        ...

    def active_sessions(self) -> int:
        """Requests running now."""
        ...
