"""A browser-like client for the app's streaming routes: Gradio's queue protocol over one SSE stream, asyncio.

gradio_client polls its message queue every 50 ms and parses in one thread per job, which adds ~140 ms to the first
token and caps many concurrent users in the measuring process. A browser's EventSource does neither; this client
behaves like it, so the bench measures the app rather than the measuring library.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import httpx
from gradio_client.utils import apply_diff

from bench.workload import history_of, question

STATS = re.compile(r"(\d+) tokens · ([\d.]+) tokens/s · first token (\d+) ms")


def client_limits(users: int) -> httpx.Limits:
    """Enough connections for every user's stream and posts; idle ones are dropped before uvicorn's 5 s keep-alive
    closes them, so no request is sent on a connection the server is closing."""
    return httpx.Limits(max_connections=4 * users + 8, keepalive_expiry=2.0)


def fn_index(config: dict, api_name: str) -> int:
    """The dependency id of a named route in the app's /config."""
    for d in config["dependencies"]:
        if d.get("api_name") == api_name:
            return d["id"]
    raise KeyError(api_name)


def assistant_text(history: list) -> str:
    """The text of the last assistant message in a Chatbot value."""
    if not history or history[-1].get("role") != "assistant":
        return ""
    c = history[-1].get("content")
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c or ""


async def post_once_more(http: httpx.AsyncClient, url: str, body: dict) -> httpx.Response:
    """POST, and once more if a kept-alive connection turns out closed (as a browser retries)."""
    try:
        return await http.post(url, json=body)
    except (httpx.ReadError, httpx.RemoteProtocolError):
        return await http.post(url, json=body)


def merge_update(old, diff):
    """One output of a streamed update: a diff against the last value, or an update that leaves it (gr.skip())."""
    if isinstance(diff, dict) and diff.get("__type__") == "update":
        return diff.get("value", old)
    return apply_diff(old, diff)


async def stream_call(http: httpx.AsyncClient, url: str, index: int, data: list, session: str = "", chat_output: int = 0) -> dict:
    """Run one queued event; returns client-side first-text time, updates and their bytes, final outputs, timings.

    Without `session`, a brand-new session hash: the server then sets up a new visitor's state first."""
    session = session or uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    body = {"data": data, "fn_index": index, "session_hash": session, "event_data": None, "trigger_id": None}
    r = await post_once_more(http, url + "gradio_api/queue/join", body)
    r.raise_for_status()
    outputs, first, updates, error, nbytes = None, None, 0, None, 0
    for attempt in range(2):  # a kept-alive connection the server had just closed fails before the first byte
        try:
            async with http.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}) as s:
                async for line in s.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    nbytes += len(line)
                    msg = json.loads(line[5:])
                    kind = msg.get("msg")
                    if kind == "process_generating":
                        updates += 1
                        out = msg["output"]["data"]
                        outputs = out if outputs is None else [merge_update(o, d) for o, d in zip(outputs, out)]
                        if first is None and assistant_text(outputs[chat_output]):
                            first = time.perf_counter()
                    elif kind == "process_completed":
                        if msg.get("output", {}).get("data") is not None and msg.get("success", True):
                            outputs = msg["output"]["data"]
                        else:
                            error = msg.get("output", {}).get("error") or "failed"
                        break
            break
        except (httpx.ReadError, httpx.RemoteProtocolError):
            if nbytes or attempt:
                raise
    end = time.perf_counter()
    return {"t0": t0, "first": first, "end": end, "updates": updates, "bytes": nbytes, "outputs": outputs, "error": error}


def chat_result(call: dict) -> dict:
    """Client-side TTFT and decode rate, plus the tokens the app's stats line reports."""
    stats_line = (call["outputs"] or [None, ""])[1] or ""
    m = STATS.search(stats_line)
    tokens = int(m.group(1)) if m else 0
    first = call["first"] or call["end"]
    return {
        "client_ttft_ms": round(1000 * (first - call["t0"]), 1),
        "tokens": tokens,
        "server_tok_s": float(m.group(2)) if m else 0.0,
        "engine_ttft_ms": int(m.group(3)) if m else None,
        "client_tok_s": round((tokens - 1) / (call["end"] - first), 1) if tokens > 1 and call["end"] > first else 0.0,
        "updates": call["updates"],
        "total_s": round(call["end"] - call["t0"], 3),
        "error": call["error"],
    }


