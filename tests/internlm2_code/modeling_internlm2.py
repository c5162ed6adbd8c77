"""A minimal InternLM2 for transformers' remote code: what lmdeploy's AWQ calibration loads and runs.

Class and attribute names are InternLM2's own (lmdeploy's lite maps them: InternLM2ForCausalLM,
InternLM2DecoderLayer, InternLM2RMSNorm, attention.wqkv/wo, feed_forward.w1/w2/w3, output, model.tok_embeddings,
model.norm). The maths is the model's: RMSNorm, rotary embeddings, grouped-query attention with q, k and v packed
per key-value head in one `wqkv` matrix, and a SwiGLU MLP. No KV cache: generation recomputes the prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_internlm2 import InternLM2Config


class InternLM2RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (batch, 1, seq, head_dim) for the given positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class InternLM2Attention(nn.Module):
    """Grouped-query attention; wqkv holds, per key-value head, its query heads, then its key, then its value."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.wqkv = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim, bias=config.bias
        )
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None, None]:
        bsz, q_len, _ = hidden_states.shape
        if position_ids is None:
            position_ids = torch.arange(q_len, device=hidden_states.device)[None]
        qkv = self.wqkv(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.num_key_value_groups + 2, self.head_dim)
        q = qkv[..., : self.num_key_value_groups, :].reshape(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        cos, sin = rotary(position_ids.expand(bsz, -1), self.head_dim, self.config.rope_theta, q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(self.num_key_value_groups, dim=1)
        v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(bsz, q_len, self.num_heads * self.head_dim)
        return self.wo(out), None, None


class InternLM2MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP, each with a residual."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.attention = InternLM2Attention(config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor]:
        h, _, _ = self.attention(self.attention_norm(hidden_states), attention_mask, position_ids)
        hidden_states = hidden_states + h
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
        return (hidden_states,)


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    _no_split_modules = ["InternLM2DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()


def causal_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean (batch, 1, q, k) mask: causal, and padded positions hidden."""
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask[:, None, None, :].bool()


class InternLM2Model(InternLM2PreTrainedModel):
    """Embedding, decoder layers, final norm."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        hidden_states = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        q_len = hidden_states.shape[1]
        if position_ids is None:
            position_ids = torch.arange(q_len, device=hidden_states.device)[None]
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = causal_mask(attention_mask, q_len)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids)[0]
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states))


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    """The language model head `output` over InternLM2Model."""

    _tied_weights_keys = []

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.output = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs) -> dict:
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds).last_hidden_state
        logits = self.output(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
