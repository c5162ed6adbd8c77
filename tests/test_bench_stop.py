"""bench/gpu_stop.py's stages on CPU, over the faithful lmdeploy double (the GPU run uses the real pipeline)."""

from __future__ import annotations

import json

import pytest

from bench import gpu_stop
from model_loader.engines.seam import EngineInfo
from model_loader.engines.turbomind import LmdeployEngine
from tests.fakes import FakePipe


def test_stop_delays_cover_0_to_300_ms():
    assert gpu_stop.stop_delays_ms(8) == [0.0, 42.9, 85.7, 128.6, 171.4, 214.3, 257.1, 300.0]
    assert gpu_stop.within(500, 480) and not gpu_stop.within(500, 470)


@pytest.mark.timeout(120)
def test_gpu_stop_stages_run_and_judge(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.runs.OUT", tmp_path)
    monkeypatch.setattr(gpu_stop, "R", {})
    text_pipe = FakePipe(tokens=100_000, delay_s=0.001, max_batch_size=8)
    vision_pipe = FakePipe(tokens=100_000, delay_s=0.001, max_batch_size=2, kind="vision")
    vision_pipe.preprocess_s = 0.05
    text = LmdeployEngine(text_pipe, EngineInfo(kind="text", name="t", backend="turbomind"))
    vision = LmdeployEngine(vision_pipe, EngineInfo(kind="vision", name="v", backend="turbomind"))
    try:
        r = gpu_stop.run_all(text, vision, text_waves=2, per_wave=12, images=3, big=(400, 300))
    finally:
        text_pipe.close()
        vision_pipe.close()
    v = r["verdict"]
    assert v["every_stop_one_stats_abort"] and v["idle_after_every_batch"], json.dumps(v)
    assert v["text_id2step_within_peak"] and v["vision_id2step_within_peak"]
    assert set(v) >= {"text_decode_within_5pct", "vision_decode_within_5pct", "max_idle_after_last_stop_s"}
    assert json.loads((tmp_path / "stop.json").read_text())["verdict"] == v
