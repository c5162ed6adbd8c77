"""A minimal Hugging Face hub on localhost for download and upload tests.

Models and datasets are served from local directories with the endpoints huggingface_hub 0.36 and datasets 2.19
call: repo info (with file sizes), tree and paths-info listings, HEAD/GET resolve with Range, a switch that cuts
one file's first transfer midway (as a dropped connection does), and the upload protocol (create repo,
preupload, LFS batch + basic PUT for safetensors, ndjson commit). A repo's revision is a hash of its files, so a
changed repo gets a new revision as on the real hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# how the hub names the action after `/api/{kind}s/{repo}`
_API_ACTIONS = ("/revision/", "/tree/", "/paths-info/", "/preupload/", "/commit/")


def is_lfs(rel: str) -> bool:
    """Files the hub keeps in LFS (weights); the rest are plain git blobs."""
    return rel.endswith((".safetensors", ".parquet", ".bin"))


def git_blob_id(data: bytes) -> str:
    """git's object id of a blob, which the hub sends as a regular file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def revision_of(root: Path) -> str:
    """A 40-hex revision that changes whenever a file of the repo changes."""
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class FakeHub:
    """Serves local directories as hub repos: `models` as `owner/name`, `datasets` as `name` or `owner/name`."""

    def __init__(
        self, repos: dict[str, Path] | None = None, datasets: dict[str, Path] | None = None, upload_root: Path | None = None
    ) -> None:
        self.repos = dict(repos or {})
        self.datasets = dict(datasets or {})
        self.upload_root = upload_root
        self.cut_once: set[str] = set()  # file names whose first GET stops halfway
        self.requests: list[tuple[str, str, str]] = []  # (method, path in repo or API path, Range header)
        self.tokens: list[str] = []
        self.created: list[str] = []  # repos created through the API
        self.commits: list[dict] = []  # {"repo", "summary", "files"}
        self._lfs: dict[str, bytes] = {}
        app = Starlette(routes=[Route("/{path:path}", self.dispatch, methods=["GET", "HEAD", "POST", "PUT"])])
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

    # --- routing -------------------------------------------------------------------------------------------
    async def dispatch(self, request: Request):
        path = request.url.path
        self.tokens.append(request.headers.get("authorization", ""))
        if path == "/api/repos/create" and request.method == "POST":
            return await self.create_repo(request)
        if path == "/api/validate-yaml":  # a model card's metadata, checked before upload
            return JSONResponse({"errors": [], "warnings": []})
        if path.startswith("/lfs-upload/") and request.method == "PUT":
            self._lfs[path.rsplit("/", 1)[1]] = await request.body()
            return Response(status_code=200)
        if path.endswith(".git/info/lfs/objects/batch"):
            return await self.lfs_batch(request)
        for kind in ("models", "datasets"):
            prefix = f"/api/{kind}/"
            if path.startswith(prefix):
                return await self.api(request, kind, path[len(prefix) :])
        if path.startswith("/datasets/") and "/resolve/" in path:
            repo, rest = path[len("/datasets/") :].split("/resolve/", 1)
            return await self.resolve(request, self.datasets.get(repo), rest)
        if "/resolve/" in path:
            repo, rest = path[1:].split("/resolve/", 1)
            return await self.resolve(request, self.repos.get(repo), rest)
        self.requests.append((request.method, path, ""))
        return JSONResponse({"error": f"not served by the fake hub: {path}"}, status_code=404)

    def _table(self, kind: str) -> dict[str, Path]:
        return self.repos if kind == "models" else self.datasets

    async def api(self, request: Request, kind: str, rest: str):
        action, arg = "info", ""
        for a in _API_ACTIONS:
            if a in rest:
                rest, arg = rest.split(a, 1)
                action = a.strip("/")
                break
        repo, root = rest, self._table(kind).get(rest)
        self.requests.append((request.method, f"/api/{kind}/{repo}/{action}", ""))
        if action == "preupload":
            return await self.preupload(request)
        if action == "commit":
            return await self.commit(request, kind, repo)
        if root is None:
            return JSONResponse({"error": "Repository not found"}, status_code=404, headers={"X-Error-Code": "RepoNotFound"})
        if action in ("info", "revision"):
            files = self._files(root)
            return JSONResponse(
                {
                    "id": repo,
                    "sha": revision_of(root),
                    "private": False,
                    "siblings": [self._sibling(root, f) for f in files],
                }
            )
        if action == "tree":
            _, _, sub = arg.partition("/")  # arg is "{rev}" or "{rev}/{path}"
            recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
            return JSONResponse(self._tree(root, sub.strip("/"), recursive))
        if action == "paths-info":
            form = await request.form()
            out = []
            for p in form.getlist("paths"):
                f = root / p
                if f.is_file():
                    out.append(self._entry(root, f))
                elif f.is_dir():
                    out.append({"type": "directory", "path": p, "oid": "0" * 40})
            return JSONResponse(out)
        return JSONResponse({"error": "unknown action"}, status_code=404)

    # --- downloads -----------------------------------------------------------------------------------------
    @staticmethod
    def _sibling(root: Path, rel: str) -> dict:
        data = (root / rel).read_bytes()
        out = {"rfilename": rel, "size": len(data), "blobId": git_blob_id(data)}
        if is_lfs(rel):
            out["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out

    @staticmethod
    def _files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    @staticmethod
    def _entry(root: Path, f: Path) -> dict:
        data = f.read_bytes()
        return {"type": "file", "path": str(f.relative_to(root)), "size": len(data), "oid": hashlib.sha1(data).hexdigest()}

    def _tree(self, root: Path, sub: str, recursive: bool) -> list[dict]:
        base = root / sub if sub else root
        items = base.rglob("*") if recursive else base.iterdir()
        out = []
        for p in sorted(items):
            if p.is_dir():
                out.append({"type": "directory", "path": str(p.relative_to(root)), "oid": "0" * 40})
            else:
                out.append(self._entry(root, p))
        return out

    async def resolve(self, request: Request, root: Path | None, rest: str):
        _rev, _, rel = rest.partition("/")
        f = root / rel if root else None
        rng = request.headers.get("range", "")
        self.requests.append((request.method, rel, rng))
        if f is None or not f.is_file():
            return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound"})
        data = f.read_bytes()
        headers = {"X-Repo-Commit": revision_of(root), "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"}
        if is_lfs(rel):  # as the hub: an LFS file's blob is named by its sha256, sent as the linked etag
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
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

    # --- uploads -------------------------------------------------------------------------------------------
    async def create_repo(self, request: Request):
        body = await request.json()
        repo = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        self.created.append(repo)
        if repo not in self.repos and self.upload_root is not None:
            root = self.upload_root / repo.replace("/", "--")
            root.mkdir(parents=True, exist_ok=True)
            self.repos[repo] = root
        return JSONResponse({"url": f"{self.url}/{repo}", "name": repo})

    async def preupload(self, request: Request):
        body = await request.json()
        files = [
            {"path": f["path"], "uploadMode": "lfs" if is_lfs(f["path"]) else "regular", "shouldIgnore": False}
            for f in body["files"]
        ]
        return JSONResponse({"files": files})

    async def lfs_batch(self, request: Request):
        body = await request.json()
        objects = [
            {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}}
            for o in body["objects"]
        ]
        return JSONResponse({"transfer": "basic", "objects": objects})

    async def commit(self, request: Request, kind: str, repo: str):
        root = self._table(kind).get(repo)
        if root is None:
            return JSONResponse({"error": "Repository not found"}, status_code=404, headers={"X-Error-Code": "RepoNotFound"})
        summary, written = "", []
        for line in (await request.body()).splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value["summary"]
                continue
            if item["key"] == "file":
                data = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                data = self._lfs.pop(value["oid"])
                assert hashlib.sha256(data).hexdigest() == value["oid"], "LFS object does not match its oid"
            else:
                continue
            dst = root / value["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            written.append(value["path"])
        self.commits.append({"repo": repo, "summary": summary, "files": written})
        sha = revision_of(root)
        # the real hub answers with its public URL
        return JSONResponse({"commitUrl": f"https://huggingface.co/{repo}/commit/{sha}", "commitOid": sha})
