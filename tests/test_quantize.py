"""4-bit quantization for real, on the CPU: the tiny fp16 InternLM2 (the project's own modeling code) loads in
transformers, and lmdeploy's own auto_awq calibrates it on a local file or on wikitext2 from a hub on localhost
(lmdeploy's loader, the real `datasets`). Failures name their cause; the job has a time limit and dies with the app.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from model_loader.errors import CalibrationDataUnavailable, QuantizationFailed, QuantizationOutOfMemory, WeightsInvalid
from model_loader.weights import awq_job
from model_loader.weights.quantize import awq_dir_for, ensure_awq, job_error, progress_line, run_job, source_identity
from model_loader.weights.validation import text_model_problems
from tests.hub import FakeHub
from tests.synth import write_wikitext

ROOT = Path(__file__).resolve().parents[1]
TEXT = ["The quick brown fox jumps over the lazy dog.", " = Shanghai = ", "Shanghai is a city in China. Hello!"] * 30


def cpu_awq(src, cache, env, **kw):
    """ensure_awq as the app runs it, on the CPU with a small calibration sample."""
    return ensure_awq(src, cache, lambda m: None, env=env, device="cpu", samples=4, seqlen=64, **kw)


@pytest.fixture
def job_env(tmp_path) -> dict[str, str]:
    """Caches of the child process (transformers' remote code, datasets) inside the test's temp dir."""
    return {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_HUB_DISABLE_XET": "1"}


def test_tiny_fp16_loads_with_remote_code_and_computes_llama_maths(tiny_models):
    """transformers loads our InternLM2 (trust_remote_code), and its logits equal transformers' own Llama given the
    same weights unpacked from wqkv: RMSNorm, rotary, grouped-query attention and SwiGLU are the real maths."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    src = tiny_models["fp16"]
    m = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, torch_dtype=torch.float32)
    assert type(m).__name__ == "InternLM2ForCausalLM" and type(m.model.layers[0]).__name__ == "InternLM2DecoderLayer"
    assert type(m.model.norm).__name__ == "InternLM2RMSNorm" and hasattr(m, "output")
    c = m.config
    heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=c.rope_theta,
            max_position_embeddings=c.max_position_embeddings,
        )
    ).float()
    sd = {"model.embed_tokens.weight": m.model.tok_embeddings.weight, "model.norm.weight": m.model.norm.weight}
    sd["lm_head.weight"] = m.output.weight
    for i, layer in enumerate(m.model.layers):
        p = f"model.layers.{i}."
        wqkv = layer.attention.wqkv.weight.view(kv, heads // kv + 2, d, c.hidden_size)
        sd[p + "self_attn.q_proj.weight"] = wqkv[:, :-2].reshape(heads * d, c.hidden_size)
        sd[p + "self_attn.k_proj.weight"] = wqkv[:, -2].reshape(kv * d, c.hidden_size)
        sd[p + "self_attn.v_proj.weight"] = wqkv[:, -1].reshape(kv * d, c.hidden_size)
        sd[p + "self_attn.o_proj.weight"] = layer.attention.wo.weight
        sd[p + "mlp.gate_proj.weight"] = layer.feed_forward.w1.weight
        sd[p + "mlp.up_proj.weight"] = layer.feed_forward.w3.weight
        sd[p + "mlp.down_proj.weight"] = layer.feed_forward.w2.weight
        sd[p + "input_layernorm.weight"] = layer.attention_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
    llama.load_state_dict(sd)
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = m(ids).logits, llama(ids).logits
    assert ours.shape == (2, 11, c.vocab_size)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_auto_awq_quantizes_on_a_local_text_file_once(tiny_models, copy_model, tmp_path, job_env):
    src = copy_model(tiny_models["fp16"])
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(TEXT), encoding="utf-8")
    out = cpu_awq(src, tmp_path / "cache", job_env, calib_file=str(calib))
    assert out.parent == tmp_path / "cache" / "awq" and text_model_problems(out, require_awq=True) == []
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4 and cfg["quantization_config"]["group_size"] == 128
    assert (out / "modeling_internlm2.py").is_file() and not list(out.glob("*_stats.pth"))
    assert not list(out.parent.glob(".*partial*"))  # the temporary folder was renamed
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert "model.layers.0.attention.wqkv.qweight" in f.keys()  # what TurboMind's AWQ reader takes
    again = ensure_awq(src, tmp_path / "cache", run=lambda *a: pytest.fail("quantized twice"))
    assert again == out


def test_wikitext2_comes_from_the_hub_through_lmdeploys_own_loader(tiny_models, tmp_path, job_env):
    """No --calib-file: lmdeploy's get_calib_loaders('wikitext2') loads it with the real `datasets` from HF_ENDPOINT."""
    with FakeHub(datasets={"wikitext": write_wikitext(tmp_path / "wikitext", TEXT)}) as hub:
        out = cpu_awq(tiny_models["fp16"], tmp_path / "cache", {**job_env, "HF_ENDPOINT": hub.url})
    assert text_model_problems(out, require_awq=True) == []
    assert any(path.endswith("train-00000-of-00001.parquet") for _, path, _ in hub.requests)


