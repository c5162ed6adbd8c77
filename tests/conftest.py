"""Shared fixtures: tiny synthetic checkpoints, the fake engine in start-up slots, a launched app."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from model_loader.config import AppConfig
from model_loader.engines.slot import EngineSlot
from model_loader.startup import Startup
from tests.fakes import FakeEngine


@pytest.fixture(scope="session", autouse=True)
def _client_keeps_early_completions():
    """Backport gradio_client 2.7's fix for calls completed before they are registered (tests/client_race.py)."""
    from tests.client_race import patch_client

    with pytest.MonkeyPatch.context() as mp:
        patch_client(mp)
        yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny InternLM2 (AWQ and fp16) and LLaVA checkpoints written by the project's own writer."""
    from tests.synth import write_internlm2, write_llava

    root = tmp_path_factory.mktemp("models")
    return {
        "awq": write_internlm2(root / "internlm2-awq", size="tiny", fmt="awq", device="cpu"),
        "fp16": write_internlm2(root / "internlm2-chat-1_8b", size="tiny", fmt="fp16", device="cpu"),
        "llava": write_llava(root / "llava-1.5-7b-hf", size="tiny", device="cpu"),
    }


@pytest.fixture
def copy_model(tmp_path):
    """Copy a model directory into this test's temp dir so the test can break it."""

    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or src.name)
        shutil.copytree(src, dst)
        return dst

    return _copy


# A free port, back at once, quiet. `_frontend=False` skips only Gradio's own check that the page answers a HEAD
# request within 3 s (one try, then it raises "localhost is not accessible"): on a loaded 2-core CI machine that
# check failed a launch that was up (its startup request had answered); the tests' own requests follow anyway.
TEST_LAUNCH = dict(server_port=None, prevent_thread_lock=True, quiet=True, _frontend=False)


def fake_startup(text: FakeEngine | None = None, vision: FakeEngine | None = None, **cfg) -> Startup:
    """A Startup whose slots hold fake engines (or stay failed with a message)."""
    st = Startup(AppConfig(**cfg), {})
    for kind, eng in (("text", text), ("vision", vision)):
        slot: EngineSlot = st.slots[kind]
        if eng is not None:
            slot.engine, slot.state, slot.message = eng, "ready", "Ready"
        else:
            slot.state, slot.message = "failed", f"The {kind} engine failed to start: test"
    return st


@pytest.fixture
def engines():
    return FakeEngine("text"), FakeEngine("vision")


@pytest.fixture
def launched(engines, tmp_path, monkeypatch):
    """The real Blocks app over fake engines, launched on a free localhost port; yields (url, engines, startup)."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from ui.page import build_demo, launch_kwargs

    text, vision = engines
    st = fake_startup(text, vision, host="127.0.0.1", port=7860, max_image_pixels=60_000_000)
    demo, i18n = build_demo(st.slots, st.cfg, st.system_info)
    kw = launch_kwargs(st.cfg, i18n)
    kw.update(TEST_LAUNCH)
    _, url, _ = demo.launch(**kw)
    st.demo = demo  # for tests that look at the server's own state (its queue)
    try:
        yield url, engines, st
    finally:
        demo.close()
