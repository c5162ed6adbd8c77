"""Bring the engines up in the background while the UI is already serving, one slot per engine.

Each slot says what it is doing (downloading, quantizing, loading), then holds a ready engine or the reason it
failed; one engine failing leaves the other usable.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from model_loader import planner
from model_loader.config import AppConfig
from model_loader.engine import ChatEngine
from model_loader.errors import AppError, DoesNotFit
from model_loader.gpu import gpu_memory

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """One engine's life: waiting -> preparing -> loading -> ready | failed (or disabled)."""

    kind: str
    state: str = "waiting"
    message: str = "Waiting to start"
    engine: ChatEngine | None = None
    log: list[str] = field(default_factory=list)
    used_mib_after: float = 0.0
    ignore_eos: bool = False  # benchmarks only (APP_BENCH_IGNORE_EOS)

    def say(self, message: str) -> None:
        self.message = message
        self.log.append(f"{time.strftime('%H:%M:%S')} {message}")
        log.info("[%s] %s", self.kind, message)

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine is not None


@dataclass
class Startup:
    """The slots, the memory plan, and the thread that fills them."""

    cfg: AppConfig
    env: Mapping[str, str]
    slots: dict[str, Slot] = field(default_factory=dict)
    plan: planner.Plan | None = None
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        for kind, enabled in (("text", self.cfg.enable_text), ("vision", self.cfg.enable_vision)):
            self.slots[kind] = Slot(kind) if enabled else Slot(kind, "disabled", "Disabled by configuration")
            self.slots[kind].ignore_eos = self.cfg.bench_ignore_eos

    def start(self) -> threading.Thread:
        """Run `build_all` on a daemon thread and return at once."""
        t = threading.Thread(target=self.build_all, name="engine-startup", daemon=True)
        t.start()
        return t

    def build_all(self) -> None:
        """Resolve, plan and build every enabled engine; failures land in their slot."""
        try:
            if self.cfg.backend == "api_server":
                self._connect_api_servers()
            else:
                self._build_in_process()
        except Exception as e:  # noqa: BLE001 - a bug here must still show in the UI, not kill a thread silently
            log.exception("start-up failed")
            for s in self.slots.values():
                if s.state not in ("ready", "disabled", "failed"):
                    s.state, s.message = "failed", f"Start-up failed: {e}"

    def _connect_api_servers(self) -> None:
        from model_loader.api_engine import ApiServerEngine  # noqa: PLC0415

        urls = {"text": self.cfg.text_server_url, "vision": self.cfg.vision_server_url}
        for kind, slot in self._enabled():
            slot.state = "loading"
            slot.say(f"Connecting to {urls[kind]} ...")
            eng = ApiServerEngine(kind, urls[kind])
            try:
                asyncio.run(eng.connect())
            except AppError as e:
                slot.state, slot.message = "failed", str(e)
                continue
            slot.engine, slot.state = eng, "ready"
            slot.say(f"Ready: {eng.model} behind {urls[kind]}")

    def _enabled(self):
        return [(k, s) for k, s in self.slots.items() if s.state != "disabled"]

    def _build_in_process(self) -> None:
        from model_loader.resolve import resolve_text, resolve_vision  # noqa: PLC0415
        from model_loader.validation import vision_engine_kind  # noqa: PLC0415

        resolved = {}
        for kind, slot in self._enabled():
            slot.state = "preparing"
            try:
                r = (resolve_text if kind == "text" else resolve_vision)(self.cfg, self.env, slot.say)
            except AppError as e:
                slot.state, slot.message = "failed", str(e)
                continue
            resolved[kind] = r
        specs = [planner.spec_from_path(r.path, r.path.name) for r in resolved.values()]
        mem = gpu_memory()
        if mem and specs:
            self.plan = planner.best_plan(specs, mem.total_mib, mem.free_mib, self.cfg.kv_ratio, self.cfg.load_order,
                                            used_mib=mem.used_mib)
            log.info("memory plan:\n%s", planner.format_plan(self.plan))
            if not self.plan.fits:
                err = DoesNotFit("The models do not fit on this GPU at this KV ratio.",
                                 "Ways out: " + "; ".join(self.plan.advice))
                for kind in resolved:
                    self.slots[kind].state, self.slots[kind].message = "failed", str(err)
                return
            order = list(self.plan.order)
        else:
            order = sorted(resolved, key=lambda k: k != "vision")
        from model_loader.turbomind_engine import LmdeployEngine  # noqa: PLC0415

        for kind in order:
            slot, r = self.slots[kind], resolved[kind]
            slot.state = "loading"
            backend = "turbomind" if kind == "text" else vision_engine_kind(r.path)
            slot.say(f"Loading {r.path.name} on {backend} ...")
            try:
                eng = LmdeployEngine.build(kind, r.path, self.cfg, backend=backend, awq=kind == "text",
                                           source=r.source)
            except Exception as e:  # noqa: BLE001 - an engine that fails to build must not take the other down
                log.exception("building the %s engine failed", kind)
                slot.state, slot.message = "failed", f"The {kind} engine failed to start: {e}"
                continue
            after = gpu_memory()
            slot.used_mib_after = after.used_mib if after else 0.0
            slot.engine, slot.state = eng, "ready"
            slot.say(f"Ready on {backend} in {eng.info.load_s:.0f} s")

