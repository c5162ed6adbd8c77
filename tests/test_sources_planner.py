"""Sources (local, cache, HF, OpenXLab, git), quantization caching and the --check CLI (the planner: test_planner.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from model_loader.config import AppConfig
from model_loader.errors import DownloadFailed
from model_loader.weights import sources
from model_loader.weights.quantize import ensure_awq
from model_loader.weights.resolve import resolve_text, resolve_vision
from model_loader.weights.validation import vision_model_problems
from tests.hub import FakeHub
from tests.test_planner import run_app

ROOT = Path(__file__).resolve().parents[1]


def test_local_directory(tiny_models):
    r = resolve_vision(AppConfig(vision_model=str(tiny_models["llava"])), {})
    assert r.source == "local" and r.path == tiny_models["llava"].resolve()


@pytest.fixture
def hub(tiny_models):
    with FakeHub({"llava-hf/llava-1.5-7b-hf": tiny_models["llava"]}) as h:
        yield h


def no_git(monkeypatch):
    monkeypatch.setattr(sources, "git_download", lambda *a, **k: (_ for _ in ()).throw(OSError("no git here")))


def resolve_gets(hub) -> list[str]:
    return [p for m, p, _ in hub.requests if m == "GET" and not p.startswith("/api/")]


def test_hf_download_lands_in_the_hf_cache_then_starts_offline(hub, tmp_path):
    cfg = AppConfig(vision_model="llava-hf/llava-1.5-7b-hf", cache_dir=str(tmp_path / "app"))
    env = {"HF_TOKEN": "hf_secret", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    r = resolve_vision(cfg, env)
    assert r.source == "hf" and r.path.is_relative_to(tmp_path / "hf" / "hub") and len(r.revision) == 40
    assert not (tmp_path / "app").exists()  # the app's cache holds only what huggingface_hub does not
    assert any("hf_secret" in t for t in hub.tokens)
    got = len(resolve_gets(hub))
    r2 = resolve_vision(cfg, env)  # the hub is not asked again
    assert r2.source == "cache" and r2.path == r.path and len(resolve_gets(hub)) == got
    hub.server.should_exit = True
    r3 = resolve_vision(cfg, {**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
    assert r3.source == "cache" and vision_model_problems(r3.path) == []


def test_a_model_already_in_the_users_hf_cache_is_not_fetched_again(hub, tmp_path):
    from huggingface_hub import snapshot_download

    home = tmp_path / "hf"
    snapshot_download("llava-hf/llava-1.5-7b-hf", cache_dir=str(home / "hub"), endpoint=hub.url)  # the user's own copy
    before = len(resolve_gets(hub))
    r = resolve_vision(
        AppConfig(vision_model="llava-hf/llava-1.5-7b-hf", cache_dir=str(tmp_path / "app")), {"HF_HOME": str(home)}
    )
    assert r.source == "cache" and len(resolve_gets(hub)) == before and vision_model_problems(r.path) == []


def test_offline_and_not_in_the_cache_says_so(tmp_path, monkeypatch):
    no_git(monkeypatch)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty")}
    with pytest.raises(DownloadFailed) as e:
        resolve_vision(AppConfig(vision_model="llava-hf/llava-1.5-7b-hf", cache_dir=str(tmp_path)), env)
    assert "offline and not in the cache" in str(e.value).lower() and "check the network" not in str(e.value).lower()


def test_corrupt_cache_is_fetched_again(hub, tmp_path):
    cfg = AppConfig(vision_model="llava-hf/llava-1.5-7b-hf", cache_dir=str(tmp_path / "app"))
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    r = resolve_vision(cfg, env)
    shard = sorted(r.path.glob("model-*.safetensors"))[0]
    blob = shard.resolve()
    data = blob.read_bytes()
    blob.chmod(0o644)
    blob.write_bytes(data[:1000])
    assert vision_model_problems(r.path)
    r2 = resolve_vision(cfg, env)
    assert vision_model_problems(r2.path) == [] and shard.resolve().read_bytes() == data


def test_local_folder_is_used_in_place_even_read_only(tiny_models, copy_model, tmp_path):
    src = copy_model(tiny_models["fp16"])
    before = sorted(p.name for p in src.parent.iterdir())
    runs = []

    def fake_job(cmd, progress):
        runs.append(cmd)
        shutil.copytree(tiny_models["awq"], cmd[cmd.index("model_loader.weights.awq_job") + 2])

    src.chmod(0o555)
    try:
        cfg = AppConfig(text_model=str(src), cache_dir=str(tmp_path / "cache"))
        quantize = lambda r, prog: ensure_awq(r.path, cfg.cache_path, prog, run=fake_job)  # noqa: E731
        r = resolve_text(cfg, {}, quantize=quantize)
        assert r.source == "quantized" and r.path.is_relative_to(tmp_path / "cache" / "awq")
        assert resolve_text(cfg, {}, quantize=quantize).path == r.path and len(runs) == 1
    finally:
        src.chmod(0o755)
    assert sorted(p.name for p in src.parent.iterdir() if p.name != "cache") == before  # nothing beside the source


def test_git_fallback_clones_a_real_repo(tiny_models, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "llava"
    shutil.copytree(tiny_models["llava"], repo)
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "m"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda **kw: (_ for _ in ()).throw(ConnectionError("hub down")))
    d = tmp_path / "cache" / "x"
    path, src = sources.download("file://" + str(repo), d, "hf", {"HF_ENDPOINT": "http://127.0.0.1:9"}, lambda m: None)
    assert src == "git" and path == d and vision_model_problems(d) == []


def test_openxlab_sdk_is_used_and_lands_in_the_app_cache(tiny_models, tmp_path, monkeypatch):
    got = {}

    def fake_download(model_repo, output):
        got["repo"] = model_repo
        shutil.copytree(tiny_models["llava"], output, dirs_exist_ok=True)

    monkeypatch.setattr("openxlab.model.download", fake_download)
    r = resolve_vision(AppConfig(vision_model="owner/llava", hub="openxlab", cache_dir=str(tmp_path)), {})
    assert r.source == "openxlab" and got["repo"] == "owner/llava" and r.path == tmp_path / "owner--llava"
    assert resolve_vision(AppConfig(vision_model="owner/llava", hub="openxlab", cache_dir=str(tmp_path)), {}).source == "cache"


def test_every_hub_failing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "huggingface_hub.snapshot_download", lambda **kw: (_ for _ in ()).throw(ConnectionError("token hf_secret refused"))
    )
    no_git(monkeypatch)
    env = {"HF_TOKEN": "hf_secret", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    with pytest.raises(DownloadFailed) as e:
        resolve_vision(AppConfig(vision_model="a/b", cache_dir=str(tmp_path)), env)
    assert "hf_secret" not in str(e.value) and "HF_ENDPOINT" in str(e.value)


def test_cli_check_good_and_broken(tiny_models, copy_model):
    ok = run_app("--check", "--text-model", str(tiny_models["awq"]), "--vision-model", str(tiny_models["llava"]))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "[ok] text model" in ok.stdout and "fits" in ok.stdout
    # no GPU here: the plan says whose card it assumed (new-user trial: it read as if a 22.5 GiB GPU were present)
    assert "No NVIDIA GPU is visible: this plan is for an A10 (22.5 GiB)" in ok.stdout and "--gpu-mem" in ok.stdout
    broken = copy_model(tiny_models["awq"], "broken")
    (broken / "tokenizer.json").unlink()
    bad = run_app("--check", "--text-model", str(broken), "--no-enable-vision")
    assert bad.returncode == 1 and "[FAIL] text model" in bad.stdout and "tokenizer" in bad.stdout