def user_history(text: str) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


async def chat_users(url: str, n: int, max_new: int = 256, prompt: str = "tell me a story") -> dict:
    """n users at once on /chat; aggregate tokens/s over the wall time, and each user's figures."""
    async with httpx.AsyncClient(timeout=300, limits=client_limits(n)) as http:
        config = (await http.get(url + "config")).json()
        idx = fn_index(config, "chat")
        t0 = time.perf_counter()
        calls = await asyncio.gather(
            *[
                stream_call(http, url, idx, [user_history(f"user {i}: {prompt}"), "", 0.0, 0.8, 40, max_new, 1.0, 0])
                for i in range(n)
            ]
        )
        wall = time.perf_counter() - t0
    res = [chat_result(c) for c in calls]
    return {
        "agg_tok_s": round(sum(r["tokens"] for r in res) / wall, 1),
        "users": res,
        "errors": [r["error"] for r in res if r["error"]],
    }


async def upload(http: httpx.AsyncClient, url: str, path: str) -> dict:
    """Upload a file as the browser does; returns the FileData an Image input takes."""
    with open(path, "rb") as f:
        r = await http.post(url + "gradio_api/upload", files={"files": (path.rsplit("/", 1)[-1], f)})
    r.raise_for_status()
    server_path = r.json()[0]
    return {"path": server_path, "orig_name": path.rsplit("/", 1)[-1], "meta": {"_type": "gradio.FileData"}}


async def image_users(url: str, n: int, image_path: str, max_new: int = 64) -> dict:
    """n users asking about one uploaded image at once on /image_chat."""
    async with httpx.AsyncClient(timeout=300, limits=client_limits(n)) as http:
        config = (await http.get(url + "config")).json()
        idx = fn_index(config, "image_chat")
        files = [await upload(http, url, image_path) for _ in range(n)]
        t0 = time.perf_counter()
        calls = await asyncio.gather(
            *[stream_call(http, url, idx, [files[i], user_history("What is in this image?"), 0.0, max_new]) for i in range(n)]
        )
        wall = time.perf_counter() - t0
    res = [chat_result(c) for c in calls]
    return {"wall_s": round(wall, 2), "users": res, "errors": [r["error"] for r in res if r["error"]]}


