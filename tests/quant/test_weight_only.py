"""Weight-only quantization at load time (`LLM(model, quant="rtn:FORMAT[:gN]")`): the spec parser,
each kernel path against the model whose weights are replaced by their dequantized values, and
clear errors."""
import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.formats.registry import format_names, get_format
from leanlm.quant.spec import QuantSpec
from leanlm.quant.weight_only import WeightOnlyMethod


@pytest.mark.parametrize("text, canonical", [
    ("rtn:int8", "rtn:int8"), ("GPTQ:int4:g128", "gptq:int4:g128"),
    ("gptq:mxfp4:rotate", "gptq:mxfp4:rotate"), ("gptq:int4:act-order:g64", "gptq:int4:g64:act-order"),
    ("rtn:nvfp4", "rtn:nvfp4"), ("gptq:mxfp4:rotate32", "gptq:mxfp4:rotate32")])
def test_spec_round_trips(text, canonical):
    spec = QuantSpec.parse(text)
    assert str(spec) == canonical and QuantSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad, match", [
    ("int8", "ALGO:FORMAT"), ("awq:int4", "algorithm 'awq'"), ("rtn:int5x", "number format 'int5x'"),
    ("rtn:int4:g0", "unknown quant option 'g0'"), ("rtn:int4:act-order", "act-order applies to gptq"),
    ("rtn:int4:g32:g64", "twice"), ("", "quant spec"), ("rtn:mxfp4:rotate24", "power of two >= 16"),
    ("rtn:mxfp4:rotate8", "power of two >= 16"), ("rtn:mxfp4:rotatex", "rotateN")])
def test_bad_specs_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec.parse(bad)


def test_every_format_name_builds():
    for name in format_names():
        assert get_format(name).name == name


def reference_logits(path, quant: str, prompt):
    """Logits of the float32 model whose decoder linear weights are replaced by the format's
    dequantized weights (float64 check of what the quantized layers compute)."""
    spec = QuantSpec.parse(quant)
    fmt = get_format(spec.format)
    ref = LLM(path, dtype="float32")
    with torch.no_grad():
        for name, m in ref.engine.model.named_modules():
            if hasattr(m, "method") and name != "lm_head":
                m.set_weight(fmt.dequantize(fmt.quantize(m.weight.float(), spec.group_size)))
    return logits(ref, prompt)


def logits(llm, prompt):
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0]
    return out.outputs[0].logprobs[0]


@pytest.mark.parametrize("quant, kernel, tol", [
    ("rtn:int8", "int8-native", 1e-4),   # native kernel: float32 activations, exact scales
    ("rtn:int8:torch", "int8", 0.05),    # LEANLM_NATIVE=0: int8pack kernel, bfloat16 activations
    ("rtn:int4:g32", "int4", 0.05),      # int4pack kernel: bfloat16 activations
    ("rtn:int4-sym:g64", "int4", 0.05),
    ("rtn:nvfp4", "dequant", 1e-4),      # dequantized in float32: same numbers as the reference
    ("rtn:int3:g32", "dequant", 1e-4),
    ("rtn:mxfp4", "dequant", 1e-4),
    ("rtn:nf4:g32", "dequant", 1e-4)])
def test_quantized_model_computes_its_dequantized_weights(tiny_model_dir, monkeypatch, quant, kernel, tol):
    if quant.endswith(":torch"):
        quant = quant[: -len(":torch")]
        monkeypatch.setenv("LEANLM_NATIVE", "0")
    path = str(tiny_model_dir("qwen2"))  # qkv bias: the bias path too
    prompt = [5, 17, 42, 99, 3, 250]
    llm = LLM(path, dtype="float32", quant=quant)
    methods = [m.method for n, m in llm.engine.model.named_modules() if isinstance(getattr(m, "method", None), WeightOnlyMethod)]
    assert methods and all(m.kernel == kernel for m in methods)
    assert llm.engine.model.lm_head.weight is not None  # the head stays in float32
    got, ref = logits(llm, prompt), reference_logits(path, quant, prompt)
    assert set(got) == set(ref)  # the same top-5 tokens
    for t in ref:
        assert abs(got[t].logprob - ref[t].logprob) < tol, (quant, t)


def test_quantization_changes_the_model_and_drops_float_weights(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    prompt = [5, 17, 42, 99, 3, 250]
    base = logits(LLM(path, dtype="float32"), prompt)
    llm = LLM(path, dtype="float32", quant="rtn:int2:g32")
    q = logits(llm, prompt)
    assert any(abs(base[t].logprob - q.get(t, base[t]).logprob) > 1e-3 for t in base) or set(base) != set(q)
    layer = llm.engine.model.layers[0].mlp.down_proj
    assert layer.weight is None and layer.quantized.codes.dtype in (torch.uint8, torch.int8)


def test_group_128_on_features_not_divisible(tiny_model_dir):
    """The tiny model's 64/128 features in groups of 48: zero-padded groups, int4 kernel refused
    (48 is not a kernel group), dequant path exact."""
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, dtype="float32", quant="rtn:int4:g48")
    layer = llm.engine.model.layers[0].self_attn.qkv_proj
    assert layer.method.kernel == "dequant" and layer.quantized.codes.shape[1] == 96
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_gptq_spec_is_not_applied_at_load_time(tiny_model_dir):
    with pytest.raises(ValueError, match="only round-to-nearest"):
        LLM(str(tiny_model_dir("llama")), quant="gptq:int4:g32")
    with pytest.raises(ValueError, match="number format"):
        LLM(str(tiny_model_dir("llama")), quant="rtn:int9")


def test_rotate_block_is_the_requested_one():
    """`:rotateN` picks the Hadamard block (576 features: plain `rotate` takes 64, the largest
    power of two dividing 576; rotate32 takes 32)."""
    fmt = get_format("mxfp4")
    for spec, block in (("rtn:mxfp4:rotate", 64), ("rtn:mxfp4:rotate32", 32), ("rtn:mxfp4:rotate16", 16)):
        s = QuantSpec.parse(spec)
        m = WeightOnlyMethod(fmt, s.group_size, rotate=s.rotate, rotate_block=s.rotate_block)
        assert m.rotation_for(576).block == block and m.name.endswith(spec.split(":")[-1])
