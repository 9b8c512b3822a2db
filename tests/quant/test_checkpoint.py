"""Quantized checkpoints (leanlm/quant/checkpoint.py): save -> `LLM(saved_dir)` gives exactly the
in-memory quantized model's logprobs, the file holds what bits_per_weight promises, and every
kind of damage is a ValueError naming the problem."""
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from leanlm import LLM, SamplingParams
from leanlm.formats.registry import get_format
from leanlm.quant import checkpoint
from leanlm.quant.checkpoint import load_quantized, save_quantized
from leanlm.quant.spec import QuantSpec

PROMPT = "hello world, the quick brown fox"
GREEDY = SamplingParams(temperature=0, max_tokens=3, logprobs=5)


def quantize_and_save(src, out, quant, **kwargs):
    llm = LLM(str(src), dtype="float32", quant=quant, **kwargs)
    save_quantized(llm.engine.model, src, out, QuantSpec.parse(quant), extra={"test": True})
    return llm


def completion(llm):
    out = llm.generate([PROMPT], GREEDY)[0].outputs[0]
    return out.token_ids, out.logprobs


@pytest.fixture(scope="module")
def saved_int4(tiny_model_dir, tmp_path_factory):
    """One saved rtn:int4:g32 checkpoint, copied by the tests that damage it."""
    src = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("ckpt") / "int4"
    quantize_and_save(src, out, "rtn:int4:g32")
    return out


@pytest.mark.parametrize("quant, kwargs", [
    ("rtn:int8", {}), ("rtn:int4:g32", {}), ("rtn:int4-sym:g64", {}), ("rtn:int3:g32", {}),
    ("rtn:nvfp4", {}), ("rtn:mxfp4", {}), ("rtn:ternary", {}), ("rtn:ternary-b3:g32", {}),
    ("rtn:bfp4", {}), ("rtn:fp8-e4m3:g32", {}), ("rtn:int4:g32", {"quant_head": True}),
    ("rtn:mxfp4:rotate", {}), ("rtn:int4:g32:rotate", {}), ("rtn:mxfp4:rotate16", {})])
def test_round_trip_is_exact_and_sized_by_bits_per_weight(tiny_model_dir, tmp_path, quant, kwargs):
    src, out = tiny_model_dir("llama"), tmp_path / "q"
    mem = quantize_and_save(src, out, quant, **kwargs)
    loaded = LLM(str(out))                     # no flags: detected by quantization.json
    assert completion(loaded) == completion(mem)   # token ids and top-5 logprobs, bit for bit
    for a, b in zip(mem.engine.model.modules(), loaded.engine.model.modules()):
        if hasattr(a, "method"):           # same format, kernel and Hadamard block per layer
            assert (a.method.name, getattr(a.method, "kernel", None), getattr(a.method, "rotation", None)) == \
                (b.method.name, getattr(b.method, "kernel", None), getattr(b.method, "rotation", None))

    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["spec"] == str(QuantSpec.parse(quant)) and manifest["extra"] == {"test": True}
    assert ("lm_head" in manifest["layers"]) == bool(kwargs.get("quant_head"))
    for name, meta in manifest["layers"].items():
        n, kp, g = meta["shape"][0], meta["padded_k"], meta["group_size"]
        stored = {k: v for k, v in manifest["tensors"].items()
                  if k.startswith(name + ".q") and not k.endswith(("qtensor_scale", "qscale_table"))}
        got_bits = 8 * sum(r["nbytes"] for r in stored.values())
        want_bits = get_format(meta["format"]).bits_per_weight(g) * n * kp
        assert abs(got_bits - want_bits) <= 16, (name, got_bits, want_bits)  # byte rounding only
    # the file is the tensors plus a small header: nothing hidden, nothing missing
    payload = sum(r["nbytes"] for r in manifest["tensors"].values())
    assert payload < (out / "model.safetensors").stat().st_size < payload + 64 * 1024


def test_tokenizer_and_config_travel(tiny_model_dir, saved_int4):
    src = tiny_model_dir("llama")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (saved_int4 / f).read_bytes() == (src / f).read_bytes()
    llm = LLM(str(saved_int4))
    assert llm.get_tokenizer().decode(llm.get_tokenizer().encode(PROMPT)) == PROMPT
    assert llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=2))[0].outputs


def test_quant_flag_with_quantized_checkpoint_is_an_error(saved_int4):
    with pytest.raises(ValueError, match="already a quantized checkpoint"):
        LLM(str(saved_int4), quant="rtn:int8")


def damaged(saved, tmp_path):
    d = tmp_path / "damaged"
    shutil.copytree(saved, d)
    return d


def test_flipped_byte_is_detected(saved_int4, tmp_path):
    d = damaged(saved_int4, tmp_path)
    raw = bytearray((d / "model.safetensors").read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    raw[8 + header + 100] ^= 0x01              # a byte in the first stored tensor's data
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"tensor '.*' .* is corrupt: sha256"):
        load_quantized(d, torch.float32)


def test_damaged_header_is_a_value_error(saved_int4, tmp_path):
    d = damaged(saved_int4, tmp_path)
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[8:16] = b"\xff" * 8
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="cannot be read"):
        load_quantized(d, torch.float32)


@pytest.mark.parametrize("victim", ["layers.1.mlp.down_proj.qscales", "norm.weight"])
def test_missing_tensor_is_named(saved_int4, tmp_path, victim):
    d = damaged(saved_int4, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors[victim]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=f"missing tensor '{victim}'"):
        load_quantized(d, torch.float32)


def test_edited_json_shape_is_named(saved_int4, tmp_path):
    d = damaged(saved_int4, tmp_path)
    manifest = json.loads((d / "quantization.json").read_text())
    manifest["layers"]["layers.0.self_attn.o_proj"]["shape"] = [64, 32]
    (d / "quantization.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"layers.0.self_attn.o_proj: quantization.json shape \[64, 32\]"):
        load_quantized(d, torch.float32)


def test_edited_tensor_record_is_named(saved_int4, tmp_path):
    d = damaged(saved_int4, tmp_path)
    manifest = json.loads((d / "quantization.json").read_text())
    manifest["tensors"]["embed_tokens.weight"]["shape"] = [300, 32]
    (d / "quantization.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"'embed_tokens.weight' .* shape is \[300, 64\].* expects \[300, 32\]"):
        load_quantized(d, torch.float32)


def test_failed_save_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    src = tiny_model_dir("llama")
    llm = LLM(str(src), dtype="float32", quant="rtn:int8")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint.shutil, "copy2", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(llm.engine.model, src, tmp_path / "out", QuantSpec.parse("rtn:int8"), None)
    assert list(tmp_path.iterdir()) == []      # neither the output nor a temp dir


def test_overwrite_refused_unless_asked(tiny_model_dir, saved_int4, tmp_path):
    src = tiny_model_dir("llama")
    llm = LLM(str(src), dtype="float32", quant="rtn:int8")
    d = damaged(saved_int4, tmp_path)
    before = (d / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_quantized(llm.engine.model, src, d, QuantSpec.parse("rtn:int8"), None)
    assert (d / "model.safetensors").read_bytes() == before
    save_quantized(llm.engine.model, src, d, QuantSpec.parse("rtn:int8"), None, overwrite=True)
    assert json.loads((d / "quantization.json").read_text())["spec"] == "rtn:int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]   # the old copy is gone
    (tmp_path / "empty").mkdir()                # an empty directory is fine to fill
    save_quantized(llm.engine.model, src, tmp_path / "empty", QuantSpec.parse("rtn:int8"), None)
    assert completion(LLM(str(tmp_path / "empty"))) == completion(llm)