async def conversations(url: str, users: int, turns: int, max_new: int = 32) -> dict:
    """Many users holding multi-turn conversations at once; every turn must complete with a reply."""
    async with httpx.AsyncClient(timeout=300, limits=client_limits(users)) as http:
        config = (await http.get(url + "config")).json()
        idx = fn_index(config, "chat")

        async def one(i: int) -> list[str]:
            history, problems = [], []
            for t in range(turns):
                history = history + user_history(f"I am user {i}, turn {t}.")
                call = await stream_call(http, url, idx, [history, "", 0.7, 0.8, 40, max_new, 1.0, 0])
                out = call["outputs"]
                if call["error"] or not out:
                    problems.append(f"user {i} turn {t}: {call['error']}")
                    continue
                history = out[0]
                if len(history) != 2 * (t + 1) or history[-1]["role"] != "assistant":
                    problems.append(f"user {i} turn {t}: history of {len(history)} messages")
                elif not assistant_text(history):
                    problems.append(f"user {i} turn {t}: empty reply")
            return problems

        t0 = time.perf_counter()
        problems = await asyncio.gather(*[one(i) for i in range(users)])
    flat = [p for ps in problems for p in ps]
    return {
        "users": users,
        "turns": turns,
        "problems": len(flat),
        "first_problems": flat[:5],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


async def disconnect_midstream(url: str, n: int, max_new: int = 2000) -> None:
    """n users start long replies and close their connection at the first text, like closed browser tabs."""
    async with httpx.AsyncClient(timeout=300) as http:
        config = (await http.get(url + "config")).json()
        idx = fn_index(config, "chat")

        async def one(i: int) -> None:
            session = uuid.uuid4().hex[:12]
            data = [user_history(f"user {i}: a long story"), "", 0.0, 0.8, 40, max_new, 1.0, 0]
            await http.post(
                url + "gradio_api/queue/join",
                json={"data": data, "fn_index": idx, "session_hash": session, "event_data": None, "trigger_id": None},
            )
            async with http.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_generating":
                        return  # leaving the block closes the connection mid-stream

        await asyncio.gather(*[one(i) for i in range(n)])


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


class Page:
    """One browser tab: a session hash made at page load, the page's load events, then turns on that session.

    A browser runs `queue=False` events as POST /run/predict and queued ones through /queue/join and the session's
    SSE stream; a turn is the submit event, the queued reply, and the `.then` that saves the history."""

    def __init__(self, http: httpx.AsyncClient, url: str, config: dict) -> None:
        self.http, self.url, self.config = http, url, config
        self.session = uuid.uuid4().hex[:11]
        self.add = fn_index(config, "add_message")
        self.chat = fn_index(config, "chat")
        self.after_chat = [d["id"] for d in then_steps(config, self.chat)]
        self.ticks = deps_where(config, "tick")

    async def predict(self, index: int, data: list) -> list:
        body = {"data": data, "fn_index": index, "session_hash": self.session, "event_data": None, "trigger_id": None}
        r = await post_once_more(self.http, self.url + "gradio_api/run/predict", body)
        r.raise_for_status()
        return r.json()["data"]

    async def load(self) -> float:
        """The page's load events, as a browser runs them on opening the page; returns their wall time (s)."""
        t0 = time.perf_counter()
        await asyncio.gather(*[self.predict(d["id"], input_defaults(self.config, d)) for d in deps_where(self.config, "load")])
        return time.perf_counter() - t0

    async def turn(self, history: list, text: str, max_new: int = 256) -> dict:
        """Type a message and press Enter: first text is timed from the submit, as the user waits for it."""
        t0 = time.perf_counter()
        _, history = await self.predict(self.add, [text, history])
        call = await stream_call(self.http, self.url, self.chat, [history, "", 0.0, 0.8, 40, max_new, 1.0, 0], self.session)
        for idx in self.after_chat:
            await self.predict(idx, [(call["outputs"] or [history])[0]])
        res = chat_result(call)
        first = call["first"] or call["end"]
        res["first_ms"] = round(1000 * (first - t0), 1) if call["first"] else None
        res["bytes"] = call["bytes"]
        res["history"] = (call["outputs"] or [history])[0]
        return res

    async def poll(self, stop: asyncio.Event, every_s: float = 1.0) -> int:
        """The page's timers, as an open tab runs them, until `stop`; returns how many ticks were sent."""
        n = 0
        while not stop.is_set():
            for d in self.ticks:
                if (d.get("every") or every_s) <= every_s:
                    await self.predict(d["id"], input_defaults(self.config, d))
                    n += 1
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except asyncio.TimeoutError:
                pass
        return n


def text_history(messages: list[dict]) -> list[dict]:
    """Engine-style messages as a Chatbot value (what the page holds after earlier turns)."""
    return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]


async def users_on_pages(
    url: str, users: int, turns: int, max_new: int, histories: list[list] | None = None, new_visitors: bool = False
) -> tuple[list[dict], float, dict]:
    """`users` open pages (loaded before the clock starts, unless they are new visitors), then `turns` turns each
    at once; returns every turn's result, the wall time, and page-load timings."""
    async with httpx.AsyncClient(timeout=600, limits=client_limits(users)) as http:
        config = (await http.get(url + "config")).json()
        pages = [Page(http, url, config) for _ in range(users)]
        loads: list[float] = []
        if not new_visitors:
            loads = list(await asyncio.gather(*[p.load() for p in pages]))

        async def one(i: int, page: Page) -> list[dict]:
            out = []
            if new_visitors:
                out_load = await page.load()
                loads.append(out_load)
            history = list((histories or [[]] * users)[i])
            for t in range(turns):
                r = await page.turn(history, question(i, t)["content"], max_new)
                history = r.pop("history")
                r["turn"] = t
                out.append(r)
            return out

        t0 = time.perf_counter()
        per_user = await asyncio.gather(*[one(i, p) for i, p in enumerate(pages)])
        wall = time.perf_counter() - t0
    loads_ms = sorted(round(1000 * x, 1) for x in loads)
    return [t for ts in per_user for t in ts], wall, {"page_load_ms": loads_ms}


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
