"""A Llama-family decoder in plain PyTorch with a row-addressed KV cache.

The engine keeps every running sequence in one row of a preallocated KV cache
and keeps the running rows packed at the front (``0..n-1``), so a decode step
attends over a *view* of the cache, never a copy. A forward pass works on a
contiguous range of rows: the running ones for a decode step, the newly
admitted ones for a prefill.

Supported checkpoints: Hugging Face ``llama``, ``mistral`` (without sliding
window) and ``qwen2`` layouts in safetensors, which covers SmolLM2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from .lora import LoraBatch, LoraSlots

__all__ = ["KVCache", "LlamaModel", "ModelConfig"]

_SUPPORTED = {"llama", "mistral", "qwen2"}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers the forward pass needs."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """Read ``config.json`` of a Hugging Face checkpoint."""
        raw: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
        model_type = str(raw.get("model_type", ""))
        if model_type not in _SUPPORTED:
            raise ValueError(
                f"model_type {model_type!r} is not supported by TorchBackend; supported: "
                f"{sorted(_SUPPORTED)}"
            )
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ValueError(f"rope type {rope_type!r} is not supported by TorchBackend")
        if raw.get("sliding_window") and model_type == "mistral":
            raise ValueError("sliding-window attention is not supported by TorchBackend")
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            vocab_size=int(raw["vocab_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``{module name: (in_features, out_features)}`` of every LoRA-able linear."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        return {
            "q_proj": (h, self.num_heads * hd),
            "k_proj": (h, self.num_kv_heads * hd),
            "v_proj": (h, self.num_kv_heads * hd),
            "o_proj": (self.num_heads * hd, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


class KVCache:
    """Preallocated keys and values: ``[layers, rows, kv_heads, max_seq_len, head_dim]``."""

    def __init__(
        self,
        cfg: ModelConfig,
        rows: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (cfg.num_layers, rows, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.rows = rows
        self.max_seq_len = max_seq_len

    @property
    def nbytes(self) -> int:
        """Memory held by the cache."""
        return self.k.nbytes + self.v.nbytes

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` into row ``dst``."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class Linear:
    """A projection's weight (and bias), ready for the fastest matmul the device has.

    On CPU the weight is reordered once into oneDNN's blocked layout and run
    with oneDNN's linear: 2.4-3.2x faster than ``F.linear`` (MKL) in fp32 and
    1.2-1.4x in bf16 for this model's shapes on the machine of
    docs/performance.md. Elsewhere, or where PyTorch lacks oneDNN, plain ``F.linear``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features = weight.shape[0]
        self.bias = bias
        self.weight = weight
        self._packed: torch.Tensor | None = None
        if _can_pack(weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            self.weight = torch.empty(0, dtype=weight.dtype)  # the packed copy replaces it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                x, self._packed, self.bias, "none", [], ""
            )
            return out
        return F.linear(x, self.weight, self.bias)


def _can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class _Layer:
    def __init__(self, w: dict[str, torch.Tensor], prefix: str, cfg: ModelConfig) -> None:
        def get(name: str) -> torch.Tensor:
            return w.pop(prefix + name)

        self.input_norm = get("input_layernorm.weight")
        self.post_norm = get("post_attention_layernorm.weight")
        q, k, v = (
            get("self_attn.q_proj.weight"),
            get("self_attn.k_proj.weight"),
            get("self_attn.v_proj.weight"),
        )
        qkv_bias: torch.Tensor | None = None
        if cfg.attention_bias:
            qkv_bias = torch.cat(
                [
                    get("self_attn.q_proj.bias"),
                    get("self_attn.k_proj.bias"),
                    get("self_attn.v_proj.bias"),
                ]
            )
        self.qkv = Linear(torch.cat([q, k, v]).contiguous(), qkv_bias)
        self.o = Linear(get("self_attn.o_proj.weight"))
        self.gate_up = Linear(
            torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]).contiguous()
        )
        self.down = Linear(get("mlp.down_proj.weight"))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


