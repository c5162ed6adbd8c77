"""Browser-like users of the app: a Page is one tab (its load events make the session, then turns on it, and its
timers), built on the SSE client in bench/sse_client.py; plus waiting for the app and reading Gradio's own timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx

from bench.sse_client import chat_result, fn_index, post_once_more, stream_call
from bench.workload import history_of, question

BROWSER_WAIT_S = 600  # the longest a measuring process waits for the others
# a browser's connections to one host (HTTP/1.1); each page has its own pool, as each person has a browser: one pool
# shared by every page made httpx scan all its connections at every request, which held back 32 users' turn starts
BROWSER_CONNECTIONS = 6
BROWSER_LIMITS = httpx.Limits(max_connections=BROWSER_CONNECTIONS, keepalive_expiry=2.0)  # idle ones close before uvicorn's 5 s
WALL = time.time() - time.perf_counter()  # perf_counter marks as wall-clock time, to join with the app's (timeline)


def deps_where(config: dict, event: str) -> list[dict]:
    """The page's dependencies triggered by an event name ('load', 'tick', ...)."""
    return [d for d in config["dependencies"] if any(t[1] == event for t in d.get("targets") or [])]


def then_steps(config: dict, fn_id: int) -> list[dict]:
    """The `.then` steps that follow a dependency, in order (what one user action really runs)."""
    out, nxt = [], fn_id
    while True:
        step = next((d for d in config["dependencies"] if d.get("trigger_after") == nxt), None)
        if step is None:
            return out
        out.append(step)
        nxt = step["id"]


def input_defaults(config: dict, dep: dict) -> list:
    """What the page would send for a dependency's inputs before the user touched anything."""
    values = {c["id"]: (c.get("props") or {}).get("value") for c in config["components"]}
    return [values.get(i) for i in dep.get("inputs") or []]


def enter_event(config: dict, box: str = "chat-input") -> int:
    """The server event that Enter in the chat box runs (the page's turn; it has no API name)."""
    ids = {c["id"] for c in config["components"] if (c.get("props") or {}).get("elem_id") == box}
    for d in config["dependencies"]:
        if d.get("backend_fn") and any(t[0] in ids and t[1] == "submit" for t in d.get("targets") or []):
            return d["id"]
    raise KeyError(f"no server event on Enter in #{box}")


def timers(config: dict) -> dict[int, dict]:
    """The page's timers by component id: their interval and whether they start active."""
    return {
        c["id"]: {"every": (c.get("props") or {}).get("value") or 1.0, "active": (c.get("props") or {}).get("active", True)}
        for c in config["components"]
        if c.get("type") == "timer"
    }


