"""A minimal Hugging Face hub on localhost for download tests: repo info, HEAD/GET resolve with Range, and a
switch that cuts one file's first transfer midway (as a dropped connection does)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves the files of local directories as hub repos `owner/name`."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.cut_once: set[str] = set()  # file names whose first GET stops halfway
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.tokens: list[str] = []
        app = Starlette(
            routes=[
                Route("/api/models/{owner}/{name}/revision/{rev}", self.info),
                Route("/api/models/{owner}/{name}", self.info),
                Route("/{owner}/{name}/resolve/{rev}/{path:path}", self.resolve, methods=["GET", "HEAD"]),
            ]
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True

    def _repo(self, request: Request) -> Path | None:
        return self.repos.get(f"{request.path_params['owner']}/{request.path_params['name']}")

    async def info(self, request: Request):
        self.tokens.append(request.headers.get("authorization", ""))
        root = self._repo(request)
        if root is None:
            return JSONResponse({"error": "Repository not found"}, status_code=404)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return JSONResponse(
            {
                "id": request.path_params["owner"] + "/" + request.path_params["name"],
                "sha": SHA,
                "siblings": [{"rfilename": f} for f in files],
            }
        )

    async def resolve(self, request: Request):
        root = self._repo(request)
        rel = request.path_params["path"]
        f = root / rel if root else None
        rng = request.headers.get("range", "")
        self.requests.append((request.method, rel, rng))
        if f is None or not f.is_file():
            return Response(status_code=404)
        data = f.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": SHA, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return Response(headers={**headers, "Content-Length": str(len(data))})
        start = int(rng.split("=")[1].split("-")[0]) if rng.startswith("bytes=") else 0
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if rel in self.cut_once:
            self.cut_once.discard(rel)

            async def cut():
                yield body[: len(body) // 2]
                raise ConnectionResetError("connection dropped midway")  # the client sees a short read

            return StreamingResponse(cut(), status_code=status, headers={**headers, "Content-Length": str(len(body))})
        return Response(body, status_code=status, headers={**headers, "Content-Length": str(len(body))})
