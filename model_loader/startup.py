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

from model_loader.config import AppConfig
from model_loader.engines.slot import EngineSlot
from model_loader.errors import AppError, DoesNotFit
from model_loader.memory import kv_cache, planner
from model_loader.memory.gpu import gpu_memory

log = logging.getLogger(__name__)


@dataclass
class Startup:
    """The slots, the memory plan, and the thread that fills them."""

    cfg: AppConfig
    env: Mapping[str, str]
    slots: dict[str, EngineSlot] = field(default_factory=dict)
    plan: planner.Plan | None = None
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        for kind, enabled in (("text", self.cfg.enable_text), ("vision", self.cfg.enable_vision)):
            self.slots[kind] = EngineSlot(kind) if enabled else EngineSlot(kind, "disabled", "Disabled by configuration")

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
        from model_loader.engines.api_server import ApiServerEngine  # noqa: PLC0415

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

    def system_info(self) -> dict:
        """What the System tab shows, as plain data: the plan, planned vs measured memory, the GPU now, and what
        each KV cache holds (`capacity`: precision, tokens, session length, conversations of 1k and 4k at once)."""
        mem = gpu_memory()
        info: dict = {
            "gpu": None if mem is None else {"name": mem.name, "used_mib": mem.used_mib, "total_mib": mem.total_mib},
            "plan_text": planner.format_plan(self.plan) if self.plan else "",
            "memory": [],
            "kv_tokens": {},
            "capacity": {},
        }
        if self.plan:
            for i, e in enumerate(self.plan.engines):
                info["kv_tokens"][e.kind] = e.kv_tokens
                info["capacity"][e.kind] = kv_cache.capacity(e)
                info["memory"].append({"engine": e.kind, "what": "planned", "MiB": round(self.plan.used_after(i))})
                measured = self.slots[e.kind].used_mib_after
                if measured:
                    info["memory"].append({"engine": e.kind, "what": "measured", "MiB": round(measured)})
        return info

    def _enabled(self):
        return [(k, s) for k, s in self.slots.items() if s.state != "disabled"]

    def _build_in_process(self) -> None:
        from model_loader.weights.resolve import resolve_text, resolve_vision  # noqa: PLC0415
        from model_loader.weights.validation import vision_engine_kind  # noqa: PLC0415

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
            self.plan = planner.best_plan(
                specs, mem.total_mib, mem.free_mib, self.cfg.kv_ratio, self.cfg.load_order, used_mib=mem.used_mib
            )
            log.info("memory plan:\n%s", planner.format_plan(self.plan))
            if not self.plan.fits:
                err = DoesNotFit(
                    "The models do not fit on this GPU at this KV ratio.", "Ways out: " + "; ".join(self.plan.advice)
                )
                for kind in resolved:
                    self.slots[kind].state, self.slots[kind].message = "failed", str(err)
                return
            order = list(self.plan.order)
        else:
            order = sorted(resolved, key=lambda k: k != "vision")
        from model_loader.engines.turbomind import LmdeployEngine  # noqa: PLC0415

        for kind in order:
            slot, r = self.slots[kind], resolved[kind]
            slot.state = "loading"
            backend = "turbomind" if kind == "text" else vision_engine_kind(r.path)
            slot.say(f"Loading {r.path.name} on {backend} ...")
            try:
                eng = LmdeployEngine.build(kind, r.path, self.cfg, backend=backend, awq=kind == "text", source=r.source)
            except Exception as e:  # noqa: BLE001 - an engine that fails to build must not take the other down
                log.exception("building the %s engine failed", kind)
                slot.state, slot.message = "failed", f"The {kind} engine failed to start: {e}"
                continue
            after = gpu_memory()
            slot.used_mib_after = after.used_mib if after else 0.0
            slot.engine, slot.state = eng, "ready"
            slot.say(f"Ready on {backend} in {eng.info.load_s:.0f} s")