class Page:
    """One browser tab: a session hash made at page load, the page's load events, then turns on that session.

    A browser runs `queue=False` events as POST /run/predict and queued ones through /queue/join and the session's
    SSE stream. A turn is what Enter runs in the page: the `send` event (the lock before it runs in the page only),
    plus anything chained after it. Timers tick while active, and stop when an event's output turns them off."""

    def __init__(self, http: httpx.AsyncClient, url: str, config: dict) -> None:
        self.http, self.url, self.config = http, url, config
        self.session = uuid.uuid4().hex[:11]
        self.send = enter_event(config)
        self.send_dep = next(d for d in config["dependencies"] if d["id"] == self.send)
        steps = then_steps(config, self.send)  # a page runs js-only steps itself, with no request
        self.after_send = [d for d in steps if d.get("backend_fn") and not d.get("trigger_only_on_failure")]
        self.timers = timers(config)
        self.ticks = deps_where(config, "tick")

    def _follow_timers(self, dep: dict, outputs: list) -> None:
        """Timers an event's outputs turned on or off (gr.Timer(active=...)), as the page applies them."""
        for comp, value in zip(dep.get("outputs") or [], outputs or []):
            if comp in self.timers and isinstance(value, dict):
                if "active" in value:
                    self.timers[comp]["active"] = bool(value["active"])
                if isinstance(value.get("value"), (int, float)):  # gr.Timer(10): a new period
                    self.timers[comp]["every"] = float(value["value"])

    async def predict(self, index: int, data: list) -> list:
        body = {"data": data, "fn_index": index, "session_hash": self.session, "event_data": None, "trigger_id": None}
        r = await post_once_more(self.http, self.url + "gradio_api/run/predict", body)
        r.raise_for_status()
        out = r.json()["data"]
        dep = next((d for d in self.config["dependencies"] if d["id"] == index), {})
        self._follow_timers(dep, out)
        return out

    async def load(self) -> float:
        """The page's load events, as a browser runs them on opening the page; returns their wall time (s)."""
        t0 = time.perf_counter()
        loads = [d for d in deps_where(self.config, "load") if d.get("backend_fn")]  # js-only ones run in the page
        await asyncio.gather(*[self.predict(d["id"], input_defaults(self.config, d)) for d in loads])
        return time.perf_counter() - t0

    async def turn(self, history: list, text: str, max_new: int = 256, seen: list | None = None) -> dict:
        """Type a message and press Enter: first text is timed from the submit, as the user waits for it. `seen`
        gets the outputs after each streamed update (sse_client.stream_call)."""
        t0 = time.perf_counter()
        data = [text, history, "", 0.0, 0.8, 40, max_new, 1.0, 0]
        data += [None] * (len(self.send_dep["inputs"]) - len(data))  # the page's State (`sent`) sends null
        call = await stream_call(self.http, self.url, self.send, data, self.session, chat_output=1, seen=seen)
        outputs = call["outputs"] or [None, history]
        self._follow_timers(self.send_dep, outputs)
        for dep in self.after_send:
            await self.predict(dep["id"], input_defaults(self.config, dep))
        res = chat_result(call, stats_output=2)
        first = call["first"] or call["end"]
        res["first_ms"] = round(1000 * (first - t0), 1) if call["first"] else None
        res["bytes"] = call["bytes"]
        res["session"], res["event_id"], res["wall_t0"] = self.session, call["event_id"], t0 + WALL
        res["wall_first"] = call["first"] + WALL if call["first"] else None
        res["wall_end"] = call["end"] + WALL
        res["history"] = outputs[1]
        res["t0_pc"], res["end_pc"] = t0, call["end"]
        return res

    async def poll(self, stop: asyncio.Event, opened_s_ago: float = 0.0) -> int:
        """The page's timers, as an open tab runs them, until `stop`; returns how many ticks were sent. A browser's
        timer fires one period after the page opens, then every period: a page opened `opened_s_ago` seconds ago
        is somewhere in its period already (the idle pages of a run were opened at different times)."""
        n, step = 0, 0.25
        start = time.perf_counter()
        due = {t: start + x["every"] - opened_s_ago % x["every"] for t, x in self.timers.items()}
        while not stop.is_set():
            now = time.perf_counter()
            for d in self.ticks:
                t = (d.get("targets") or [[None]])[0][0]
                if self.timers.get(t, {}).get("active") and now >= due.get(t, 0.0):
                    every = self.timers[t]["every"]
                    due[t] = now + every
                    await self.predict(d["id"], input_defaults(self.config, d))
                    n += 1
                    if self.timers[t]["every"] != every:  # the tick gave the timer a new period: it starts now
                        due[t] = time.perf_counter() + self.timers[t]["every"]
            try:
                await asyncio.wait_for(stop.wait(), step)
            except asyncio.TimeoutError:
                pass
        return n


def text_history(messages: list[dict]) -> list[dict]:
    """Engine-style messages as a Chatbot value (what the page holds after earlier turns)."""
    return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]


