"""The seam between the UI and whatever runs the model: stream a reply, stop it, describe yourself.

`ui/` depends only on this module. lmdeploy is imported only by the implementations
(`turbomind_engine.py`, `api_engine.py`); the test double lives in tests/.
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
    capacity: int = 0  # conversations the engine can serve at once (its KV cache and batch); 0 = unknown


@runtime_checkable
class ChatEngine(Protocol):
    """A model that streams replies to OpenAI-style messages; images are PIL images in content parts."""

    info: EngineInfo

    def stream(self, session_id: int, messages: list[dict], settings: GenSettings) -> AsyncIterator[Delta | Stats]:
        """Yield Delta items, then exactly one Stats; cancelling the iterator stops the request."""
        ...

    async def stop(self, session_id: int) -> None:
        """Stop the session's request now, freeing its engine slot."""
        ...

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens the messages take once templated (for trimming long conversations)."""
        ...

    def active_sessions(self) -> int:
        """Requests running now."""
        ...
