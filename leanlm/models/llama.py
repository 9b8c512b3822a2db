"""Llama / Mistral / Qwen2 / Qwen3 decoder in one implementation; families differ by flags.

`forward(input_ids, positions, cache, ctx)` takes the flattened tokens of a mixed batch (prefill
chunks and decode tokens together, as nano-vllm does), so prefill, decode and speculative
verification are the same call. Logits are computed only for the rows the caller asks for.
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.models.layers import Linear, RMSNorm, RotaryEmbedding
from leanlm.models.model_config import ModelConfig
from leanlm.native import layers as native_layers
from leanlm.native import ops as native_ops
from leanlm.quant.linear import QuantMethod, UnquantizedMethod

MethodFactory = Callable[[str], QuantMethod]  # linear layer name -> its method


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, method: MethodFactory):
        super().__init__()
        p = f"layers.{layer}.self_attn"
        self.layer, self.cfg = layer, cfg
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.qkv_bias, dtype,
                               method(f"{p}.qkv_proj"),
                               shard_sizes={"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size})
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, cfg.o_bias, dtype, method(f"{p}.o_proj"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        self.splits = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        self.native = native_ops.available()  # float32 CPU glue on leanlm/native/ops.c

    def forward(self, x, rope_tables, cache, ctx):
        T, c = x.shape[0], self.cfg
        qkv = self.qkv_proj(x)
        v = qkv[:, c.q_size + c.kv_size:].view(T, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k, _ = qkv.split(self.splits, dim=-1)
            qk = torch.cat((self.q_norm(q.view(T, c.num_heads, c.head_dim)),
                            self.k_norm(k.view(T, c.num_kv_heads, c.head_dim))), dim=1)
        else:  # q and k are adjacent in the fused output: rotate them as one tensor
            qk = qkv[:, : c.q_size + c.kv_size].view(T, c.num_heads + c.num_kv_heads, c.head_dim)
        if getattr(cache, "rope_keys", False):  # the cache stores pre-RoPE keys, rotates them on read
            q, k = RotaryEmbedding.apply(qk[:, : c.num_heads], rope_tables), qk[:, c.num_heads:]
        else:
            if not c.qk_norm and native_ops.usable(qkv, self.native) and qkv.is_contiguous():
                native_ops.rope_(qkv, c.num_heads + c.num_kv_heads, c.head_dim, *rope_tables)  # qk is a view
            else:
                qk = RotaryEmbedding.apply(qk, rope_tables)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads:]
        out = cache.attend(self.layer, q, k, v, ctx)
        return self.o_proj(out.reshape(T, c.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, method: MethodFactory):
        super().__init__()
        p, inter = f"layers.{layer}.mlp", cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * inter, cfg.mlp_bias, dtype,
                                   method(f"{p}.gate_up_proj"), shard_sizes={"gate": inter, "up": inter})
        self.down_proj = Linear(inter, cfg.hidden_size, cfg.mlp_bias, dtype, method(f"{p}.down_proj"))
        self.inter = inter
        self.native = native_ops.available()

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if native_ops.usable(gate_up, self.native) and gate_up.dim() == 2:
            return self.down_proj(native_ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, method: MethodFactory):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, layer, dtype, method)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, layer, dtype, method)
        self.native = native_ops.available()

    def forward(self, x, rope_tables, cache, ctx):
        if getattr(cache, "wants_layer_input", False):  # xquant:cl caches the residual stream itself
            cache.layer_input = x
        h = self.self_attn(self.input_layernorm(x), rope_tables, cache, ctx)
        norm = self.post_attention_layernorm
        if native_ops.usable(x, self.native):  # the residual add and the next norm in one call
            x, normed = native_ops.add_rms_norm(x, h, norm.weight, norm.eps)
        else:
            x = x + h
            normed = norm(x)
        return x + self.mlp(normed)


# HF checkpoint name (inside a layer) -> (our module, fused shard or None)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 method: MethodFactory | None = None):
        super().__init__()
        method = method or (lambda name: UnquantizedMethod())
        self.cfg, self.dtype = cfg, dtype
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype, method) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, method("lm_head"))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                    cfg.rope_scaling, dtype)
        self.native = native_ops.available()  # may run its layers in one native call
        self._native = weakref.WeakKeyDictionary()  # cache -> native_layers.NativeLayers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache, ctx) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden]."""
        return self.norm(self.run_layers(self.embed_tokens(input_ids), positions, cache, ctx))

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, cache, ctx, start: int = 0,
                   end: int | None = None) -> torch.Tensor:
        """The residual stream x [T, hidden] through layers start..end-1 (not normed): early-exit
        drafts run the first layers, and verification resumes from their output."""
        tables = self.rope.tables(positions)
        end = len(self.layers) if end is None else end
        fast = self._native_layers(cache, ctx)
        if fast is not None:  # every layer in one native call, same numbers (native/layers.py)
            out = fast.run(x, tables, ctx, start, end)
            if out is not None:
                return out
        for layer in self.layers[start:end]:
            x = layer(x, tables, cache, ctx)
        return x

    def _native_layers(self, cache, ctx):
        """The native whole-layer executor for this cache, when this step can use it."""
        if not self.native or torch.compiler.is_compiling() or not native_layers.applicable(cache, ctx):
            return None
        fast = self._native.get(cache)
        if fast is None or (fast.ok and fast.stale()):
            fast = self._native[cache] = native_layers.NativeLayers(self, cache)
        return fast if fast.ok else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # -- weights -------------------------------------------------------------------------------
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the (fused) parameters; every parameter must be filled."""
        expected = {self._key(n) for n, _ in self.named_parameters()}
        if self.cfg.tie_word_embeddings:
            expected.discard(("lm_head", None, "weight"))
        seen: set = set()
        modules = dict(self.named_modules())
        for name, tensor in tensors:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue  # tied: the embedding already holds it
            key = self._hf_key(name)
            if key is None or modules.get(key[0]) is None:
                raise ValueError(f"checkpoint tensor {name!r} does not belong to a "
                                 f"{self.cfg.architecture} with this config (mismatched checkpoint?)")
            mod, shard, param = key
            module = modules[mod]
            if isinstance(module, Linear):
                module.load_shard(shard, param, tensor)
            else:
                target = getattr(module, param)
                if target.shape != tensor.shape:
                    raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                     f"model {tuple(target.shape)}")
                target.data.copy_(tensor)
            seen.add(key)
        # a fused parameter is complete only when all its shards arrived
        have = {(m, None, p) for m, s, p in seen}
        for m, _s, p in list(seen):
            shards = modules[m].shard_offsets if isinstance(modules[m], Linear) else {}
            if shards and not all((m, s, p) in seen for s in shards):
                have.discard((m, None, p))
        missing = sorted(f"{m}.{p}" for m, _s, p in expected if (m, None, p) not in have)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def process_after_loading(self) -> None:
        for m in self.modules():
            if isinstance(m, Linear):
                m.method.process_after_loading(m)

    @staticmethod
    def _key(param_name: str):
        mod, _, param = param_name.rpartition(".")
        return (mod, None, param)

    @staticmethod
    def _hf_key(name: str):
        if name.startswith("model."):
            name = name[len("model."):]
        mod, _, param = name.rpartition(".")
        if mod.startswith("layers."):
            idx, _, inner = mod[len("layers."):].partition(".")
            if inner in _FUSED:
                fused, shard = _FUSED[inner]
                return (f"layers.{idx}.{fused}", shard, param)
        return (mod, None, param)
