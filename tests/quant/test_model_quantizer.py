"""Quantizing a whole (tiny) model layer by layer: RTN through the quantizer equals RTN at load
time, GPTQ with calibration lands closer to the float model than RTN, rotation keeps x W^T,
and calibration windows come from the calibration text."""
import json

import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.quant.cli import load_calibration
from leanlm.quant.model_quantizer import quantize_model
from leanlm.quant.spec import QuantSpec


def final_hidden(llm, seqs):
    """Final-normed hidden states of each sequence (a full prefill through the engine's model)."""
    from leanlm.kv.cache import ContiguousKVCache, SeqSlice

    m = llm.engine.model
    cfg = m.cfg
    cache = ContiguousKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, m.dtype, "cpu")
    out = []
    with torch.inference_mode():
        for ids in seqs:
            row = cache.allocate(len(ids))
            ctx = cache.prepare([SeqSlice(row, 0, len(ids), 0)])
            out.append(m(torch.tensor(ids), torch.arange(len(ids)), cache, ctx))
            cache.free(row)
    return torch.cat(out)


def random_seqs(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (length,), generator=g).tolist() for _ in range(n)]


def logprobs(llm, prompt):
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0]
    return {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}


def test_rtn_through_the_quantizer_equals_rtn_at_load_time(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    prompt = [5, 17, 42, 99, 3, 250, 7]
    loaded = LLM(path, dtype="float32", quant="rtn:int4:g32")
    llm = LLM(path, dtype="float32")
    quantize_model(llm.engine.model, QuantSpec.parse("rtn:int4:g32"))
    assert logprobs(llm, prompt) == logprobs(loaded, prompt)


@pytest.mark.parametrize("spec", ["gptq:int3:g32", "gptq:int4", "gptq:int3:g32:act-order", "gptq:mxfp4",
                                  "gptq:mxfp4:act-order"])
def test_gptq_is_closer_to_the_float_model_than_rtn(tiny_model_dir, spec):
    path = str(tiny_model_dir("llama"))
    calib, held_out = random_seqs(16, 48, seed=1), random_seqs(4, 48, seed=2)
    ref = final_hidden(LLM(path, dtype="float32"), held_out)
    gptq = LLM(path, dtype="float32")
    stats = quantize_model(gptq.engine.model, QuantSpec.parse(spec), calib)
    rtn_spec = spec.replace("gptq", "rtn").replace(":act-order", "")
    rtn = LLM(path, dtype="float32")
    quantize_model(rtn.engine.model, QuantSpec.parse(rtn_spec))
    err_gptq = (final_hidden(gptq, held_out) - ref).pow(2).mean().item()
    err_rtn = (final_hidden(rtn, held_out) - ref).pow(2).mean().item()
    assert err_gptq < 0.9 * err_rtn, (spec, err_gptq, err_rtn)
    assert stats["layers"] == 3 and stats["spec"] == spec


def test_rotation_at_load_time_keeps_the_layer_function(tiny_model_dir):
    """rtn:int8:rotate quantizes W H; with x H online the outputs stay close to the float model,
    and as close as plain int8 (a rotation never hurts an 8-bit grid much)."""
    path = str(tiny_model_dir("llama"))
    seqs = random_seqs(2, 32, seed=3)
    ref = final_hidden(LLM(path, dtype="float32"), seqs)
    rot = LLM(path, dtype="float32", quant="rtn:int8:rotate")
    layer = rot.engine.model.layers[0].mlp.down_proj
    assert layer.method.rotation is not None and layer.method.rotation.block == 128
    err = (final_hidden(rot, seqs) - ref).abs().max().item()
    assert err < 0.1 * ref.abs().max().item()


def test_calibration_windows(tmp_path, tiny_model_dir):
    from leanlm.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_model_dir("llama"))
    f = tmp_path / "calib.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": "the quick brown fox jumps over the lazy dog " * 5})
                           for _ in range(20)))
    a = load_calibration(tok, str(f), num_sequences=6, seq_len=32, seed=0)
    assert len(a) == 6 and all(len(s) == 32 for s in a)
    assert a == load_calibration(tok, str(f), num_sequences=6, seq_len=32, seed=0)
    assert a != load_calibration(tok, str(f), num_sequences=6, seq_len=32, seed=1)
    with pytest.raises(ValueError, match="fewer than one"):
        load_calibration(tok, str(f), num_sequences=1, seq_len=100000)
    with pytest.raises(ValueError, match="does not exist"):
        load_calibration(tok, str(tmp_path / "missing.txt"))


