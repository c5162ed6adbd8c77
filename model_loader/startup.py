"""Bring the engines up in the background while the UI is already serving, one slot per engine.

Both models are fetched at once (one thread each). Each slot says what it is doing (downloading 42%, quantizing
layer 7/24, loading), then holds a ready engine or the reason it failed; one engine failing leaves the other usable.
Engines are built one at a time, as soon as their model is ready: the small text model usually arrives first, and
is built with the KV ratio that leaves LLaVA exactly the room the memory plan gives it (planner.ratios_for_order;
each engine keeps the share of the card the plan gives it at its own ratio),
so the Chat tab answers while LLaVA is still downloading.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model_loader.config import AppConfig
from model_loader.engines.slot import EngineSlot
from model_loader.errors import AppError, DoesNotFit, DriverTooOld, EngineFailed
from model_loader.memory import kv_cache, planner
from model_loader.memory.gpu import gpu_memory

if TYPE_CHECKING:
    from model_loader.engines.process import EngineProcess

log = logging.getLogger(__name__)
# A conversation as the capacity estimate counts it (history and reply): TurboMind admits requests while their
# blocks fit, so this only sets when the page starts saying "waiting for a free slot".
TYPICAL_CONVERSATION_TOKENS = 2048

# What lmdeploy 0.11.1's TurboMind says when the NVIDIA driver is older than the CUDA 12.1+ it links against
OLD_DRIVER_SIGNS = ("cuMulticast", "CUDA driver version is insufficient", "cudaErrorInsufficientDriver")
MIN_DRIVER = "535"
ENGINE_BUILDER = "model_loader.engines.turbomind:LmdeployEngine.build"  # what the engine process calls, by name
# an engine process that dies is started again, up to this many times within the window; then the engines stay down
ENGINE_RESTARTS, ENGINE_RESTART_WINDOW_S = 3, 3600.0
BUILD_RETRIES = 1  # an engine whose build ended the engine process is built once more, then fails


def recent_restarts(times: list[float], now: float, window_s: float) -> int:
    """How many of the restarts at `times` fall within the window before `now` (a crash a week ago does not count
    against one today)."""
    return sum(1 for t in times if now - t < window_s)


Resolver = Callable[[AppConfig, Mapping[str, str], Callable[[str], None]], object]


def driver_version() -> str:
    """The NVIDIA driver's version as NVML reports it, or '' when unknown."""
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML: the message just does not name the version
        return ""


def engine_error(kind: str, e: BaseException) -> AppError | None:
    """A named error for an engine that failed to build in a way the user can fix; None for anything else."""
    text = f"{type(e).__name__}: {e}"
    if any(sign in text for sign in OLD_DRIVER_SIGNS):
        found = driver_version()
        return DriverTooOld(
            f"The {kind} engine cannot start: lmdeploy 0.11.1's TurboMind needs NVIDIA driver {MIN_DRIVER} or newer "
            f"(CUDA 12.1+; it links cuMulticast* driver symbols), and this machine has "
            f"{'driver ' + found if found else 'an older driver'} ({str(e)[:160]}).",
            f"Update the NVIDIA driver to {MIN_DRIVER} or newer (check with nvidia-smi), choose a machine that has it, "
            "or serve the models elsewhere and start this app with --backend api_server --server-url URL.",
        )
    return None


