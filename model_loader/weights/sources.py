"""Where the models come from: a local directory, Hugging Face, OpenXLab, or a git lfs clone.

A local directory is used in place (read-only is fine). Hugging Face downloads go through huggingface_hub's own
cache (HF_HOME / HF_HUB_CACHE), so a model the user already has is not fetched again, a cut-off file resumes, and a
cached model starts offline. OpenXLab and git downloads land in the app's cache directory and are marked complete
only after they validate, so a partial one is never loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from model_loader.errors import DownloadFailed, NotDownloaded, WeightsMissing
from model_loader.weights.validation import ensure_valid

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".download-complete"
# Only what the engines read: no .bin duplicates, no .gguf, no original liuhaotian weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.py", "*.jinja", "*.txt", "*.tiktoken"]
HUB_GIT_URLS = {"hf": "{endpoint}/{repo}", "openxlab": "https://code.openxlab.org.cn/{repo}.git"}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Resolved:
    """A model directory ready to validate, and how it was obtained (shown in the System tab)."""

    path: Path
    source: str  # "local", "cache", "hf", "openxlab", "git", "quantized"
    repo: str = ""
    revision: str = ""  # the hub commit, when the hub told us


def is_local(ref: str) -> bool:
    """A reference is local when it names an existing directory or looks like a path."""
    return os.path.isdir(os.path.expanduser(ref)) or ref.startswith(("/", "./", "../", "~"))


def is_offline(env: Mapping[str, str]) -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    return env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir_for(cache: Path, repo: str) -> Path:
    """Where an OpenXLab or git download is kept in the app's cache: owner--name."""
    return cache / repo.replace("/", "--")


def is_complete(path: Path) -> bool:
    """True when an earlier download finished and validated."""
    return (path / COMPLETE_MARKER).is_file()


def mark_complete(path: Path) -> None:
    """Record that `path` downloaded and validated."""
    (path / COMPLETE_MARKER).write_text("ok\n")


def hf_cache_dir(env: Mapping[str, str]) -> str | None:
    """huggingface_hub's cache as the environment names it (HF_HUB_CACHE, else HF_HOME/hub; None: its default)."""
    if env.get("HF_HUB_CACHE"):
        return os.path.expanduser(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return os.path.join(os.path.expanduser(env["HF_HOME"]), "hub")
    return None


def _hf_kwargs(repo: str, env: Mapping[str, str]) -> dict:
    kwargs: dict = dict(repo_id=repo, allow_patterns=ALLOW_PATTERNS, cache_dir=hf_cache_dir(env))
    if env.get("HF_ENDPOINT"):
        kwargs["endpoint"] = env["HF_ENDPOINT"]
    if env.get("HF_TOKEN"):
        kwargs["token"] = env["HF_TOKEN"]
    return kwargs


def hf_cached(repo: str, env: Mapping[str, str]) -> Path | None:
    """The snapshot of `repo` already in huggingface_hub's cache, without asking the hub; None when absent."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    try:
        return Path(snapshot_download(**_hf_kwargs(repo, env), local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def hf_download(repo: str, env: Mapping[str, str], progress: Progress = log.info, files: list[str] | None = None) -> Path:
    """snapshot_download into huggingface_hub's cache, reporting percent done; honours HF_ENDPOINT and HF_TOKEN.

    `files` re-fetches just those files (force_download), for a cached file that turned out broken.
    """
    from huggingface_hub import hf_hub_download, snapshot_download  # noqa: PLC0415

    kwargs = _hf_kwargs(repo, env)
    if files:
        kw = {k: v for k, v in kwargs.items() if k != "allow_patterns"}
        for f in files:
            hf_hub_download(filename=f, force_download=True, **kw)
    with DownloadWatcher(repo, env, progress):
        return Path(snapshot_download(**kwargs))


class DownloadWatcher:
    """Reports a hub download's percent done, from the repo's file sizes and the bytes in the cache's blobs."""

    def __init__(self, repo: str, env: Mapping[str, str], progress: Progress, every_s: float = 2.0) -> None:
        self.repo, self.env, self.progress, self.every_s = repo, env, progress, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DownloadWatcher:
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)

    def _expected(self) -> dict[str, int]:
        """Blob name -> size for the files we download (LFS files are named by sha256, others by git blob id)."""
        from huggingface_hub import HfApi  # noqa: PLC0415

        api = HfApi(endpoint=self.env.get("HF_ENDPOINT") or None, token=self.env.get("HF_TOKEN") or None)
        info = api.model_info(self.repo, files_metadata=True)
        out = {}
        for s in info.siblings or []:
            if any(fnmatch(s.rfilename, p) for p in ALLOW_PATTERNS) and s.size is not None:
                name = s.lfs.sha256 if s.lfs else s.blob_id
                if name:
                    out[name] = s.size
        return out

    def _run(self) -> None:
        try:
            expected = self._expected()
        except Exception as e:  # noqa: BLE001 - progress is a nicety; the download reports its own errors
            log.debug("no download progress for %s: %s", self.repo, e)
            return
        total = sum(expected.values())
        from huggingface_hub import constants  # noqa: PLC0415

        blobs = Path(hf_cache_dir(self.env) or constants.HF_HUB_CACHE) / f"models--{self.repo.replace('/', '--')}" / "blobs"
        while total and not self._stop.wait(self.every_s):
            done = 0
            for name, size in expected.items():
                for f in (blobs / name, blobs / f"{name}.incomplete"):
                    if f.exists():
                        done += min(size, f.stat().st_size)
                        break
            self.progress(f"Downloading {self.repo}: {100 * done / total:.0f}% of {total / 2**30:.1f} GB")