def test_unreachable_calibration_data_is_named(tiny_models, tmp_path, job_env):
    with pytest.raises(CalibrationDataUnavailable) as e:
        cpu_awq(tiny_models["fp16"], tmp_path / "cache", {**job_env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert "--calib-file" in e.value.hint and "127.0.0.1:9" in e.value.message
    assert "GPU memory" not in str(e.value)
    assert not (tmp_path / "cache" / "awq").exists() or not list((tmp_path / "cache" / "awq").iterdir())


def test_model_files_transformers_cannot_load_are_named(tiny_models, copy_model, tmp_path, job_env):
    src = copy_model(tiny_models["fp16"])
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] *= 2  # the shards no longer match the config
    (src / "config.json").write_text(json.dumps(cfg))
    calib = tmp_path / "calib.txt"
    calib.write_text("hello " * 100)
    with pytest.raises(WeightsInvalid) as e:
        cpu_awq(src, tmp_path / "cache", job_env, calib_file=str(calib))
    assert "could not load it" in str(e.value) and "calibration" not in str(e.value)


def test_a_changed_source_is_quantized_again(tiny_models, copy_model, tmp_path):
    src = copy_model(tiny_models["fp16"])
    runs = []

    def fake_job(cmd, progress):
        runs.append(cmd)
        import shutil

        shutil.copytree(tiny_models["awq"], cmd[cmd.index("model_loader.weights.awq_job") + 2])

    first = ensure_awq(src, tmp_path / "cache", run=fake_job)
    assert ensure_awq(src, tmp_path / "cache", run=fake_job) == first and len(runs) == 1
    (src / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": [2, 4], "changed": true}')
    second = ensure_awq(src, tmp_path / "cache", run=fake_job)
    assert second != first and len(runs) == 2
    assert source_identity(src, "abc") == source_identity(tmp_path, "abc")  # a hub revision decides alone
    assert awq_dir_for(tmp_path, "m", "revision:abc").name.startswith("m-awq-w4g128-")


def test_failure_causes_from_the_jobs_last_line():
    src = Path("/m/internlm2-chat-1_8b")
    oom = job_error(3, ["...", f"{awq_job.ERROR_MARK} out-of-memory: OutOfMemoryError: CUDA out of memory"], False, 60, src, "")
    assert isinstance(oom, QuantizationOutOfMemory) and "CUDA out of memory" in oom.message
    killed = job_error(-signal.SIGKILL, ["Loading calibrate dataset ..."], False, 60, src, "")
    assert isinstance(killed, QuantizationOutOfMemory)
    slow = job_error(-signal.SIGKILL, [], True, 600, src, "")
    assert type(slow) is QuantizationFailed and "longer than 10 minutes" in slow.message
    other = job_error(1, ["Traceback", "RuntimeError: boom"], False, 60, src, "")
    assert type(other) is QuantizationFailed and "boom" in other.message


def test_a_calibration_file_that_cannot_be_read_is_named():
    line = f"{awq_job.ERROR_MARK} calib-data: FileNotFoundError: [Errno 2] No such file or directory: '/data/calib.txt'"
    e = job_error(3, [line], False, 60, Path("/m/x"), "https://huggingface.co", "/data/calib.txt")
    assert isinstance(e, CalibrationDataUnavailable) and "/data/calib.txt" in e.message and "wikitext2" not in e.message


def test_progress_lines_follow_the_layers():
    assert progress_line("Loading calibrate dataset ...", 24).endswith("loading the calibration text ...")
    assert progress_line("model.layers.3, samples: 128, max gpu memory: 2.10 GB", 24) == "Quantizing: calibrating layer 4/24"
    assert progress_line("model.layers.23 smooth weight done. max gpu memory: 2.10 GB", 24).endswith("smoothing layer 24/24")
    assert progress_line("model.layers.0.feed_forward.w2 weight packed.", 24).endswith("packing layer 1/24")
    assert progress_line("Move model.layers.0 to CPU.", 24) is None


def test_the_job_has_a_time_limit():
    t0 = time.monotonic()
    with pytest.raises(QuantizationFailed, match="took longer than"):
        run_job([sys.executable, "-c", "import time; time.sleep(60)"], lambda m: None, timeout_s=1.0)
    assert time.monotonic() - t0 < 10


def test_the_job_dies_with_the_app(tmp_path):
    """The app is killed outright (no atexit): Linux's parent-death signal takes the job down too."""
    app = textwrap.dedent(
        f"""
        import logging, sys
        sys.path.insert(0, {str(ROOT)!r})
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from model_loader.weights.quantize import run_job
        child = "import os, time; print('child', os.getpid(), flush=True); time.sleep(120)"
        run_job([sys.executable, "-c", child], print, timeout_s=300)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", app], stdout=subprocess.PIPE, text=True)
    pid = None
    for line in p.stdout:
        if "child" in line:
            pid = int(line.split()[-1])
            break
    assert pid
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.05)
    assert not _alive(pid), "the quantization job outlived the app"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited; only its parent's reaping is left
