"""XQuant (`xquant:BITS[:gG][:cl]`, Tomar et al. 2025): cache a quantized latent of the layer input
instead of K and V, and rematerialize K and V from it at attention time.

Latent (default). This model family is grouped-query: the layer input X (hidden 576 for SmolLM2)
is wider than K and V together (2 * Hkv * D = 384), so caching X itself would cost more than the
plain cache. As XQuant does for GQA, the stacked projection W = [W_k | W_v] (hidden x 2*Hkv*D) is
decomposed once at load, W = U S V^T, and the cache holds the latent L = X U S (2*Hkv*D wide);
K (before RoPE) and V are L V^T. Since [K_pre | V] = X W = L V^T with V orthogonal, L equals
[K_pre | V] V, so the codec computes it from the step's pre-RoPE k and v (no second projection of
X) and applies RoPE to the rematerialized keys at their positions on every read - the model's
attention hands this cache pre-RoPE keys (`rope_keys`). The basis orders latent channels by
singular value, so a group of adjacent channels shares a similar range: L is quantized per token
over groups of G channels (default 32), asymmetric min-max, fp16 scale and zero (quantized.py's
asym_quantize). Reads cost one [tokens, 384] x [384, 384] matmul per layer, plus RoPE.

Cross-layer (`cl`, XQuant-CL). X here is the residual stream entering the layer, before its
RMSNorm: consecutive layers' inputs differ only by one attention + MLP update (x_l = x_{l-1} +
block output), while the post-norm inputs differ by each layer's norm weights too, so the
pre-norm stream is the one whose deltas are small. Layer l stores Q(x_l - x̂_{l-1}), the delta
from the previous layer's *reconstruction* (layer 0 stores its input, the token embedding), so
x̂_l = x̂_{l-1} + deq(...) and quantization errors do not accumulate over depth. At attention time
x̂_l of every cached token is accumulated layer by layer (one running sum per read of the step,
reads happen in the same order in every layer), normed with the layer's RMSNorm and projected
by its k/v weights; RoPE is applied to the keys. X is `hidden` wide (576 > 384 here), so cl pays
off only at low bits. A step's layers must run in one pass (no early-exit split steps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leanlm.kv.codecs import KVCodec
from leanlm.kv.quantized import asym_quantize, pack_codes, unpack_codes
from leanlm.models.layers import RotaryEmbedding

DEFAULT_GROUP = 32


def kv_weights(model) -> list[torch.Tensor]:
    """Each layer's stacked [W_k; W_v] rows (float64 [2*kv_size, hidden]) from the model's fused
    qkv projection; needs unquantized (float) projection weights."""
    c, out = model.cfg, []
    for i, layer in enumerate(model.layers):
        w = getattr(layer.self_attn.qkv_proj, "weight", None)
        if w is None or not w.dtype.is_floating_point or w.shape != (c.q_size + 2 * c.kv_size, c.hidden_size):
            raise ValueError(f"xquant rematerializes K and V from float k/v projection weights; layer {i}'s "
                             f"qkv_proj holds {None if w is None else (tuple(w.shape), w.dtype)} (quantized "
                             "weights: use xquant without weight quantization, or another --kv codec)")
        out.append(w.detach()[c.q_size:].double())
    return out


class XQuantCodec(KVCodec):
    rope_keys = True  # keys arrive before RoPE; reads rotate them at their positions

    def __init__(self, model, num_slots: int, block_size: int, dtype: torch.dtype, device,
                 bits: int, group: int = DEFAULT_GROUP, cross_layer: bool = False):
        c = model.cfg
        if c.qk_norm or c.qkv_bias:
            raise ValueError(f"xquant supports models without q/k norm and qkv bias; {c.architecture} has "
                             f"{'qk_norm' if c.qk_norm else 'a qkv bias'}")
        self.cross_layer = self.wants_layer_input = cross_layer
        self.bits, self.group, self.block_size = bits, group, block_size
        self.num_layers, self.num_kv_heads, self.head_dim = c.num_layers, c.num_kv_heads, c.head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.width = c.hidden_size if cross_layer else 2 * c.kv_size
        if self.width % group or group % 8:
            raise ValueError(f"xquant group g{group} must be a multiple of 8 dividing the cached width {self.width}")
        self.spec = f"xquant:{bits}:g{group}" + (":cl" if cross_layer else "")
        w = kv_weights(model)
        if cross_layer:  # rematerialize: RMSNorm(x̂) [W_k; W_v]^T
            self.w_kv = [wi.to(dtype=dtype, device=device) for wi in w]
            self.norm_w = [layer.input_layernorm.weight.detach().float() for layer in model.layers]
            self.eps = c.rms_norm_eps
        else:  # latent basis: V^T of W^T = U S V^T, [2*kv, 2*kv] per layer
            self.basis = [torch.linalg.svd(wi.T, full_matrices=False)[2].to(dtype=dtype, device=device) for wi in w]
        self.cos, self.sin = model.rope.cos.to(device), model.rope.sin_signed.to(device)
        ng = self.width // group
        self.codes = [torch.zeros(num_slots, self.width * bits // 8, dtype=torch.uint8, device=device)
                      for _ in range(self.num_layers)]
        self.sz = [torch.zeros(num_slots, ng, 2, dtype=torch.float16, device=device) for _ in range(self.num_layers)]
        self._prev = None              # cl: x̂_{l-1} of the step's new tokens
        self._acc: list[torch.Tensor] = []  # cl: x̂ of every read of this step, by read order
        self._read_i = 0

    def tensors(self):
        return self.codes + self.sz

    def bytes_per_token(self) -> int:
        return self.num_layers * (self.width * self.bits // 8 + 4 * self.width // self.group)

    def release(self, blocks):
        pass

    # -- quantization of [n, width] rows per token over channel groups ------------------------------
    def _quantize(self, layer, slots, x):
        q, s, z = asym_quantize(x.float().view(-1, self.width // self.group, self.group), -1, self.bits)
        self.codes[layer].index_copy_(0, slots, pack_codes(q.view(-1, self.width), self.bits))
        self.sz[layer].index_copy_(0, slots, torch.cat((s, z), -1))
        return (q * s.float() + z.float()).flatten(-2)  # what a read will dequantize

    def _dequantize(self, codes, sz):
        q = unpack_codes(codes, self.bits).float().unflatten(-1, (-1, self.group))
        sz = sz.float()
        return (q * sz[..., :1] + sz[..., 1:]).flatten(-2)

    def write(self, layer, slots, k, v, x=None) -> None:
        if not self.cross_layer:
            latent = torch.cat((k.flatten(1), v.flatten(1)), 1).to(self.dtype) @ self.basis[layer].T
            self._quantize(layer, slots, latent)
            return
        if x is None:
            raise RuntimeError("xquant:cl needs the layer input x (the model's attention passes it)")
        if layer == 0:
            self._prev, self._acc, self._read_i = None, [], 0
        elif self._prev is None:
            raise RuntimeError("xquant:cl: layer {layer} written before layer 0 in this step "
                               "(a step's layers must run in one pass)")
        self._read_i = 0
        x = x.float()
        delta = x if layer == 0 else x - self._prev
        self._prev = (self._prev if layer else 0) + self._quantize(layer, slots, delta)

    def _kv(self, layer, codes, sz):
        """K (RoPE at positions 0..n-1 of the leading sequence dim) and V from the stored rows."""
        deq = self._dequantize(codes, sz)  # [..., n, width]
        if self.cross_layer:
            i = self._read_i
            self._read_i += 1
            if layer == 0:
                self._acc.append(deq)
            else:
                self._acc[i] = self._acc[i] + deq
            h = F.rms_norm(self._acc[i], (self.width,), self.norm_w[layer], self.eps).to(self.dtype)
            kv = h @ self.w_kv[layer].T
        else:
            kv = deq.to(self.dtype) @ self.basis[layer]
        H, D = self.num_kv_heads, self.head_dim
        k, v = kv.unflatten(-1, (2, H, D)).unbind(-3)
        n = k.shape[-3]
        return RotaryEmbedding.apply(k, (self.cos[:n].unsqueeze(1), self.sin[:n].unsqueeze(1))), v

    def read_blocks(self, layer, block_tables):
        B, nblk = block_tables.shape
        bs = self.block_size
        rows = block_tables.reshape(-1)
        codes = self.codes[layer].view(-1, bs, self.codes[layer].shape[1]).index_select(0, rows)
        sz = self.sz[layer].view(-1, bs, *self.sz[layer].shape[1:]).index_select(0, rows)
        return self._kv(layer, codes.view(B, nblk * bs, -1), sz.view(B, nblk * bs, *sz.shape[2:]))

    def read_slots(self, layer, first_slot, length):
        sl = slice(first_slot, first_slot + length)
        return self._kv(layer, self.codes[layer][sl], self.sz[layer][sl])