def openxlab_download(repo: str, dest: Path, env: Mapping[str, str]) -> Path:
    """The openxlab SDK's model download (OPENXLAB_AK / OPENXLAB_SK from the environment when set)."""
    from openxlab.model import download  # noqa: PLC0415

    if env.get("OPENXLAB_AK") and env.get("OPENXLAB_SK"):
        import openxlab  # noqa: PLC0415

        openxlab.login(ak=env["OPENXLAB_AK"], sk=env["OPENXLAB_SK"])
    dest.mkdir(parents=True, exist_ok=True)
    download(model_repo=repo, output=str(dest))
    return dest


def git_url(repo: str, hub: str, env: Mapping[str, str]) -> str:
    """The git URL of a repo on a hub (a local path or URL is taken as it is)."""
    if "://" in repo or repo.startswith("/"):
        return repo
    endpoint = env.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return HUB_GIT_URLS.get(hub, HUB_GIT_URLS["hf"]).format(endpoint=endpoint, repo=repo)


def git_download(repo: str, dest: Path, hub: str, env: Mapping[str, str]) -> Path:
    """`git clone` then `git lfs pull`: the fallback that works wherever git and git-lfs are installed."""
    url = git_url(repo, hub, env)
    genv = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_LFS_SKIP_SMUDGE": "1"}
    if (dest / ".git").is_dir():
        subprocess.run(["git", "-C", str(dest), "pull", "--ff-only"], check=True, env=genv)
    else:
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "--depth", "1", url, str(dest)], check=True, env=genv)
    if shutil.which("git-lfs"):
        include = ",".join(ALLOW_PATTERNS)
        subprocess.run(["git", "-C", str(dest), "lfs", "pull", "--include", include], check=True, env=genv)
    return dest


