"""All decoder layers of a float32 Llama-family model in one native call (ops.c's
decoder_layers_f32), for steps whose rows all attend row by row: decodes and chunks of up to
FUSED_ROWS_MAX tokens on a plain float32 paged cache, decodes on a bfloat16 paged cache, and
decodes on a kivi cache (each layer's attention through kivi_attention.c's kivi_layer_step).

Why: with the matmuls on the packed kernels, a 135M-parameter decode step still spent ~5 ms in
Python between them (module calls, wrappers, ~15 small calls per layer). Speculative decoding pays
that once per draft token too, so it bounds how cheap a draft can be. The C loop calls the same
functions in the same order as the modules (tests check the two paths bit for bit), so this is
an executor, not another model: anything it does not cover (other weight methods, other KV
codecs, qk-norm, long prefill chunks, torch.compile) runs the module path.

The descriptors hold raw pointers to the weights and the cache. They are built once per (model,
cache) and checked on every call against the modules and tensors the model holds now (one dict
lookup and identity test each, ~40 us for 30 layers), so
a weight replaced after loading (GPTQ, set_quantized, a shared norm) triggers a rebuild instead of
a read of freed memory; the descriptors keep references to every tensor they point into.
"""
from __future__ import annotations

import ctypes
import operator
import weakref

import torch

from leanlm.kv.codecs import PlainCodec
from leanlm.kv.quantized import KiviCodec
from leanlm.native import gemm, ops, qgemm
from leanlm.native import kivi as native_kivi

_L, _P, _F = ctypes.c_long, ctypes.c_void_p, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _L), ("N", _L), ("K", _L), ("w", _P), ("scale", _P), ("bias", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("norm_in", _P), ("norm_post", _P), ("kc", _P), ("vc", _P), ("cache_kind", _L), ("attn", _P)]


class _Model(ctypes.Structure):
    _fields_ = [("H", _L), ("Hq", _L), ("Hkv", _L), ("D", _L), ("I", _L), ("bs", _L),
                ("eps", _F), ("scale", _F), ("sgemm", _P), ("qgemm", _P), ("attend", _P), ("rope_q_only", _L)]


# how the executor reaches a layer's cache (ops.c's layer_t.cache_kind)
PAGES_F32, PAGES_BF16, CODEC = 0, 1, 2


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear(lin, refs: list) -> _Linear | None:
    """The descriptor of a Linear on a packed kernel (recording what it points into), or None."""
    from leanlm.quant.linear import PackedFloat32Method
    from leanlm.quant.weight_only import WeightOnlyMethod

    m, bias = lin.method, lin.bias
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    if isinstance(m, PackedFloat32Method) and "packed_weight" in lin._buffers:
        w, scale, kind = lin._buffers["packed_weight"], None, 0
    elif (isinstance(m, WeightOnlyMethod) and m.kernel == "int8-native" and m.rotation is None
          and "int8_panels" in lin._buffers):
        w, scale, kind = lin._buffers["int8_panels"], lin._buffers["int8_scales"], 1
    else:
        return None
    refs.extend((w, scale, bias))
    return _Linear(kind, lin.out_features, lin.in_features, w.data_ptr(), _ptr(scale), _ptr(bias))


