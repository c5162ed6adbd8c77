"""Where the models come from: a local directory, Hugging Face, OpenXLab, or a git lfs clone.

A hub download lands in the cache directory and is marked complete only after it validates, so a partial one is
never loaded; running again resumes it (huggingface_hub and git lfs both resume). A cached copy that validates is
used without asking the hub, so a cached app starts offline.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from model_loader.errors import DownloadFailed, WeightsMissing
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


def is_local(ref: str) -> bool:
    """A reference is local when it names an existing directory or looks like a path."""
    return os.path.isdir(os.path.expanduser(ref)) or ref.startswith(("/", "./", "../", "~"))


def cache_dir_for(cache: Path, repo: str) -> Path:
    """Where a repo is kept in the cache: owner--name."""
    return cache / repo.replace("/", "--")


def is_complete(path: Path) -> bool:
    """True when an earlier download finished and validated."""
    return (path / COMPLETE_MARKER).is_file()


def mark_complete(path: Path) -> None:
    """Record that `path` downloaded and validated."""
    (path / COMPLETE_MARKER).write_text("ok\n")


def hf_download(repo: str, dest: Path, env: Mapping[str, str]) -> Path:
    """huggingface_hub.snapshot_download into `dest`; honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415

    kwargs = dict(repo_id=repo, local_dir=str(dest), allow_patterns=ALLOW_PATTERNS)
    if env.get("HF_ENDPOINT"):
        kwargs["endpoint"] = env["HF_ENDPOINT"]
    if env.get("HF_TOKEN"):
        kwargs["token"] = env["HF_TOKEN"]
    if env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        kwargs["local_files_only"] = True
    snapshot_download(**kwargs)
    return dest


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


def download(repo: str, dest: Path, hub: str, env: Mapping[str, str], progress: Progress) -> str:
    """Fetch `repo` into `dest` from `hub`, falling back to a git lfs clone; returns the source that worked."""
    tries: list[tuple[str, Callable[[], Path]]] = []
    if hub == "hf":
        tries.append(("hf", lambda: hf_download(repo, dest, env)))
    elif hub == "openxlab":
        tries.append(("openxlab", lambda: openxlab_download(repo, dest, env)))
    if env.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
        tries.append(("git", lambda: git_download(repo, dest, hub, env)))
    errors = []
    for name, fetch in tries:
        progress(f"Downloading {repo} from {name} into {dest} ...")
        try:
            fetch()
            return name
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
    ref: str, cache: Path, hub: str, env: Mapping[str, str], problems: Callable[[Path], list[str]], progress: Progress = log.info
) -> Resolved:
    """Resolve `ref` (a directory or repo id) to a validated local directory, downloading when needed.

    A cached copy that validates is used as it is; one that does not is fetched again (a hub resumes or replaces
    the broken files), and if it still fails validation, WeightsInvalid names the files.
    """
    if is_local(ref):
        path = Path(os.path.expanduser(ref)).resolve()
        if not path.is_dir():
            raise WeightsMissing(f"{path} does not exist.", "Pass an existing model directory or a hub repo id.")
        ensure_valid(problems(path), path)
        return Resolved(path, "local")
    dest = cache_dir_for(cache, ref)
    if is_complete(dest):
        found = problems(dest)
        if not found:
            progress(f"Using cached {ref} at {dest}")
            return Resolved(dest, "cache", ref)
        log.warning("cached %s is broken, fetching it again: %s", ref, "; ".join(found))
        progress(f"Cached {ref} is broken ({found[0]}); fetching it again ...")
        (dest / COMPLETE_MARKER).unlink()
        for line in found:  # drop the files named broken so the hub fetches them anew rather than trusting them
            for f in dest.glob("*.safetensors"):
                if f.name in line and f.exists():
                    f.unlink()
    source = download(ref, dest, hub, env, progress)
    ensure_valid(problems(dest), dest)
    mark_complete(dest)
    progress(f"Downloaded {ref} from {source}")
    return Resolved(dest, source, ref)
