"""What the engine counted of each chat's last prompt, so that the next turn knows an upper bound of its own size
without asking the engine to count the whole chat again.

The engine reports the prompt's tokens with every reply (lmdeploy's `input_token_len`, Stats.input_tokens). The next
turn of the same chat is that prompt continued: the reply and the new question. Its tokens are at most the counted
ones plus the new messages' bytes and template (conversation.token_upper_bound, which also covers the boundary
between the two). Checking that the chat continues the counted prompt takes a digest of the earlier messages, in C.
At 16 users with 6,000-token chats the count it saves was about 20 ms of each turn's wait before the engine was
asked (bench_app --timeline, H100; issue 14).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator

import orjson

from model_loader.engines.seam import Stats
from ui.conversation import token_upper_bound

CHATS_KEPT = 10_000  # chats remembered, least recently used out first (about 200 bytes each)


def _digest(messages: list[dict]) -> bytes | None:
    try:
        return hashlib.blake2b(orjson.dumps(messages), digest_size=16).digest()
    except TypeError:  # an image object: not remembered
        return None


class PromptSizes:
    """Per chat (streaming.chat_key): how many messages the engine was last given, their digest, and the tokens it
    counted."""

    def __init__(self, chats: int = CHATS_KEPT) -> None:
        self._seen: OrderedDict[str, tuple[int, bytes, int]] = OrderedDict()
        self._chats = chats

    def upper_bound(self, key: str, messages: list[dict]) -> int | None:
        """At most this many tokens, when `messages` continue the chat's last counted prompt; else None."""
        seen = self._seen.get(key)
        if seen is None:
            return None
        n, digest, tokens = seen
        if len(messages) < n or _digest(messages[:n]) != digest:
            return None
        self._seen.move_to_end(key)
        return tokens + token_upper_bound(messages[n:])

    def remember(self, key: str, messages: list[dict], tokens: int) -> None:
        digest = _digest(messages)
        if digest is None or tokens <= 0:
            return
        self._seen[key] = (len(messages), digest, tokens)
        self._seen.move_to_end(key)
        while len(self._seen) > self._chats:
            self._seen.popitem(last=False)

    async def observed(self, key: str, messages: list[dict], stream: AsyncIterator) -> AsyncIterator:
        """`stream` passed on as it is; the prompt's size is remembered from its Stats."""
        try:
            async for item in stream:
                if isinstance(item, Stats) and item.finish_reason != "error":
                    self.remember(key, messages, item.input_tokens)
                yield item
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