def test_gptq_in_the_rotated_basis_uses_the_rotated_hessian():
    """For one linear layer with correlated inputs and outlier weight columns: GPTQ on (W H,
    H^T X^T X H) beats RTN on W H in the layer's real output error ||X W^T - (X H) Q^T||."""
    from leanlm.formats.registry import get_format
    from leanlm.quant.gptq import gptq_quantize
    from leanlm.quant.rotation import Rotation

    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)
    W = torch.randn(32, 128, generator=g)
    W[:, :4] *= 20  # outlier input channels
    fmt, rot = get_format("mxfp4"), Rotation(64)
    Wr, Xr = rot.weight(W), rot.activation(X)
    Hr = rot.weight(rot.weight(X.t() @ X).t().contiguous())
    assert torch.allclose(Hr, Xr.t() @ Xr, rtol=1e-3, atol=1e-1)  # H^T X^T X H, by folding
    ref = X @ W.t()

    def err(q):
        return (Xr @ fmt.dequantize(q).t() - ref).norm().item()

    assert err(gptq_quantize(Wr, Hr, fmt, None)) < 0.9 * err(fmt.quantize(Wr))


def test_gptq_counts_the_attention_sink_in_the_qkv_hessian_only(tiny_model_dir, monkeypatch):
    import leanlm.quant.calibrate as calibrate
    from leanlm.quant.model_quantizer import SINK_WEIGHT_PER_TOKEN

    seen = []

    class Recording(calibrate.HessianCollector):
        def __init__(self, modules, first_token_weight=None):
            seen.append(dict(first_token_weight or {}))
            super().__init__(modules, first_token_weight)

    monkeypatch.setattr(calibrate, "HessianCollector", Recording)
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32")
    quantize_model(llm.engine.model, QuantSpec.parse("gptq:int4:g32"), random_seqs(3, 40, seed=1))
    assert seen == [{"self_attn.qkv_proj": SINK_WEIGHT_PER_TOKEN * 40}] * llm.engine.model_config.num_layers


@pytest.mark.parametrize("spec", ["rtn:nvfp4", "rtn:mxfp4:rotate16", "rtn:int4:g32"])
def test_dense_propagation_computes_the_quantized_layer(tiny_model_dir, spec):
    """GPTQ propagates calibration inputs through each quantized layer with its weights
    dequantized once (_dense_weights): the same function as the quantized layer's own kernels
    (exactly up to float32 rounding for dequantize-per-call formats; the int4 kernel rounds its
    activations to bfloat16, hence the looser bound there)."""
    from leanlm.quant.model_quantizer import LINEARS, _dense_weights, _run_layer
    from leanlm.kv.cache import ContiguousKVCache

    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", quant=spec)
    m = llm.engine.model
    cfg = m.cfg
    layer = m.layers[0]
    linears = [layer.get_submodule(n) for n in LINEARS]
    cache = ContiguousKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, m.dtype, "cpu")
    hidden = [m.embed_tokens(torch.tensor(s)) for s in random_seqs(2, 24, seed=3)]
    with torch.inference_mode():
        kernels = _run_layer(m, layer, hidden, cache)
        with _dense_weights(linears):
            dense = _run_layer(m, layer, hidden, cache)
            assert all(type(lin.method).__name__ == "_DenseQuantized" for lin in linears)
    assert all(type(lin.method).__name__ == "WeightOnlyMethod" for lin in linears)  # restored
    tol = 2e-2 if spec == "rtn:int4:g32" else 1e-5
    for a, b in zip(kernels, dense):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_quant_head_flag_at_load_time_and_in_quantize(tiny_model_dir, tmp_path, capsys):
    """--quant-head quantizes the LM head (at load time and in `leanlm quantize`); without a
    --quant spec it is a clear error."""
    from leanlm.cli import main

    path = str(tiny_model_dir("llama"))
    out = tmp_path / "q"
    assert main(["quantize", path, "--quant", "rtn:int8", "--quant-head", "-o", str(out)]) == 0
    manifest = json.loads((out / "quantization.json").read_text())
    assert "lm_head" in manifest["layers"] and manifest["layers"]["lm_head"]["format"] == "int8"
    at_load = LLM(path, dtype="float32", quant="rtn:int8", quant_head=True)
    assert type(at_load.engine.model.lm_head.method).__name__ == "WeightOnlyMethod"
    assert logprobs(LLM(str(out)), [5, 17, 42]) == logprobs(at_load, [5, 17, 42])
    assert main(["generate", "hi", "--model", path, "--quant-head", "--max-tokens", "2"]) == 2
    assert "--quant-head" in capsys.readouterr().err