def download(repo: str, dest: Path, hub: str, env: Mapping[str, str], progress: Progress) -> tuple[Path, str]:
    """Fetch `repo` from `hub` (Hugging Face into its own cache, OpenXLab into `dest`), falling back to a git lfs
    clone into `dest`; returns where it landed and the source that worked."""
    if hub == "hf" and is_offline(env):
        raise DownloadFailed(
            f"Offline and not in the cache: HF_HUB_OFFLINE is set, and {repo} is not in "
            f"{hf_cache_dir(env) or 'the Hugging Face cache (~/.cache/huggingface)'}.",
            "Unset HF_HUB_OFFLINE to download it, point HF_HOME at a cache that has it, or pass a local directory "
            "with --text-model / --vision-model.",
        )
    tries: list[tuple[str, Callable[[], Path]]] = []
    if hub == "hf":
        tries.append(("hf", lambda: hf_download(repo, env, progress)))
    elif hub == "openxlab":
        tries.append(("openxlab", lambda: openxlab_download(repo, dest, env)))
    if not is_offline(env):
        tries.append(("git", lambda: git_download(repo, dest, hub, env)))
    errors = []
    for name, fetch in tries:
        progress(f"Downloading {repo} from {name} ...")
        try:
            return fetch(), name
        except Exception as e:  # noqa: BLE001 - every hub failure is reported together below
            log.warning("download of %s from %s failed: %s", repo, name, _redact(str(e), env))
            errors.append(f"{name}: {_redact(str(e), env)[:300]}")
    raise DownloadFailed(
        f"Could not download {repo}: " + "; ".join(errors),
        "Check the network or HF_ENDPOINT (e.g. https://hf-mirror.com), or download the model yourself and pass "
        "its directory with --text-model / --vision-model.",
    )


def _redact(text: str, env: Mapping[str, str]) -> str:
    """Never let a hub token reach a log or the UI."""
    for key in ("HF_TOKEN", "OPENXLAB_SK", "OPENXLAB_AK"):
        if env.get(key):
            text = text.replace(env[key], "***")
    return text


def fetch_model(
    ref: str,
    cache: Path,
    hub: str,
    env: Mapping[str, str],
    problems: Callable[[Path], list[str]],
    progress: Progress = log.info,
    download_ok: bool = True,
) -> Resolved:
    """Resolve `ref` (a directory or repo id) to a validated local directory, downloading when needed.

    A cached copy that validates is used without asking the hub. One that does not is fetched again (a hub
    resumes or replaces the broken files), and if it still fails validation, WeightsInvalid names the files.
    With `download_ok` False nothing is fetched: a model not yet downloaded raises NotDownloaded.
    """
    if is_local(ref):
        path = Path(os.path.expanduser(ref)).resolve()
        if not path.is_dir():
            raise WeightsMissing(f"{path} does not exist.", "Pass an existing model directory or a hub repo id.")
        ensure_valid(problems(path), path)
        return Resolved(path, "local")
    dest = cache_dir_for(cache, ref)
    cached = hf_cached(ref, env) if hub == "hf" else (dest if is_complete(dest) else None)
    if cached is None and hub == "hf" and is_complete(dest):
        cached = dest  # a git clone from an earlier start
    if cached is not None:
        found = problems(cached)
        if not found:
            progress(f"Using cached {ref} at {cached}")
            return Resolved(cached, "cache", ref, _revision(cached))
        log.warning("cached %s is broken, fetching it again: %s", ref, "; ".join(found))
        progress(f"Cached {ref} is broken ({found[0]}); fetching it again ...")
        if not download_ok or (hub == "hf" and is_offline(env)):
            ensure_valid(found, cached)  # nothing may be fetched: name the broken files
        if cached == dest:
            _forget_broken(dest, found)
        elif not is_offline(env):
            broken = [f.name for f in cached.glob("*.safetensors") if any(f.name in line for line in found)]
            hf_download(ref, env, progress, files=broken)
    elif not download_ok:
        where = (hf_cache_dir(env) or "the Hugging Face cache") if hub == "hf" else str(dest)
        raise NotDownloaded(
            f"{ref} is not downloaded yet (not in {where}).",
            "It is downloaded at the first start; run with --check --download to fetch it now.",
        )
    path, source = download(ref, dest, hub, env, progress)
    ensure_valid(problems(path), path)
    if path == dest:
        mark_complete(dest)
    progress(f"Downloaded {ref} from {source}")
    return Resolved(path, source, ref, _revision(path))


def _revision(path: Path) -> str:
    """The hub commit of a huggingface_hub snapshot folder (its name), else ''."""
    return path.name if path.parent.name == "snapshots" and len(path.name) == 40 else ""


def _forget_broken(dest: Path, found: list[str]) -> None:
    """Drop the files named broken from an OpenXLab/git copy so the hub fetches them anew."""
    (dest / COMPLETE_MARKER).unlink(missing_ok=True)
    for line in found:
        for f in dest.glob("*.safetensors"):
            if f.name in line and f.exists():
                f.unlink()