def _holdings(model) -> list[tuple[dict, str, object]]:
    """(dict, key, value) for every module and tensor the descriptors depend on, as the model
    holds them now: the stale check is then one dict lookup and identity test per entry."""
    out = []
    for i, layer in enumerate(model.layers):
        out.append((model.layers._modules, str(i), layer))
        for parent, name in ((layer, "self_attn"), (layer, "mlp"), (layer, "input_layernorm"),
                             (layer, "post_attention_layernorm")):
            out.append((parent._modules, name, parent._modules[name]))
        a, mlp = layer.self_attn, layer.mlp
        for parent, name in ((a, "qkv_proj"), (a, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")):
            lin = parent._modules[name]
            out.append((parent._modules, name, lin))
            for key in ("packed_weight", "int8_panels", "int8_scales"):
                out.append((lin._buffers, key, lin._buffers.get(key)))
            out.append((lin._parameters, "bias", lin._parameters.get("bias")))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            out.append((norm._parameters, "weight", norm._parameters["weight"]))
    return out


class NativeLayers:
    """Descriptors of one model's layers on one cache; `run` or None when not applicable."""

    def __init__(self, model, cache):
        # the model keeps these per cache in a WeakKeyDictionary: holding the cache (or the
        # model) strongly here would keep a dropped cache's KV pool alive for the model's life
        self.model = weakref.proxy(model)
        self.refs: list = []
        self.ok = self._build(cache)

    def _build(self, cache) -> bool:
        model, cfg = self.model, self.model.cfg
        if (model.dtype != torch.float32 or cfg.qk_norm or not ops.available()
                or gemm.kernel() is None or qgemm.kernel() is None):
            return False
        codec = cache.codec
        kind = _cache_kind(codec, cfg.num_heads)
        if kind is None:
            return False
        self.kivi = kind == CODEC
        attn, refs = ([None] * cfg.num_layers, [])
        if self.kivi:
            attn, refs = native_kivi.layer_descriptors(codec, cfg.num_heads)
        self.attn = attn  # the descriptors themselves: layer_t.attn points into them
        layers = []
        for i, layer in enumerate(model.layers):
            descs = [_linear(lin, refs) for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                    layer.mlp.gate_up_proj, layer.mlp.down_proj)]
            if any(d is None for d in descs):
                return False
            n_in, n_post = layer.input_layernorm, layer.post_attention_layernorm
            if n_in.eps != cfg.rms_norm_eps or n_post.eps != cfg.rms_norm_eps:
                return False
            pages = (None, None) if self.kivi else (codec.k[i].data_ptr(), codec.v[i].data_ptr())
            layers.append(_Layer(*descs, n_in.weight.data_ptr(), n_post.weight.data_ptr(), *pages, kind,
                                 ctypes.addressof(attn[i]) if self.kivi else None))
        self.checked = _holdings(model)  # identity snapshot: see module docstring
        self._dicts, self._keys, self._values = (list(c) for c in zip(*self.checked))
        self.refs = refs + [v for _, _, v in self.checked] + (codec.tensors() if not self.kivi else [])
        self.codec = weakref.proxy(codec)
        self.layers = (_Layer * len(layers))(*layers)
        sg, qg = gemm.kernel(), qgemm.kernel()
        self.cfg = _Model(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.intermediate_size, cache.block_size, cfg.rms_norm_eps, cfg.head_dim ** -0.5,
                          ctypes.cast(sg, _P).value, ctypes.cast(qg, _P).value,
                          native_kivi.step_address() if self.kivi else None, int(codec.rope_keys))
        c = cfg
        qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        self.work_per_row = 4 * c.hidden_size + qkv + c.num_heads * c.head_dim + 3 * c.intermediate_size
        return True

    def stale(self) -> bool:
        # map/operator keep the ~800 lookups in C (a generator expression took ~0.35 ms)
        return not all(map(operator.is_, map(dict.get, self._dicts, self._keys), self._values))

    def run(self, x: torch.Tensor, rope_tables, ctx, start: int, end: int) -> torch.Tensor | None:
        """x [M, hidden] through layers start..end-1 -> a new tensor (x is not modified); None
        when this step is not one the executor covers (kivi knorm: a block fills in it)."""
        step = None
        if self.kivi:
            plan = native_kivi.step_plan(self.codec, ctx.slot_mapping)
            if plan is None:
                return None
            step, _keep = plan  # (_keep: the tensors step points into, alive until the call returns)
        x = x.contiguous().clone()
        M = x.shape[0]
        cos, sin = rope_tables
        work = x.new_empty(M * self.work_per_row)
        tables, lens = ctx.row_tables, ctx.row_lens
        ops.decoder_layers(x.data_ptr(), M, ctypes.byref(self.cfg),
                           ctypes.byref(self.layers, start * ctypes.sizeof(_Layer)), end - start,
                           cos.data_ptr(), sin.data_ptr(), ctx.slot_mapping.data_ptr(), tables.data_ptr(),
                           tables.shape[1], lens.data_ptr(), work.data_ptr(),
                           ctypes.byref(step) if step is not None else None)
        return x


def _cache_kind(codec, num_heads: int) -> int | None:
    """How the executor reaches this codec's storage, or None when it cannot."""
    if type(codec) is PlainCodec and codec.rotation is None and codec.fused_decode:  # ops.c reads its pages
        return {torch.float32: PAGES_F32, torch.bfloat16: PAGES_BF16}[codec.k[0].dtype]
    if type(codec) is KiviCodec and native_kivi.executor_supports(codec, num_heads):
        return CODEC
    return None


def applicable(cache, ctx) -> bool:
    """Whether this step can run on the native layers (the cache side; the model side is
    NativeLayers.ok): every row attends row by row (row_tables: decodes, and short chunks on an
    exact codec) and the codec is one _cache_kind knows."""
    return getattr(ctx, "row_tables", None) is not None and type(cache.codec) in (PlainCodec, KiviCodec)
