"""Publish once, deploy many: `--quantize-only` quantizes for real (CPU, tiny model) and prints where, `--push-to-hub`
uploads it with huggingface_hub to a hub on localhost, and a deployment with APP_TEXT_AWQ_REPO downloads it instead
of quantizing. `--check` fetches nothing unless `--download` is given."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest

import app
from model_loader.config import AppConfig
from model_loader.errors import PublishFailed
from model_loader.weights import resolve
from model_loader.weights.publish import push_to_hub
from model_loader.weights.quantize import ensure_awq
from model_loader.weights.resolve import resolve_text
from model_loader.weights.validation import text_model_problems
from tests.hub import FakeHub

ROOT = Path(__file__).resolve().parents[1]


def test_quantize_only_then_push_then_deploy_from_the_hub(tiny_models, copy_model, tmp_path, monkeypatch, capsys):
    src = copy_model(tiny_models["fp16"])
    calib = tmp_path / "calib.txt"
    calib.write_text("Shanghai is a city in China. The quick brown fox jumps over the lazy dog.\n" * 20)
    # the real job, on the CPU with a small sample (the app runs it on the GPU with 128 x 2048 tokens)
    monkeypatch.setattr(resolve, "ensure_awq", functools.partial(ensure_awq, device="cpu", samples=4, seqlen=64))
    monkeypatch.setattr(app, "_has_gpu", lambda: True)
    with FakeHub(upload_root=tmp_path / "hub") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_write_token", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"}
        argv = ["--quantize-only", "--text-model", str(src), "--calib-file", str(calib)]
        argv += ["--cache-dir", str(tmp_path / "cache"), "--push-to-hub", "me/internlm2-chat-1_8b-awq"]
        assert app.main(argv, env) == 0
        out = capsys.readouterr().out
        awq = Path(next(line for line in out.splitlines() if line.startswith("4-bit AWQ model:")).split(": ", 1)[1])
        assert awq.is_relative_to(tmp_path / "cache") and text_model_problems(awq, require_awq=True) == []
        assert "APP_TEXT_AWQ_REPO=me/internlm2-chat-1_8b-awq" in out
        assert hub.created == ["me/internlm2-chat-1_8b-awq"] and any("hf_write_token" in t for t in hub.tokens)
        pushed = set(hub.commits[-1]["files"])
        assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_internlm2.py", "README.md"} <= pushed

        # a fresh deployment (empty caches) downloads the 4-bit model and never quantizes
        cfg = AppConfig(text_awq_repo="me/internlm2-chat-1_8b-awq", cache_dir=str(tmp_path / "deploy"))
        deploy_env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "deploy-hf")}
        r = resolve_text(cfg, deploy_env, quantize=lambda *a: pytest.fail("quantized on deploy"))
        assert r.source == "hf" and text_model_problems(r.path, require_awq=True) == []
        assert (r.path / "model.safetensors").read_bytes() == (awq / "model.safetensors").read_bytes()


def test_push_without_a_token_says_what_to_do(tiny_models):
    with pytest.raises(PublishFailed, match="HF_TOKEN"):
        push_to_hub(tiny_models["awq"], "me/x", {})


def test_push_refused_by_the_hub_is_named(tiny_models, copy_model, tmp_path):
    with FakeHub() as hub:  # no upload_root: the hub knows no such repo and refuses the commit
        with pytest.raises(PublishFailed, match="refused"):
            push_to_hub(copy_model(tiny_models["awq"]), "me/x", {"HF_ENDPOINT": hub.url, "HF_TOKEN": "t"})


def run_app(*args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_quantize_only_without_a_gpu_says_so(tiny_models, tmp_path):
    r = run_app("--quantize-only", "--text-model", str(tiny_models["fp16"]), "--cache-dir", str(tmp_path))
    assert r.returncode == 1 and "needs an NVIDIA GPU" in r.stderr and "Traceback" not in r.stderr


def test_check_fetches_nothing_unless_asked(tiny_models, tmp_path):
    with FakeHub({"llava-hf/llava-1.5-7b-hf": tiny_models["llava"]}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        args = ["--check", "--text-model", str(tiny_models["awq"]), "--cache-dir", str(tmp_path / "app")]
        r = run_app(*args, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "[--] vision model" in r.stdout and "not downloaded yet" in r.stdout and "--download" in r.stdout
        assert not hub.requests  # not even asked
        assert "GPU: 22.5 GiB total" in r.stdout  # no GPU here: planned for an A10
        r = run_app(*args, "--download", env=env)
        assert r.returncode == 0 and "[ok] vision model" in r.stdout
        assert any(p.endswith(".safetensors") for _, p, _ in hub.requests)
        r = run_app(*args, env={**env, "HF_HUB_OFFLINE": "1"})
        assert "[ok] vision model" in r.stdout and "(cache)" in r.stdout
