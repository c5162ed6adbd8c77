"""Files the app writes for a browser session (converted uploads, exports): one folder per session, bounded,
removed when the session ends. Gradio copies every returned file into its own cache (cleaned by `delete_cache`),
so ours are only needed until the event that returned them has finished."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


class Scratch:
    """Per-session folders under one root; each keeps its newest `keep` files, and folders idle for `max_age_s`
    are swept when another session writes."""

    def __init__(self, root: Path | None = None, keep: int = 6, max_age_s: float = 6 * 3600) -> None:
        self._root = root
        self.keep, self.max_age_s = keep, max_age_s
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        """Made on first use (nothing is written when the page is only built), under GRADIO_TEMP_DIR if set."""
        with self._lock:
            if self._root is None:
                base = os.environ.get("GRADIO_TEMP_DIR") or None
                if base:
                    Path(base).mkdir(parents=True, exist_ok=True)
                self._root = Path(tempfile.mkdtemp(prefix="internlm-chat-", dir=base))
            return self._root

    def folder(self, session: str) -> Path:
        return self.root / ("s-" + (re.sub(r"[^A-Za-z0-9_-]", "_", session)[:64] or "anonymous"))

    def shared(self, name: str) -> Path:
        """A folder for the app's own files (example pictures): never swept."""
        d = self.root / f"_{name}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def path(self, session: str, name: str) -> Path:
        """A new file path in the session's folder; older files beyond `keep` and stale sessions are removed."""
        self.sweep()
        d = self.folder(session)
        d.mkdir(parents=True, exist_ok=True)
        files = sorted(d.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in files[: max(0, len(files) - self.keep + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        sub = d / uuid.uuid4().hex[:8]  # the user's file name is kept for downloads
        sub.mkdir()
        return sub / Path(name).name

    def drop(self, session: str) -> None:
        """The session has ended (tab closed): remove everything it wrote."""
        if self._root is not None:
            shutil.rmtree(self.folder(session), ignore_errors=True)

    def sweep(self) -> None:
        """Remove session folders nobody has written to for `max_age_s` (sessions whose unload never came)."""
        if self._root is None or not self._root.exists():
            return
        cutoff = time.time() - self.max_age_s
        for d in self._root.iterdir():
            if not d.name.startswith("s-"):
                continue
            try:
                if d.stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)
            except FileNotFoundError:
                continue

    def close(self) -> None:
        """Remove the whole root (server shutdown)."""
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