@dataclass
class Startup:
    """The slots, the memory plan, and the threads that fill them."""

    cfg: AppConfig
    env: Mapping[str, str]
    slots: dict[str, EngineSlot] = field(default_factory=dict)
    plan: planner.Plan | None = None
    started_at: float = field(default_factory=time.time)
    ratios: dict[str, float] = field(default_factory=dict)  # KV ratio each engine was (or will be) built with
    _early: list[str] = field(default_factory=list)  # engines built before the plan's turn for them
    _process: EngineProcess | None = None  # the engine process, with --engine-process
    _built: dict[str, tuple[dict, str]] = field(default_factory=dict)  # each engine's build arguments, to rebuild it
    _held: dict = field(default_factory=dict)  # engine process -> the engines built in it, in build order
    _dead: dict = field(default_factory=dict)  # engine process that died -> whether it is started again
    _process_lock: threading.Lock = field(default_factory=threading.Lock)
    _restart_lock: threading.Lock = field(default_factory=threading.Lock)
    _loss_handled: threading.Condition = field(init=False)  # on _restart_lock: a lost process's entry in _dead
    restarts: int = 0  # times the engine process was started again after it died
    _restart_times: list[float] = field(default_factory=list)  # when (time.monotonic)
    _closed: bool = False  # the app is exiting: no engine process is started any more
    _crashed_builds: dict[str, int] = field(default_factory=dict)  # engine -> engine processes that died building it

    def __post_init__(self) -> None:
        self._loss_handled = threading.Condition(self._restart_lock)
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
                self._build_turbomind()
        except Exception as e:  # noqa: BLE001 - a bug here must still show in the UI, not kill a thread silently
            log.exception("start-up failed")
            for s in self.slots.values():
                if s.state not in ("ready", "disabled", "failed"):
                    s.fail(f"Start-up failed: {e}")

    def _connect_api_servers(self) -> None:
        from model_loader.engines.api_server import ApiServerEngine  # noqa: PLC0415

        urls = {"text": self.cfg.text_server_url, "vision": self.cfg.vision_server_url}
        models = {"text": self.cfg.text_server_model, "vision": self.cfg.vision_server_model}
        for kind, slot in self._enabled():
            slot.state = "loading"
            slot.say(f"Connecting to {urls[kind]} ...")
            eng = ApiServerEngine(kind, urls[kind], model=models[kind])
            try:
                asyncio.run(eng.connect())
            except AppError as e:
                slot.fail(str(e))
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

    # --- TurboMind engines -------------------------------------------------------------------------------------

    @staticmethod
    def _resolver(kind: str) -> Resolver:
        from model_loader.weights import resolve  # noqa: PLC0415

        return resolve.resolve_text if kind == "text" else resolve.resolve_vision

    def _fetch(self, kind: str, done: queue.Queue) -> None:
        """Download (and for fp16 text, quantize) one model; report the result or the error to the builder."""
        slot = self.slots[kind]
        slot.state = "preparing"

        def progress(message: str) -> None:
            if slot.state != "failed":  # a slot failed by the plan keeps saying why
                slot.say(message)

        try:
            done.put((kind, self._resolver(kind)(self.cfg, self.env, progress)))
        except BaseException as e:  # noqa: BLE001 - handed to the builder thread, which fails the slot
            done.put((kind, e))

    def _expected_spec(self, kind: str) -> planner.ModelSpec:
        return planner.expected_spec(kind, self.cfg.text_model if kind == "text" else self.cfg.vision_model)

    def _build_turbomind(self) -> None:
        done: queue.Queue = queue.Queue()
        kinds = [k for k, _ in self._enabled()]
        mem = gpu_memory()  # before anything runs: a quantization job on the GPU must not shrink the plan
        for kind in kinds:
            threading.Thread(target=self._fetch, args=(kind, done), name=f"fetch-{kind}", daemon=True).start()
        resolved: dict = {}
        pending, finished = set(kinds), set()  # finished: built or failed
        specs: dict[str, planner.ModelSpec] = {}
        while pending or set(resolved) - finished:
            if pending:
                kind, result = done.get()
                pending.discard(kind)
                if isinstance(result, BaseException):
                    self._fail_fetch(kind, result)
                    finished.add(kind)
                else:
                    resolved[kind] = result
                    specs[kind] = planner.spec_from_path(result.path, result.path.name)
            if mem and self.plan is None and resolved and not self._make_plan(mem, kinds, specs, finished):
                return
            while (kind := self._next_to_build(kinds, resolved, finished, specs)) is not None:
                self._build(kind, resolved[kind])
                finished.add(kind)
            if not pending:
                for kind in set(resolved) - finished:  # the engine it waited for failed: build it now
                    self._build(kind, resolved[kind])
                    finished.add(kind)

    def _engine_process(self) -> EngineProcess:
        """The child process that builds and runs the engines (--engine-process): started at the first build, and
        again at the next one after it died (one process for every thread that asks meanwhile)."""
        from model_loader.engines.process import EngineProcess, EngineProcessGone  # noqa: PLC0415

        with self._process_lock:
            if self._closed:
                raise EngineProcessGone("The app is closing.")
            if self._process is None or self._process.gone:
                process = EngineProcess(self.cfg.log_level, switch_interval_s=sys.getswitchinterval())
                process.on_exit.append(lambda why: self._engines_lost(process, why))
                process.start()
                self._process = process
            return self._process

    def close(self) -> None:
        """The app is exiting: close the engine process, so that its engines free the GPU and its end is not taken
        for a crash; nothing is built again."""
        with self._process_lock:
            process, self._process, self._closed = self._process, None, True
        if process is not None:
            process.close()

    def _engines_lost(self, process: EngineProcess, why: str) -> None:
        """An engine process died (on its reader thread): start one again and rebuild the engines it held, up to
        ENGINE_RESTARTS times within the window; past that they stay down and the tabs say so. An engine it was still building is
        built again by its own builder (`_load`)."""
        with self._restart_lock:
            now = time.monotonic()
            recent = recent_restarts(self._restart_times, now, ENGINE_RESTART_WINDOW_S)
            restart = recent < ENGINE_RESTARTS
            if restart:
                self.restarts += 1
                self._restart_times.append(now)
                recent += 1
            self._dead[process] = restart
            self._loss_handled.notify_all()
            held = self._held.pop(process, [])
        for kind in held:
            if restart:
                self.slots[kind].state = "loading"
                self.slots[kind].say(f"{why} Starting the engines again ({recent} of {ENGINE_RESTARTS} this hour) ...")
            else:
                self.slots[kind].fail(f"{why} Replies cannot be served until the app is restarted.")
        if restart and held:
            threading.Thread(target=self._rebuild, args=(held,), name="engine-restart", daemon=True).start()

    def _rebuild(self, kinds: list[str]) -> None:
        """Build the lost engines again, in the order they were built, with the same settings."""
        for kind in kinds:
            self._load(kind, *self._built[kind])

    def _restarted(self, process: EngineProcess) -> bool:
        """Wait until the loss of `process` has been handled (its reader thread may still be joining it); whether
        it is to be started again."""
        with self._loss_handled:
            self._loss_handled.wait_for(lambda: process in self._dead, timeout=30)
            return self._dead.get(process, False)

    def _fail_fetch(self, kind: str, e: BaseException) -> None:
        slot = self.slots[kind]
        if isinstance(e, AppError):
            slot.fail(str(e))
        else:
            log.error("preparing the %s model failed", kind, exc_info=e)
            slot.fail(f"Preparing the {kind} model failed: {e}")

    def _make_plan(self, mem, kinds, specs, finished) -> bool:
        """Plan the card once the first model is here (the others' shapes are known ahead); False if nothing fits."""
        all_specs = [specs.get(k) or self._expected_spec(k) for k in kinds if k in specs or k not in finished]
        self.plan = planner.plan_for_config(self.cfg, all_specs, mem.total_mib, mem.free_mib, mem.used_mib)
        log.info("memory plan:\n%s", planner.format_plan(self.plan))
        if self.plan.fits:
            return True
        err = DoesNotFit("The models do not fit on this GPU at this KV ratio.", "Ways out: " + "; ".join(self.plan.advice))
        for _, slot in self._enabled():
            if slot.state != "failed":
                slot.fail(str(err))
        return False

    def _next_to_build(self, kinds, resolved, finished, specs) -> str | None:
        """The next engine to build now, or None to wait for a download.

        In plan order; but when the planned-first model is still downloading and nothing is built yet, a model that
        is here goes first with ratios that end where the plan ends.
        """
        ready = [k for k in resolved if k not in finished]
        if not ready:
            return None
        if self.plan is None:
            return ready[0]
        order = [k for k in self.plan.order if k not in finished and self.slots[k].state != "failed"]
        plan_specs = [specs.get(k) or self._expected_spec(k) for k in self.plan.order]
        if not order or order[0] in ready:
            kind = order[0] if order else ready[0]
            if self._early:  # out of the plan's order: this one's ratio from its real shape, as the plan ends
                again = planner.ratios_for_order(plan_specs, self.plan, self._early + [kind])
                if again:
                    self.ratios[kind] = again[kind]
            return kind
        if finished:
            return None
        kind = ready[0]
        ratios = planner.ratios_for_order(plan_specs, self.plan, [kind] + [k for k in order if k != kind])
        if ratios is None:
            self.slots[kind].say(f"Waiting for the {order[0]} model: the memory plan builds it first ...")
            return None
        self.ratios, self._early = ratios, [kind]
        log.info("building %s before %s with KV ratios %s", kind, order[0], ratios)
        return kind

    def _build(self, kind: str, r) -> None:
        from model_loader.weights.validation import vision_engine_kind  # noqa: PLC0415

        slot = self.slots[kind]
        if slot.state == "failed":
            return
        slot.state = "loading"
        backend = "turbomind" if kind == "text" else vision_engine_kind(r.path)
        ratio = self.ratios.get(kind, self.cfg.kv_ratio_for(kind))
        self.ratios[kind] = ratio
        cfg = planner.engine_config(self.cfg, self.plan, {kind: ratio})  # "auto" KV precision as the plan resolved it
        slot.say(f"Loading {r.path.name} on {backend} (KV ratio {ratio:.3f}) ...")
        args = {"kind": kind, "path": r.path, "cfg": cfg, "backend": backend, "awq": kind == "text", "source": r.source}
        self._load(kind, args, backend)

    def _load(self, kind: str, args: dict, backend: str) -> None:
        """Build one engine (here, or in the engine process) and put it in its slot, or say why it failed."""
        from model_loader.engines.process import EngineProcessGone  # noqa: PLC0415

        slot = self.slots[kind]
        process = None
        try:
            if self.cfg.engines_in_child:  # built and run in the child; this process never imports lmdeploy
                process = self._engine_process()
                eng = process.build(kind, ENGINE_BUILDER, args)
            else:
                from model_loader.engines.turbomind import LmdeployEngine  # noqa: PLC0415

                eng = LmdeployEngine.build(**args)
        except Exception as e:  # noqa: BLE001 - an engine that fails to build must not take the other down
            if isinstance(e, EngineProcessGone) and process is not None and self._restarted(process):
                self._crashed_builds[kind] = self._crashed_builds.get(kind, 0) + 1
                if self._crashed_builds[kind] <= BUILD_RETRIES:  # a one-off crash: build it in the next process
                    slot.say(f"{e} Starting the engines again ...")
                    self._load(kind, args, backend)
                    return
                e = EngineFailed(f"{e} It stopped while the {kind} engine was being built, {BUILD_RETRIES + 1} times in a row.")
            log.exception("building the %s engine failed", kind)
            named = engine_error(kind, e)
            slot.fail(str(named) if named else f"The {kind} engine failed to start: {e}")
            return
        self._crashed_builds.pop(kind, None)
        after = gpu_memory()
        slot.used_mib_after = after.used_mib if after else 0.0
        planned = next((e for e in self.plan.engines if e.kind == kind), None) if self.plan else None
        if planned is not None:  # the page says "waiting for a free slot" past this many replies at once
            eng.info.capacity = kv_cache.concurrency_for(planned, TYPICAL_CONVERSATION_TOKENS, eng.info.batch_size)
        if process is not None:
            with self._restart_lock:  # either its loss sees this engine as held, or this sees the loss
                dead = process in self._dead
                if not dead:
                    self._built[kind] = (args, backend)
                    self._held.setdefault(process, []).append(kind)
            if dead:  # died right after building it, before the loss could know
                if self._dead[process]:
                    self._load(kind, args, backend)
                else:
                    slot.fail(f"{process.gone} Replies cannot be served until the app is restarted.")
                return
        slot.engine, slot.state = eng, "ready"
        slot.say(f"Ready on {backend} in {eng.info.load_s:.0f} s")
