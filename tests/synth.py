"""Synthetic checkpoints: random weights with the real models' tensor names, shapes, configs and tokenizers.

No real weights can be downloaded where this project is tested. TurboMind's speed and memory do not depend on
the weights' values, so a full-size synthetic checkpoint measures them exactly; a tiny one drives CPU tests.

    python -m tests.synth internlm2 OUT [--size full|tiny] [--format awq|fp16]
    python -m tests.synth llava OUT [--size full|tiny]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The project's own minimal InternLM2 modeling code, shipped in every synthetic InternLM2 checkpoint
INTERNLM2_CODE_DIR = Path(__file__).parent / "internlm2_code"
INTERNLM2_CODE = ("configuration_internlm2.py", "modeling_internlm2.py")

INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
INTERNLM2_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|action_start|>",
    "<|action_end|>",
    "<|interpreter|>",
    "<|plugin|>",
]
_CORPUS = [
    "Shanghai is a city in China. Please introduce yourself. Hello, how are you today? ",
    "上海是中国的一座城市。你好，请介绍一下你自己。今天天气怎么样？",
    "The quick brown fox jumps over the lazy dog. What is in this image? A cat sitting on a mat. ",
    "def main():\n    print('hello world')\n# code ```python``` USER: ASSISTANT: system user assistant",
]


@dataclass(frozen=True)
class InternLM2Shape:
    """The dimensions that decide memory and speed."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    max_pos: int = 32768
    group: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


INTERNLM2_FULL = InternLM2Shape(hidden=2048, intermediate=8192, heads=16, kv_heads=8, layers=24, vocab=92544)
INTERNLM2_TINY = InternLM2Shape(hidden=128, intermediate=256, heads=4, kv_heads=2, layers=2, vocab=1024)


def _torch():
    import torch  # noqa: PLC0415  (heavy; only when writing)

    return torch


