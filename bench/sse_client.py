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

STATS = re.compile(r"(\d+) tokens · ([\d.]+) tokens/s · first token (\d+) ms")
PROMPT = re.compile(r"(\d+) prompt tokens")


def image_settings(max_new: int) -> list:
    """/image_chat's settings after the image and the history: temperature, max new, top-p, top-k, penalty, seed."""
    return [0.0, max_new, 0.8, 40, 1.0, 0]


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


async def stream_call(
    http: httpx.AsyncClient, url: str, index: int, data: list, session: str = "", chat_output: int = 0, seen: list | None = None
) -> dict:
    """Run one queued event; returns client-side first-text time, updates and their bytes, final outputs, timings.

    Without `session`, a brand-new session hash: the server then sets up a new visitor's state first. `seen`, when
    given, gets the outputs as each streamed update left them (what the page showed after it)."""
    session = session or uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    body = {"data": data, "fn_index": index, "session_hash": session, "event_data": None, "trigger_id": None}
    r = await post_once_more(http, url + "gradio_api/queue/join", body)
    r.raise_for_status()
    event_id = r.json().get("event_id")
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
                        if seen is not None:
                            seen.append(json.loads(json.dumps(outputs)))  # a copy: the next diff changes it in place
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
    out = {"t0": t0, "first": first, "end": end, "updates": updates, "bytes": nbytes, "outputs": outputs, "error": error}
    return {**out, "event_id": event_id}


def chat_result(call: dict, stats_output: int = 1) -> dict:
    """Client-side TTFT and decode rate, plus the tokens the app's stats line reports (output `stats_output`)."""
    outputs = call["outputs"] or []
    stats_line = (outputs[stats_output] if len(outputs) > stats_output else "") or ""
    m = STATS.search(stats_line)
    tokens = int(m.group(1)) if m else 0
    prompt = PROMPT.search(stats_line)
    first = call["first"] or call["end"]
    return {
        "client_ttft_ms": round(1000 * (first - call["t0"]), 1),
        "tokens": tokens,
        "server_tok_s": float(m.group(2)) if m else 0.0,
        "engine_ttft_ms": int(m.group(3)) if m else None,
        "prompt_tokens": int(prompt.group(1)) if prompt else None,
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
            *[
                stream_call(http, url, idx, [files[i], user_history("What is in this image?"), *image_settings(max_new)])
                for i in range(n)
            ]
        )
        wall = time.perf_counter() - t0
    res = [chat_result(c) for c in calls]
    return {"wall_s": round(wall, 2), "users": res, "errors": [r["error"] for r in res if r["error"]]}


async def image_in_page(url: str, image_path: str, questions: int = 3, max_new: int = 64) -> dict:
    """As in the page: drop the image (set_image shrinks it once), then ask about it; each question's figures."""
    async with httpx.AsyncClient(timeout=300, limits=client_limits(1)) as http:
        config = (await http.get(url + "config")).json()
        session = uuid.uuid4().hex[:12]
        file = await upload(http, url, image_path)
        dropped = await stream_call(http, url, fn_index(config, "set_image"), [file, []], session)
        if dropped["error"] or not dropped["outputs"]:
            return {"error": f"set_image: {dropped['error']}"}
        history, image = dropped["outputs"]
        asked = []
        for q in range(questions):
            call = await stream_call(
                http,
                url,
                fn_index(config, "image_chat"),
                [image, history + user_history(f"Question {q}: what is in this image?"), *image_settings(max_new)],
                session,
            )
            asked.append(chat_result(call))
    return {"set_image_s": round(dropped["end"] - dropped["t0"], 3), "questions": asked}


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
