"""What `python app.py` sets up for serving, apart from the engines and the page themselves."""

from __future__ import annotations

import gc
import sys
import threading
import time

import app


def test_serving_hands_the_interpreter_back_to_the_web_server_quickly(monkeypatch):
    """lmdeploy detokenizes on its own thread and holds the GIL for a whole switch interval (5 ms by default) each
    time; at 16-32 users the page's event loop waited that long at every step (issue 14, bench/results)."""
    import model_loader.startup
    import ui.page

    class NoStartup:
        def __init__(self, cfg, env):
            self.slots, self.system_info = {}, dict

        def start(self):
            pass

        def close(self):
            pass

    class NoDemo:
        def launch(self, **kw):
            self.seen = sys.getswitchinterval()

    demo = NoDemo()
    monkeypatch.setattr(model_loader.startup, "Startup", NoStartup)
    monkeypatch.setattr(ui.page, "build_demo", lambda slots, cfg, info: (demo, None))
    monkeypatch.setattr(ui.page, "launch_kwargs", lambda cfg, i18n: {})
    before = sys.getswitchinterval()
    try:
        assert app.serve(object(), {}) == 0
        assert demo.seen <= 0.001
    finally:
        sys.setswitchinterval(before)


def test_once_the_engines_are_built_a_full_collection_no_longer_walks_them(monkeypatch):
    """lmdeploy, torch and transformers leave a heap of long-lived objects; every full collection walked all of
    them while holding the interpreter, so every stream stood still meanwhile (issue 14). Once the engines are
    built, what is alive then is frozen out of collections; not before, while they are still being built."""
    import model_loader.startup
    import ui.page

    built = threading.Event()

    class SlowStartup:
        def __init__(self, cfg, env):
            self.slots, self.system_info = {}, dict

        def start(self):
            t = threading.Thread(target=built.wait, args=(10,), daemon=True)
            t.start()
            return t

        def close(self):
            pass

    class NoDemo:
        def launch(self, **kw):
            pass

    monkeypatch.setattr(model_loader.startup, "Startup", SlowStartup)
    monkeypatch.setattr(ui.page, "build_demo", lambda slots, cfg, info: (NoDemo(), None))
    monkeypatch.setattr(ui.page, "launch_kwargs", lambda cfg, i18n: {})
    before, thresholds = sys.getswitchinterval(), gc.get_threshold()
    for t in threading.enumerate():  # an earlier test's app may still be waiting to freeze (a CI run saw it freeze here)
        if t.name == "freeze-heap":
            t.join(15)
    gc.unfreeze()
    try:
        assert app.serve(object(), {}) == 0
        assert gc.get_freeze_count() == 0, "frozen before the engines were built"
        built.set()
        deadline = time.monotonic() + 10
        while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[2] >= 100, "full collections as frequent as ever"
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(before)


def test_the_server_log_is_not_flooded_by_a_deprecation_warning_per_request():
    """The new-user trial counted 126 Starlette deprecation warnings (from Gradio's queue route) in one session."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        app.configure_logging("INFO")
        warnings.warn("'HTTP_422_UNPROCESSABLE_ENTITY' is deprecated. Use 'HTTP_422_UNPROCESSABLE_CONTENT' instead.",
                      DeprecationWarning, stacklevel=1)  # fmt: skip
    assert not seen