async def users_on_pages(
    url: str,
    users: int,
    turns: int,
    max_new: int,
    histories: list[list] | None = None,
    new_visitors: bool = False,
    idle_pages: int = 0,
    first_user: int = 0,
    ready: Callable[[], Awaitable[None]] | None = None,
    hold: Callable[[], Awaitable[None]] | None = None,
    settle_s: float = 0.0,
) -> tuple[list[dict], float, dict]:
    """`users` open pages (loaded before the clock starts, unless they are new visitors), then `turns` turns each
    at once, while `idle_pages` more pages stay open and run their timers as a browser does; returns every turn's
    result, the wall time, and page-load timings (and the idle pages' ticks, and the wall clock at start and end).

    Users are numbered from `first_user` (their questions and `histories` are theirs); `ready`, when given, is
    awaited once the pages are loaded, before the clock starts (users_in_browsers lines processes up with it), and
    `hold` once the users are done, before the idle pages close. `settle_s`: the pause between the pages' load and
    the first press (a person reads the page first; 0 presses at once)."""
    async with contextlib.AsyncExitStack() as browsers:

        async def browser() -> httpx.AsyncClient:
            """A page's own connections, closed when the run ends."""
            return await browsers.enter_async_context(httpx.AsyncClient(timeout=600, limits=BROWSER_LIMITS))

        async with httpx.AsyncClient(timeout=60) as http:
            config = (await http.get(url + "config")).json()
        pages = [Page(await browser(), url, config) for _ in range(users)]
        loads: list[float] = []
        if not new_visitors:
            loads = list(await asyncio.gather(*[p.load() for p in pages]))
        idle = [Page(await browser(), url, config) for _ in range(idle_pages)]
        await asyncio.gather(*[p.load() for p in idle])
        stop_idle = asyncio.Event()
        opened = random.Random(len(idle))  # when each idle page was opened, the same in every run
        polling = [asyncio.ensure_future(p.poll(stop_idle, opened.uniform(0, 3600))) for p in idle]

        async def one(i: int, page: Page) -> list[dict]:
            out = []
            if new_visitors:
                out_load = await page.load()
                loads.append(out_load)
            history = list((histories or [[]] * users)[i])
            for t in range(turns):
                r = await page.turn(history, question(first_user + i, t)["content"], max_new)
                history = r.pop("history")
                r["turn"] = t
                r["start_s"], r["end_s"] = r.pop("t0_pc") - t0, r.pop("end_pc") - t0  # after the run began
                out.append(r)
            return out

        try:
            await asyncio.sleep(settle_s)
            if ready is not None:
                await ready()
            t0 = time.perf_counter()
            per_user = await asyncio.gather(*[one(i, p) for i, p in enumerate(pages)])
            wall = time.perf_counter() - t0
            if hold is not None:
                await hold()
        except BaseException:  # a user's failure ends the run: the idle pages stop before their browsers close
            for task in polling:
                task.cancel()
            await asyncio.gather(*polling, return_exceptions=True)
            raise
        stop_idle.set()
        ticks = sum(await asyncio.gather(*polling))
    loads_ms = sorted(round(1000 * x, 1) for x in loads)
    stamps = {"wall_start": t0 + WALL, "wall_end": t0 + wall + WALL}
    out = {"page_load_ms": loads_ms, "idle_pages": len(idle), "idle_ticks": ticks, **stamps}
    return [t for ts in per_user for t in ts], wall, out


def users_in_browsers(
    url: str, users: int, turns: int, max_new: int, per_process: int = 0, **kw
) -> tuple[list[dict], float, dict]:
    """users_on_pages with the users spread over processes of `per_process` each (0: all in one), and idle pages
    in a process of their own, started together once every page is loaded; the wall time runs from the users'
    first start to their last end.

    Each person has a browser of their own. One Python process playing 32 of them parses every stream and sends
    every request on one interpreter, and at each turn's end all 32 send their next message at once: that queue is
    the measuring client's, not the app's. Likewise 100 idle pages' timers, looping beside the users in one process,
    delay the users' own requests and reading without costing the app anything."""
    idle = kw.pop("idle_pages", 0)
    size = per_process if per_process > 0 else max(1, users)
    slices = [(s, min(size, users - s)) for s in range(0, users, size)]
    if len(slices) == 1 and not idle:
        return asyncio.run(users_on_pages(url, users, turns, max_new, **kw))
    import multiprocessing  # noqa: PLC0415
    from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(len(slices) + bool(idle), mp_context=ctx) as pool:
        barrier, done = manager.Barrier(len(slices) + bool(idle)), manager.Event()
        jobs = []
        for first, n in slices:
            part = dict(kw)
            if kw.get("histories") is not None:
                part["histories"] = kw["histories"][first : first + n]
            jobs.append(pool.submit(_browser, url, n, turns, max_new, first, barrier, None, part))
        idle_job = pool.submit(_browser, url, 0, 0, max_new, users, barrier, done, {"idle_pages": idle}) if idle else None
        try:
            results = [j.result() for j in jobs]
        finally:
            done.set()  # the idle pages close however the users' part ended
        idle_out = idle_job.result()[2] if idle_job else {"idle_ticks": 0, "idle_pages": 0}
    turns_out = [t for r in results for t in r[0]]
    start, end = min(r[2]["wall_start"] for r in results), max(r[2]["wall_end"] for r in results)
    loads = {
        "page_load_ms": sorted(x for r in results for x in r[2]["page_load_ms"]),
        "idle_pages": idle_out["idle_pages"],
        "idle_ticks": idle_out["idle_ticks"],
        "wall_start": start,
        "wall_end": end,
    }
    return turns_out, end - start, loads


