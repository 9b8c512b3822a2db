"""Quantize a loaded model's decoder, layer by layer (the GPTQ paper's procedure).

The calibration sequences enter layer 0 as embeddings. For each decoder layer: run it on every
sequence with hooks that accumulate each linear layer's Hessian H = sum x^T x, quantize its
linear layers (GPTQ with H, or RTN), then run the *quantized* layer again to produce the next
layer's inputs, so later layers calibrate on what they will really see.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from leanlm.formats.registry import get_format
from leanlm.kv.cache import ContiguousKVCache, SeqSlice
from leanlm.quant.linear import QuantMethod
from leanlm.quant.spec import QuantSpec
from leanlm.quant.weight_only import WeightOnlyMethod

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# How many tokens the first (attention-sink) token of a calibration sequence counts as in the
# Hessian of the attention input projection, as a fraction of the sequence length: every query
# of the sequence reads the sink's key and value (see quant/calibrate.py). 1/4 of T: T/4..2T
# all measured about the same on SmolLM2; 1 (no weighting) is far worse.
SINK_WEIGHT_PER_TOKEN = 0.25


def _run_layer(model, layer, hidden: list[torch.Tensor], cache: ContiguousKVCache) -> list[torch.Tensor]:
    """Each sequence [T, hidden] through one decoder layer (a full causal prefill)."""
    out = []
    for h in hidden:
        row = cache.allocate(h.shape[0])
        try:
            positions = torch.arange(h.shape[0], device=h.device)
            ctx = cache.prepare([SeqSlice(row, 0, h.shape[0], 0)])
            out.append(layer(h, model.rope.tables(positions), cache, ctx))
        finally:
            cache.free(row)
    return out


class _DenseQuantized(QuantMethod):
    """The quantized weight dequantized once, for a long pass of prompt-sized matmuls: the packed
    kernels are GEMV-shaped and the other formats dequantize at every call, so running 128
    calibration sequences through them cost twice as long as the rest of GPTQ together. The
    function is the quantized layer's (in float32 activations, the kernels' bfloat16 aside)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def apply(self, layer, x):
        return F.linear(x, self.weight.to(x.dtype), layer.bias)


@contextmanager
def _dense_weights(linears):
    saved = [(lin, lin.method) for lin in linears]
    try:
        for lin, method in saved:
            w = method.dequantized(lin.quantized)
            if method.rotation is not None:  # codes are of W H: x H (W H)^T = x W^T
                w = method.rotation.weight(w)  # H is symmetric and its own inverse
            lin.method = _DenseQuantized(w)
        yield
    finally:
        for lin, method in saved:
            lin.method = method


@torch.inference_mode()
def quantize_model(model, spec: QuantSpec, calib: list[list[int]] | None = None,
                   progress: Callable[[str], None] | None = None, quant_head: bool = False) -> dict:
    """Quantize every decoder linear layer of `model` in place with `spec` (RTN needs no
    calibration; GPTQ uses `calib`, token-id sequences), and with `quant_head` the LM head by
    round to nearest in the same format (as `--quant-head` does at load time). Returns timing
    and error statistics."""
    from leanlm.quant.calibrate import HessianCollector
    from leanlm.quant.gptq import gptq_quantize

    fmt = get_format(spec.format)
    cfg = model.cfg
    device = model.embed_tokens.weight.device
    t0 = time.perf_counter()
    if spec.algorithm == "gptq" and not calib:
        raise ValueError(f"{spec}: GPTQ needs calibration sequences")
    hidden = [model.embed_tokens(torch.tensor(ids, device=device)) for ids in (calib or [])]
    cache = ContiguousKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.dtype, device,
                              cfg.sliding_window)
    for i, layer in enumerate(model.layers):
        linears = {name: layer.get_submodule(name) for name in LINEARS}
        hessians = {}
        if spec.algorithm == "gptq":
            sink = {"self_attn.qkv_proj": max(1.0, SINK_WEIGHT_PER_TOKEN * max(len(c) for c in calib))}
            with HessianCollector(linears, first_token_weight=sink) as collector:
                _run_layer(model, layer, hidden, cache)
            hessians = {name: collector.hessian(name) for name in linears}
        for name, lin in linears.items():
            w = lin.weight.data.float()
            method = WeightOnlyMethod.from_spec(fmt, spec)
            rotation = method.rotation_for(w.shape[1])
            if rotation is not None:  # quantize W H against the Hessian of x H: H^T X^T X H
                w = rotation.weight(w)
            if spec.algorithm == "gptq":
                h = hessians[name]
                if rotation is not None:
                    h = rotation.weight(rotation.weight(h).t().contiguous())
                q = gptq_quantize(w, h, fmt, spec.group_size, act_order=spec.act_order)
            else:
                q = fmt.quantize(w, spec.group_size)
            lin.method = method
            method.set_quantized(lin, q)
        if hidden and i + 1 < len(model.layers):
            with _dense_weights(linears.values()):
                hidden = _run_layer(model, layer, hidden, cache)  # through the quantized layer
        if progress:
            progress(f"layer {i + 1}/{len(model.layers)} quantized ({time.perf_counter() - t0:.0f} s)")
    if quant_head:
        head = model.lm_head
        method = WeightOnlyMethod.from_spec(fmt, spec)
        head.method = method
        method.process_after_loading(head)  # RTN of the (rotated) head weight
    return {"seconds": time.perf_counter() - t0, "layers": len(model.layers), "spec": str(spec)}
