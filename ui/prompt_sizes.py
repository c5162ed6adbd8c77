"""What the engine counted of recent prompts, so that a chat's next turn knows an upper bound of its own size
without asking the engine to count the whole chat again.

The engine reports the prompt's tokens with every reply (lmdeploy's `input_token_len`, Stats.input_tokens). The next
turn of a chat is a prompt it counted, continued: the reply and the new question. Its tokens are at most the counted
ones plus the new messages' bytes and template (conversation.token_upper_bound, which also covers the boundary
between the two). Prompts are known by a digest of their messages, not by the browser session, so a chat reloaded
from the browser continues where it was. At 16 users with 6,000-token chats the count this saves was about 20 ms of
each turn's wait before the engine was asked (bench_app --timeline, H100; issue 14).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator

import orjson

from model_loader.engines.seam import Stats
from ui.conversation import token_upper_bound

PROMPTS_KEPT = 10_000  # digests kept, least recently used out first (about 150 bytes each)


def _prefix_digests(messages: list[dict]) -> Iterator[bytes]:
    """The digest of every prefix of `messages`, shortest first, in one pass; stops at a message orjson cannot
    write (an image object)."""
    h = hashlib.blake2b(digest_size=16)
    for m in messages:
        try:
            data = orjson.dumps(m)
        except TypeError:
            return
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
        yield h.copy().digest()


class PromptSizes:
    """Tokens the engine counted for recent prompts, by a digest of their messages."""

    def __init__(self, prompts: int = PROMPTS_KEPT) -> None:
        self._tokens: OrderedDict[bytes, int] = OrderedDict()
        self._prompts = prompts

    def upper_bound(self, messages: list[dict]) -> int | None:
        """At most this many tokens, when `messages` continue a prompt the engine counted; else None."""
        best = None
        for n, digest in enumerate(_prefix_digests(messages), 1):
            tokens = self._tokens.get(digest)
            if tokens is not None:
                best = (n, digest, tokens)
        if best is None:
            return None
        n, digest, tokens = best
        self._tokens.move_to_end(digest)
        return tokens + token_upper_bound(messages[n:])

    def remember(self, messages: list[dict], tokens: int) -> None:
        """The engine counted `tokens` for the prompt of `messages` (kept unless some message cannot be digested)."""
        last = deque(enumerate(_prefix_digests(messages), 1), maxlen=1)  # the whole prompt's digest
        if tokens <= 0 or not last or last[0][0] != len(messages):
            return
        digest = last[0][1]
        self._tokens[digest] = tokens
        self._tokens.move_to_end(digest)
        while len(self._tokens) > self._prompts:
            self._tokens.popitem(last=False)

    async def observed(self, messages: list[dict], stream: AsyncIterator) -> AsyncIterator:
        """`stream` passed on as it is; the prompt's size is remembered from its Stats."""
        try:
            async for item in stream:
                if isinstance(item, Stats) and item.finish_reason != "error":
                    self.remember(messages, item.input_tokens)
                yield item
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