class BaseWeights:
    """The base model's linear weights read from its files one at a time, as
    ``weights(layer, module) -> [out, in]`` in the model's dtype (the forward pass keeps
    them packed for matmuls only; DoRA's preparation needs them plain)."""

    def __init__(self, model_dir: Path, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._where: dict[str, tuple[Path, str]] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self._where[key.removeprefix("model.")] = (f, key)

    def __call__(self, layer: int, module: str) -> torch.Tensor:
        """The weight of ``module`` in decoder layer ``layer``, ``[out, in]``."""
        name = f"layers.{layer}.{_PARENT[module]}.{module}.weight"
        where = self._where.get(name)
        if where is None:
            raise KeyError(f"the base model has no weight {name!r}")
        with safe_open(str(where[0]), framework="pt") as handle:
            tensor: torch.Tensor = handle.get_tensor(where[1])
        return tensor.to(self.dtype)


class LlamaModel:
    """Base weights plus the forward pass over a range of KV-cache rows."""

    def __init__(self, model_dir: Path, *, dtype: torch.dtype, device: torch.device) -> None:
        self.cfg = ModelConfig.from_dir(model_dir)
        self.dtype = dtype
        self.device = device
        state = {
            k.removeprefix("model."): v.to(device=device, dtype=dtype)
            for k, v in _load_state_dict(model_dir).items()
        }
        cfg = self.cfg
        self.embed = state.pop("embed_tokens.weight")
        lm_head = state.pop("lm_head.weight", None)
        self.lm_head = Linear(self.embed if lm_head is None or cfg.tie_word_embeddings else lm_head)
        self.norm = state.pop("norm.weight")
        self.layers = [_Layer(state, f"layers.{i}.", cfg) for i in range(cfg.num_layers)]
        inv_freq = 1.0 / (
            cfg.rope_theta
            ** (
                torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=device).float()
                / cfg.head_dim
            )
        )
        self._inv_freq = inv_freq
        self._q_out = cfg.num_heads * cfg.head_dim
        self._kv_out = cfg.num_kv_heads * cfg.head_dim
        # PyTorch's CPU attention is several times slower in 16-bit than in fp32
        # (about 5x for a decode step here, casts included); attend in fp32 there.
        self._attn_upcast = device.type == "cpu" and dtype != torch.float32

    def rope_tables(self, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for every position, ``[max_seq_len, head_dim]`` each."""
        pos = torch.arange(max_seq_len, device=self.device, dtype=torch.float32)
        freqs = torch.outer(pos, self._inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        row_start: int,
        starts: torch.Tensor,
        last_index: torch.Tensor,
        cache: KVCache,
        rope: tuple[torch.Tensor, torch.Tensor],
        lora: LoraSlots,
        plan: LoraBatch | None,
        between_layers: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Run ``tokens`` (``[n, T]``) for cache rows ``row_start..row_start+n``.

        ``starts[i]`` is the position of row i's first token; ``last_index[i]`` is
        which of its T tokens to return logits for. Returns ``[n, vocab]`` logits.
        ``between_layers`` is called after each layer but the last; it may run
        other forward passes, on other cache rows.
        """
        cfg = self.cfg
        n, t = tokens.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        offs = torch.arange(t, device=self.device)
        positions = starts[:, None] + offs[None, :]
        span = int((starts + t).max().item())
        cos = rope[0][positions][:, None]
        sin = rope[1][positions][:, None]
        keys = torch.arange(span, device=self.device)
        mask = keys[None, None, None, :] <= positions[:, None, :, None]
        rows = torch.arange(row_start, row_start + n, device=self.device)[:, None].expand(n, t)
        x = F.embedding(tokens, self.embed).reshape(n * t, cfg.hidden_size)
        for li, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            qkv = layer.qkv(h)
            if plan is not None:
                lora.apply_qkv(li, plan, h, qkv)
            q = qkv[:, : self._q_out].view(n, t, nh, hd).transpose(1, 2)
            k = qkv[:, self._q_out : self._q_out + self._kv_out].view(n, t, nkv, hd).transpose(1, 2)
            v = qkv[:, self._q_out + self._kv_out :].view(n, t, nkv, hd)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.k[li][rows, :, positions] = k.transpose(1, 2)
            cache.v[li][rows, :, positions] = v
            kk = cache.k[li, row_start : row_start + n, :, :span]
            vv = cache.v[li, row_start : row_start + n, :, :span]
            if self._attn_upcast:
                q, kk, vv = q.float(), kk.float(), vv.float()
            attn = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=nkv != nh)
            attn = attn.transpose(1, 2).reshape(n * t, nh * hd).to(x.dtype)
            o = layer.o(attn)
            if plan is not None:
                lora.apply(li, "o_proj", plan, attn, o)
            x = x + o
            h = _rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            gu = layer.gate_up(h)
            if plan is not None:
                lora.apply_gate_up(li, plan, h, gu)
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate) * up
            d = layer.down(act)
            if plan is not None:
                lora.apply(li, "down_proj", plan, act, d)
            x = x + d
            if between_layers is not None and li + 1 < len(self.layers):
                between_layers()
        last = x.view(n, t, cfg.hidden_size)[torch.arange(n, device=self.device), last_index]
        last = _rms_norm(last, self.norm, cfg.rms_norm_eps)
        return self.lm_head(last).float()
