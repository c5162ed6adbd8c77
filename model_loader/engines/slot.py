"""Where an engine arrives: the UI holds a slot from the first second and the engine lands in it when built."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from model_loader.engines.seam import ChatEngine

log = logging.getLogger(__name__)


@dataclass
class EngineSlot:
    """One engine's life: waiting -> preparing -> loading -> ready | failed (or disabled)."""

    kind: str
    state: str = "waiting"
    message: str = "Waiting to start"
    engine: ChatEngine | None = None
    used_mib_after: float = 0.0

    def say(self, message: str) -> None:
        """Show what the engine is doing now (the tab's banner) and log it."""
        self.message = message
        log.info("[%s] %s", self.kind, message)

    def fail(self, message: str) -> None:
        """The engine will not come: the banner says why (the reason first: a page that sees the state reads it)."""
        self.message = message
        self.state = "failed"
        log.warning("[%s] %s", self.kind, message)

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine is not None