def _browser(url: str, users: int, turns: int, max_new: int, first_user: int, barrier, done, kw: dict):
    """One process of users_in_browsers: its pages, started when every process has loaded its own; a process of
    idle pages keeps them open until `done` is set."""

    async def ready() -> None:
        await asyncio.to_thread(barrier.wait, BROWSER_WAIT_S)

    async def hold() -> None:
        await asyncio.to_thread(done.wait, BROWSER_WAIT_S)

    try:
        hold_on = hold if done is not None else None
        return asyncio.run(users_on_pages(url, users, turns, max_new, first_user=first_user, ready=ready, hold=hold_on, **kw))
    except BaseException:
        barrier.abort()  # the others stop waiting for this one (BrokenBarrierError) instead of hanging
        raise


async def app_conversations(url: str, users: int, history_tokens: int, turns: int, max_new: int, count_tokens) -> tuple:
    """a10_capacity --via app: users with `history_tokens` of earlier conversation on their page, `turns` turns."""
    histories = [text_history(history_of(u, history_tokens, count_tokens)) for u in range(users)]
    turns_out, wall, _ = await users_on_pages(url, users, turns, max_new, histories)
    return turns_out, wall


async def wait_ready(url: str, timeout_s: float = 300) -> dict:
    """Wait until the page serves and every engine is ready, failed or disabled; returns the timings."""
    t0 = time.perf_counter()
    ui_s = None
    async with httpx.AsyncClient(timeout=30) as http:
        while time.perf_counter() - t0 < timeout_s:
            try:
                config = (await http.get(url + "config")).json()
                ui_s = ui_s or time.perf_counter() - t0
                call = await stream_call(http, url, fn_index(config, "status"), [])
                status = (call["outputs"] or [{}])[0]
                if status and all(v["state"] in ("ready", "failed", "disabled") for v in status.values()):
                    return {"ui_up_s": round(ui_s, 1), "ready_s": round(time.perf_counter() - t0, 1), "status": status}
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"the app at {url} was not ready in {timeout_s:.0f} s")


async def gradio_phases(http: httpx.AsyncClient, url: str, fn_name: str = "chat", clear: bool = True) -> dict:
    """Gradio's own per-event timings (the app started with GRADIO_PROFILING=1) for one function since the last
    clear: medians of queue wait and total, and the per-update postprocess + diff cost in ms."""
    r = await http.get(url + "gradio_api/profiling/traces")
    if r.status_code != 200:
        return {"error": f"profiling off ({r.status_code}): start the app with GRADIO_PROFILING=1"}
    traces = [t for t in r.json() if t.get("fn_name") == fn_name]
    if clear:
        await http.post(url + "gradio_api/profiling/clear")
    if not traces:
        return {"events": 0}

    def med(values: list[float]) -> float:
        v = sorted(values)
        return round(v[len(v) // 2], 3)

    per_update = [(t["postprocess_ms"] + t["streaming_diff_ms"]) / max(1, t["n_iterations"]) for t in traces]
    return {
        "events": len(traces),
        "queue_wait_ms": med([t["queue_wait_ms"] for t in traces]),
        "total_ms": med([t["total_ms"] for t in traces]),
        "updates": med([t["n_iterations"] for t in traces]),
        "postprocess_and_diff_ms_per_update": med(per_update),
    }
