"""Sources (local, cache, HF, OpenXLab, git), quantization caching and the --check CLI (the planner: test_planner.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from model_loader.config import AppConfig
from model_loader.errors import DownloadFailed, WeightsInvalid
from model_loader.weights import sources
from model_loader.weights.quantize import awq_command, awq_dir_for, ensure_awq
from model_loader.weights.resolve import resolve_text, resolve_vision
from model_loader.weights.validation import vision_model_problems
from tests.test_planner import run_app

ROOT = Path(__file__).resolve().parents[1]


def test_local_directory(tiny_models):
    r = resolve_vision(AppConfig(vision_model=str(tiny_models["llava"])), {})
    assert r.source == "local" and r.path == tiny_models["llava"].resolve()


def test_hf_download_then_cached_offline(tiny_models, tmp_path, monkeypatch):
    calls = []

    def fake_snapshot(**kw):
        calls.append(kw)
        shutil.copytree(tiny_models["llava"], kw["local_dir"], dirs_exist_ok=True)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    cfg = AppConfig(vision_model="llava-hf/llava-1.5-7b-hf", cache_dir=str(tmp_path))
    env = {"HF_TOKEN": "hf_secret", "HF_ENDPOINT": "http://127.0.0.1:1"}
    r = resolve_vision(cfg, env)
    assert r.source == "hf" and calls[0]["token"] == "hf_secret" and "*.safetensors" in calls[0]["allow_patterns"]
    assert calls[0]["endpoint"] == "http://127.0.0.1:1"
    r2 = resolve_vision(cfg, env)  # the hub is not asked again
    assert r2.source == "cache" and len(calls) == 1


def test_corrupt_cache_is_fetched_again(tiny_models, tmp_path, monkeypatch):
    def fake_snapshot(**kw):
        shutil.copytree(tiny_models["llava"], kw["local_dir"], dirs_exist_ok=True)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    cfg = AppConfig(vision_model="llava-hf/llava-1.5-7b-hf", cache_dir=str(tmp_path))
    r = resolve_vision(cfg, {})
    shard = sorted(r.path.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    assert vision_model_problems(r.path)
    r2 = resolve_vision(cfg, {})
    assert r2.source == "hf" and vision_model_problems(r2.path) == []


def test_partial_download_is_never_loaded(tiny_models, tmp_path, monkeypatch):
    def cut_off(**kw):
        shutil.copytree(tiny_models["llava"], kw["local_dir"], dirs_exist_ok=True)
        shard = sorted(Path(kw["local_dir"]).glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:500])

    monkeypatch.setattr("huggingface_hub.snapshot_download", cut_off)
    monkeypatch.setattr(sources, "git_download", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    cfg = AppConfig(vision_model="llava-hf/llava-1.5-7b-hf", cache_dir=str(tmp_path))
    with pytest.raises(WeightsInvalid):
        resolve_vision(cfg, {})
    assert not sources.is_complete(sources.cache_dir_for(tmp_path, "llava-hf/llava-1.5-7b-hf"))


def test_git_fallback_clones_a_real_repo(tiny_models, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "llava"
    shutil.copytree(tiny_models["llava"], repo)
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "m"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda **kw: (_ for _ in ()).throw(ConnectionError("hub down")))
    cfg = AppConfig(vision_model=str(repo), cache_dir=str(tmp_path / "cache"))
    d = tmp_path / "cache" / "x"
    src = sources.download("file://" + str(repo), d, "hf", {}, lambda m: None)
    assert src == "git" and vision_model_problems(d) == []
    del cfg


def test_openxlab_sdk_is_used(tiny_models, tmp_path, monkeypatch):
    got = {}

    def fake_download(model_repo, output):
        got["repo"] = model_repo
        shutil.copytree(tiny_models["llava"], output, dirs_exist_ok=True)

    monkeypatch.setattr("openxlab.model.download", fake_download)
    r = resolve_vision(AppConfig(vision_model="owner/llava", hub="openxlab", cache_dir=str(tmp_path)), {})
    assert r.source == "openxlab" and got["repo"] == "owner/llava"


def test_every_hub_failing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "huggingface_hub.snapshot_download", lambda **kw: (_ for _ in ()).throw(ConnectionError("token hf_secret refused"))
    )
    monkeypatch.setattr(sources, "git_download", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    with pytest.raises(DownloadFailed) as e:
        resolve_vision(AppConfig(vision_model="a/b", cache_dir=str(tmp_path)), {"HF_TOKEN": "hf_secret"})
    assert "hf_secret" not in str(e.value) and "HF_ENDPOINT" in str(e.value)


def test_fp16_is_quantized_once_and_cached(tiny_models, copy_model):
    src = copy_model(tiny_models["fp16"])
    runs = []

    def fake_auto_awq(cmd, progress):
        runs.append(cmd)
        work = Path(cmd[cmd.index("--work-dir") + 1])
        shutil.copytree(tiny_models["awq"], work)

    r = resolve_text(AppConfig(text_model=str(src)), {}, quantize=lambda p, prog: ensure_awq(p, prog, run=fake_auto_awq))
    assert r.source == "quantized" and r.path == awq_dir_for(src.resolve())
    resolve_text(AppConfig(text_model=str(src)), {}, quantize=lambda p, prog: ensure_awq(p, prog, run=fake_auto_awq))
    assert len(runs) == 1
    assert "wikitext2" in runs[0] and runs[0][runs[0].index("--w-bits") + 1] == "4"


def test_awq_command_group_128():
    cmd = awq_command(Path("/m"), Path("/w"))
    assert cmd[cmd.index("--w-group-size") + 1] == "128" and cmd[cmd.index("--calib-dataset") + 1] == "wikitext2"


def test_cli_check_good_and_broken(tiny_models, copy_model):
    ok = run_app("--check", "--text-model", str(tiny_models["awq"]), "--vision-model", str(tiny_models["llava"]))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "[ok] text model" in ok.stdout and "fits" in ok.stdout
    broken = copy_model(tiny_models["awq"], "broken")
    (broken / "tokenizer.json").unlink()
    bad = run_app("--check", "--text-model", str(broken), "--no-enable-vision")
    assert bad.returncode == 1 and "[FAIL] text model" in bad.stdout and "tokenizer" in bad.stdout