def _device(device: str | None) -> str:
    torch = _torch()
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _train_tokenizer(out: Path, vocab: int, specials: list[str], extra_specials: list[str] = (), pad_to: int = 0) -> int:
    """A small byte-level BPE with the model's special tokens; returns its vocabulary size.

    With `pad_to`, the vocabulary is filled with word tokens up to the model's size, so that every id a
    random-weight model generates decodes to visible text (as with the real tokenizer).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 50, trainer)
    if extra_specials:
        tok.add_special_tokens(list(extra_specials))
    data = json.loads(tok.to_str())
    bpe_vocab = data["model"]["vocab"]
    taken = set(bpe_vocab.values()) | {t["id"] for t in data["added_tokens"]}
    next_id = 0
    while pad_to and len(taken) < pad_to:
        if next_id not in taken:
            bpe_vocab[f"\u0120w{next_id}"] = next_id  # "Ġw123" decodes to " w123"; no merge produces it
            taken.add(next_id)
        next_id += 1
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return len(taken)


def write_internlm2(out: str | os.PathLike, size: str = "full", fmt: str = "awq", device: str | None = None) -> Path:
    """Write an InternLM2-Chat-1.8B-shaped checkpoint (AWQ 4-bit gemm or fp16) to `out`.

    Both ship the InternLM2 modeling code, so the fp16 one loads in transformers (trust_remote_code) and lmdeploy's
    auto_awq can calibrate it.
    """
    torch = _torch()
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = INTERNLM2_FULL if size == "full" else INTERNLM2_TINY
    dev = _device(device)
    tok_vocab = _train_tokenizer(
        out, min(2000, s.vocab) if size == "full" else 600, INTERNLM2_SPECIALS, pad_to=s.vocab if size == "full" else 0
    )
    vocab = max(s.vocab, tok_vocab)
    cfg = dict(
        architectures=["InternLM2ForCausalLM"],
        model_type="internlm2",
        auto_map={
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        num_hidden_layers=s.layers,
        vocab_size=vocab,
        max_position_embeddings=s.max_pos,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bias=False,
        rope_scaling=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        torch_dtype="float16",
    )
    if fmt == "awq":
        cfg["quantization_config"] = dict(quant_method="awq", bits=4, group_size=s.group, version="gemm", zero_point=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in INTERNLM2_CODE:  # transformers loads these with trust_remote_code, as it does the real model's
        shutil.copyfile(INTERNLM2_CODE_DIR / name, out / name)
    g = torch.Generator(device=dev).manual_seed(0)

    def lin(k: int, n: int) -> dict:
        if fmt != "awq":
            return {"weight": (torch.randn(n, k, device=dev, generator=g) * 0.02).half()}
        return {
            "qweight": torch.randint(-(2**31), 2**31 - 1, (k, n // 8), device=dev, generator=g, dtype=torch.int64).to(
                torch.int32
            ),
            "qzeros": torch.full((k // s.group, n // 8), 0x88888888 - 2**32, dtype=torch.int32, device=dev),
            "scales": torch.full((k // s.group, n), 0.004, dtype=torch.float16, device=dev),
        }

    def ones(n: int):
        return torch.ones(n, dtype=torch.float16, device=dev)

    t = {
        "model.tok_embeddings.weight": (torch.randn(vocab, s.hidden, device=dev, generator=g) * 0.02).half(),
        "output.weight": (torch.randn(vocab, s.hidden, device=dev, generator=g) * 0.02).half(),
        "model.norm.weight": ones(s.hidden),
    }
    d = s.head_dim
    for i in range(s.layers):
        p = f"model.layers.{i}."
        t[p + "attention_norm.weight"] = ones(s.hidden)
        t[p + "ffn_norm.weight"] = ones(s.hidden)
        shapes = {
            "attention.wqkv": (s.hidden, (s.heads + 2 * s.kv_heads) * d),
            "attention.wo": (s.heads * d, s.hidden),
            "feed_forward.w1": (s.hidden, s.intermediate),
            "feed_forward.w3": (s.hidden, s.intermediate),
            "feed_forward.w2": (s.intermediate, s.hidden),
        }
        for name, (k, n) in shapes.items():
            for suffix, v in lin(k, n).items():
                t[p + name + "." + suffix] = v
    _save_sharded({k: v.cpu().contiguous() for k, v in t.items()}, out, save_file, shard_bytes=2 * 2**30)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            dict(
                tokenizer_class="PreTrainedTokenizerFast",
                bos_token="<s>",
                eos_token="</s>",
                unk_token="<unk>",
                pad_token="</s>",
                add_bos_token=True,
                model_max_length=s.max_pos,
                chat_template=INTERNLM2_CHAT_TEMPLATE,
                additional_special_tokens=INTERNLM2_SPECIALS[3:],
            )
        )
    )
    (out / "generation_config.json").write_text(json.dumps(dict(bos_token_id=1, eos_token_id=[2, 4])))
    log.info("wrote %s (%.2f GiB)", out, _size(out) / 2**30)
    return out


def write_llava(out: str | os.PathLike, size: str = "full", device: str | None = None) -> Path:
    """Write a llava-1.5-7b-hf-shaped checkpoint with the hub's tensor names (llava-hf layout)."""
    torch = _torch()
    from safetensors.torch import save_file  # noqa: PLC0415
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    full = size == "full"
    tok_vocab = _train_tokenizer(
        out, 800 if full else 400, ["<unk>", "<s>", "</s>"], ["<image>", "<pad>"], pad_to=32064 if full else 0
    )
    vocab = 32064 if full else max(512, tok_vocab)
    image_token = tok_vocab - 2
    if full:
        vision = CLIPVisionConfig(
            hidden_size=1024,
            image_size=336,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=24,
            patch_size=14,
            projection_dim=768,
        )
        text = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="float16")
        image_token = 32000
    else:
        vision = CLIPVisionConfig(
            hidden_size=32,
            image_size=28,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=2,
            patch_size=14,
            projection_dim=32,
        )
        text = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            torch_dtype="float16",
        )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        pad_token_id=image_token + 1,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        torch_dtype="float16",
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    # transformers 4.51 names differ from the hub's llava-hf files; write the hub's names
    renames = [
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", "language_model.lm_head."),
    ]
    norms = ("norm.weight", "layernorm.weight", "layrnorm.weight", "layer_norm1.weight", "layer_norm2.weight")
    g = torch.Generator(device=dev).manual_seed(0)
    tensors = {}
    for k, p in model.state_dict().items():
        for a, b in renames:
            if k.startswith(a):
                k = b + k[len(a) :]
                break
        if k.endswith(norms):
            v = torch.ones(p.shape, dtype=torch.float16, device=dev)
        else:
            v = (torch.randn(p.shape, device=dev, generator=g) * 0.02).half()
        tensors[k] = v.cpu()
    _save_sharded(tensors, out, save_file, shard_bytes=4 * 2**30)
    d = cfg.to_dict()
    d["architectures"] = ["LlavaForConditionalGeneration"]
    d["text_config"]["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(d, indent=1))
    side = vision.image_size
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": side, "width": side},
                "do_center_crop": True,
                "do_convert_rgb": True,
                "do_normalize": True,
                "do_rescale": True,
                "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_processor_type": "CLIPImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "processor_class": "LlavaProcessor",
                "resample": 3,
                "rescale_factor": 0.00392156862745098,
                "size": {"shortest_edge": side},
            }
        )
    )
    (out / "processor_config.json").write_text(
        json.dumps(
            {"patch_size": vision.patch_size, "vision_feature_select_strategy": "default", "processor_class": "LlavaProcessor"}
        )
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            dict(
                tokenizer_class="PreTrainedTokenizerFast",
                bos_token="<s>",
                eos_token="</s>",
                unk_token="<unk>",
                pad_token="<pad>",
                model_max_length=4096,
                processor_class="LlavaProcessor",
            )
        )
    )
    log.info("wrote %s (%.2f GiB)", out, _size(out) / 2**30)
    return out


def write_wikitext(out: str | os.PathLike, lines: list[str], config: str = "wikitext-2-raw-v1") -> Path:
    """A dataset repo laid out as the hub's `wikitext` (parquet per split, configs in README.md) for the fake hub."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    out = Path(out)
    (out / config).mkdir(parents=True, exist_ok=True)
    for split in ("train", "test", "validation"):
        pq.write_table(pa.table({"text": list(lines)}), out / config / f"{split}-00000-of-00001.parquet")
    splits = "".join(f"  - split: {sp}\n    path: {config}/{sp}-*\n" for sp in ("train", "test", "validation"))
    (out / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{splits}---\n")
    return out


def _save_sharded(tensors: dict, out: Path, save_file, shard_bytes: int) -> None:
    """Write shards of about `shard_bytes` and the index the hub's checkpoints carry."""
    shards: list[dict] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    n = len(shards)
    index = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main(argv: list[str] | None = None) -> int:
    """Command line for the writers (used by bench/ and the GPU scripts)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["internlm2", "llava"])
    p.add_argument("out")
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--format", choices=["awq", "fp16"], default="awq")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.model == "internlm2":
        write_internlm2(a.out, a.size, a.format, a.device)
    else:
        write_llava(a.out, a.size, a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
