"""GGUF files -> Hugging Face style checkpoints (config, float32 tensors, tokenizer).

llama.cpp's GGUF stores a model as metadata key/values plus (often quantized) tensors under its
own names. This module turns one into what the rest of leanlm reads from a HF checkpoint
directory: a `config.json` dict, float32 tensors named as transformers names them, a
`tokenizer.json` and a `tokenizer_config.json`. It relies on the `gguf` package for parsing and
dequantization (the llama.cpp reference code); transformers is not imported here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm.auto import tqdm

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
    "GGUFCheckpoint",
    "read_gguf",
    "convert_gguf_to_hf",
    "llama3_rope_factors",
]

# GGUF architecture -> (HF model_type, HF architectures name).
SUPPORTED_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

_Q = GGMLQuantizationType
# The classic llama.cpp types (plain floats, legacy blocks, k-quants); gguf dequantizes them.
SUPPORTED_TENSOR_TYPES = frozenset({
    _Q.F32, _Q.F16, _Q.BF16,
    _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1,
    _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K,
})

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")
# Llama 3.x files carry their rope scaling as per-frequency factors; we fold them into config.
_ROPE_FREQS = "rope_freqs.weight"

# llama.cpp token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _hf_tensor_name(gguf_name: str) -> str | None:
    """The transformers name of a GGUF tensor; None for one we fold into the config."""
    if gguf_name == _ROPE_FREQS:
        return None
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in a dense llama/qwen2/qwen3 model")


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (rotary pairs interleaved per head), as
    transformers' LlamaTensorProcessor does: (head, dim/2, 2) -> (head, 2, dim/2)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(x: float) -> float:
    """A float32 metadata value as its shortest decimal (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


class GGUFCheckpoint:
    """One opened GGUF file. Metadata is parsed up front; tensors are dequantized lazily."""

    def __init__(self, path: Path, reader: GGUFReader):
        self.path = path
        self._reader = reader
        self.architecture = self._meta("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{path}: GGUF architecture {self.architecture!r} is not supported; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        self._gguf_tensors = {t.name: t for t in reader.tensors}
        for t in reader.tensors:  # fail before any long conversion, not halfway through it
            if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
                raise ValueError(
                    f"{path}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, which leanlm cannot "
                    f"dequantize; supported: {sorted(q.name for q in SUPPORTED_TENSOR_TYPES)}"
                )
            try:
                _hf_tensor_name(t.name)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
        self.config = self._build_config()

    # -- metadata -------------------------------------------------------------------------
    def _meta(self, key: str, default=KeyError):
        field = self._reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise ValueError(f"{self.path}: GGUF metadata lacks required key {key!r}")
            return default
        return field.contents()

    def _hparam(self, key: str, default=KeyError):
        return self._meta(f"{self.architecture}.{key}", default)

    def _token_id(self, kind: str) -> int | None:
        value = self._meta(f"tokenizer.ggml.{kind}_token_id", None)
        return None if value is None else int(value)

    def _build_config(self) -> dict:
        model_type, hf_arch = SUPPORTED_ARCHITECTURES[self.architecture]
        if self.architecture == "llama" and "mistral" in str(self._meta("general.name", "")).lower():
            # llama.cpp writes Mistral as "llama"; transformers tells them apart by name too.
            model_type, hf_arch = "mistral", "MistralForCausalLM"
        heads = int(self._hparam("attention.head_count"))
        kv_heads = self._hparam("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):
            raise ValueError(f"{self.path}: per-layer attention.head_count_kv is not supported")
        hidden = int(self._hparam("embedding_length"))
        head_dim = self._hparam("attention.key_length", None)
        if head_dim is None and self.architecture == "llama":
            head_dim = self._hparam("rope.dimension_count", None)
        embd = self._gguf_tensors.get("token_embd.weight")
        vocab = self._hparam("vocab_size", None) or (int(embd.shape[-1]) if embd is not None else None)
        config = {
            "architectures": [hf_arch],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": int(self._hparam("feed_forward_length")),
            "num_hidden_layers": int(self._hparam("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": int(head_dim or hidden // heads),
            "vocab_size": int(vocab) if vocab is not None else len(self._meta("tokenizer.ggml.tokens")),
            "rms_norm_eps": _f32(self._hparam("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": _f32(self._hparam("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._hparam("context_length", 4096)),
            "hidden_act": "silu",
            "tie_word_embeddings": "output.weight" not in self._gguf_tensors,
            "torch_dtype": "float32",
        }
        if self.architecture == "llama":
            config["attention_bias"] = "blk.0.attn_q.bias" in self._gguf_tensors
            config["mlp_bias"] = False
        if model_type == "mistral":
            config["sliding_window"] = None  # llama.cpp does not record it
        for key, kind in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
            if (token_id := self._token_id(kind)) is not None:
                config[f"{key}_token_id"] = token_id
        if (rope_scaling := self._rope_scaling(config)) is not None:
            config["rope_scaling"] = rope_scaling
        return config

    def _rope_scaling(self, config: dict) -> dict | None:
        kind = self._hparam("rope.scaling.type", None)
        if kind in ("linear", "yarn"):
            scaling = {"rope_type": kind, "factor": _f32(self._hparam("rope.scaling.factor"))}
            original = self._hparam("rope.scaling.original_context_length", None)
            if original is not None:
                scaling["original_max_position_embeddings"] = int(original)
            return scaling
        if kind not in (None, "none"):
            raise ValueError(f"{self.path}: rope scaling type {kind!r} is not supported (linear, yarn)")
        if _ROPE_FREQS in self._gguf_tensors:
            freqs = dequantize(self._gguf_tensors[_ROPE_FREQS].data, self._gguf_tensors[_ROPE_FREQS].tensor_type)
            return _llama3_rope_scaling(np.asarray(freqs, np.float64).ravel(), config, self.path)
        return None

    # -- tensors --------------------------------------------------------------------------
    @property
    def num_tensors(self) -> int:
        return sum(name != _ROPE_FREQS for name in self._gguf_tensors)

    def tensor_names(self) -> list[str]:
        return [hf for name in self._gguf_tensors if (hf := _hf_tensor_name(name)) is not None]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) in file order, one tensor dequantized at a time."""
        for name, t in self._gguf_tensors.items():
            hf_name = _hf_tensor_name(name)
            if hf_name is None:
                continue
            # The reader already gives numpy (row-major) shapes: GGUF's reversed ne[] is undone.
            w = dequantize(t.data, t.tensor_type)
            if t.tensor_type == _Q.F32:
                w = w.copy()  # a view of the memory map; tensors must outlive the file
            w = w.astype(np.float32, copy=False)
            if self.architecture == "llama" and name.endswith((".attn_q.weight", ".attn_q.bias")):
                w = _unpermute_rows(w, self.config["num_attention_heads"])
            elif self.architecture == "llama" and name.endswith((".attn_k.weight", ".attn_k.bias")):
                w = _unpermute_rows(w, self.config["num_key_value_heads"])
            yield hf_name, torch.from_numpy(np.ascontiguousarray(w))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())

    # -- tokenizer ------------------------------------------------------------------------
    def tokenizer_json(self) -> str:
        """A `tokenizer.json` (HF tokenizers format) rebuilt from `tokenizer.ggml.*`."""
        kind = self._meta("tokenizer.ggml.model")
        tokens = self._meta("tokenizer.ggml.tokens")
        types = self._meta("tokenizer.ggml.token_type", None) or [_NORMAL] * len(tokens)
        if kind == "gpt2":
            tokenizer = _byte_level_bpe(
                tokens, types, self._meta("tokenizer.ggml.merges", []), self._meta("tokenizer.ggml.pre", "default")
            )
        elif kind == "llama":
            tokenizer = _sentencepiece_bpe(
                tokens, types, self._meta("tokenizer.ggml.scores", None) or [0.0] * len(tokens),
                self._meta("tokenizer.ggml.merges", None), self._token_id("unknown"),
                bool(self._meta("tokenizer.ggml.add_space_prefix", True)),
            )
        else:
            raise ValueError(f"{self.path}: GGUF tokenizer type {kind!r} is not supported; supported: gpt2, llama")
        cfg = self.tokenizer_config()
        tokenizer.post_processor = _post_processor(
            kind == "gpt2", cfg["add_bos_token"] and cfg["bos_token"], cfg["add_eos_token"] and cfg["eos_token"], tokens
        )
        return tokenizer.to_str()

    def tokenizer_config(self) -> dict:
        tokens = self._meta("tokenizer.ggml.tokens")

        def token(kind: str) -> str | None:
            token_id = self._token_id(kind)
            return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        spm = self._meta("tokenizer.ggml.model") == "llama"
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token("bos"),
            "eos_token": token("eos"),
            "pad_token": token("padding"),
            "unk_token": token("unknown"),
            "add_bos_token": bool(self._meta("tokenizer.ggml.add_bos_token", spm)),
            "add_eos_token": bool(self._meta("tokenizer.ggml.add_eos_token", False)),
            "model_max_length": self.config["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
        }
        if (template := self._meta("tokenizer.chat_template", None)) is not None:
            config["chat_template"] = template
        return config

    def generation_config(self) -> dict:
        config = {k: self.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in self.config}
        # Chat models often end a turn with an end-of-turn token distinct from EOS.
        stops = [config["eos_token_id"]] if "eos_token_id" in config else []
        stops += [t for kind in ("eot", "eom") if (t := self._token_id(kind)) is not None and t not in stops]
        if len(stops) > 1:
            config["eos_token_id"] = stops
        return config


def _llama3_rope_scaling(freqs: np.ndarray, config: dict, path: Path) -> dict:
    """Recover Llama 3 rope scaling from llama.cpp's `rope_freqs` factors. The converter computes
    them from (factor, low/high freq factor, original context); we assume the published Llama 3.x
    values for the last three and check that they reproduce the stored factors."""
    scaling = {
        "rope_type": "llama3",
        "factor": _f32(freqs.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if not np.allclose(llama3_rope_factors(scaling, config["head_dim"], config["rope_theta"]), freqs, rtol=1e-4):
        raise ValueError(f"{path}: rope_freqs.weight does not match Llama 3 rope scaling; cannot convert it")
    return scaling


def llama3_rope_factors(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """The per-frequency factors llama.cpp's converter writes as `rope_freqs.weight`."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    out = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# -- tokenizers ---------------------------------------------------------------------------

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PUNCT_RUN = r" ?[^(\s|.,!?…。，、।۔،)]+"


def _pre_splits() -> dict[str, tuple[tuple[str, ...], bool]]:
    """`tokenizer.ggml.pre` -> (regexes applied one after another, ignore_merges), as in
    llama.cpp's llama-vocab.cpp (with `(?i:...)` written as the original tokenizer.json has it)."""
    table = {}
    for names, splits, ignore_merges in [
        (("gpt-2", "mpt", "olmo", "jais", "trillion"), (_GPT2_SPLIT,), False),
        (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
         (r"\p{N}", _GPT2_SPLIT), False),
        (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
         (_LLAMA3_SPLIT,), True),
        (("dbrx", "smaug-bpe"), (_LLAMA3_SPLIT,), False),
        (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"), (_QWEN2_SPLIT,), False),
        (("tekken",), (_TEKKEN_SPLIT,), True),
        (("gpt-4o", "llama4", "minimax-m2"), (_GPT4O_SPLIT,), False),
        (("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]"), False),
        (("poro-chat", "bloom", "gpt3-finnish"), (_PUNCT_RUN,), False),
        (("viking",), (_PUNCT_RUN, r"\p{N}"), False),
        (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    ]:
        table.update(dict.fromkeys(names, (splits, ignore_merges)))
    return table


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str], pre: str) -> Tokenizer:
    byte_chars = _bytes_to_unicode()
    alphabet = set(byte_chars.values())
    added = {_CONTROL, _USER_DEFINED}
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        # Added tokens are matched in raw text, so they keep their raw spelling; a normal token
        # outside the byte alphabet is respelled so the BPE model can produce it.
        if kind not in added and not set(tok) <= alphabet:
            tok = "".join(byte_chars[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    splits, ignore_merges = _pre_splits().get(pre, (None, False))
    if splits is None:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is unknown to leanlm; splitting text as GPT-2 does", stacklevel=3)
        splits = (_GPT2_SPLIT,)
    tokenizer = Tokenizer(models.BPE(
        vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=ignore_merges,
    ))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    _add_special_tokens(tokenizer, tokens, types)
    return tokenizer


def _sentencepiece_bpe(tokens, types, scores, merges, unk_id, add_space_prefix) -> Tokenizer:
    """A SentencePiece BPE vocabulary as HF's LlamaTokenizer builds it (byte fallback, Metaspace)."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        mergeable = {tok: s for tok, s, kind in zip(tokens, scores, types) if kind not in (_CONTROL, _BYTE, _UNKNOWN)}
        pairs = _merges_from_scores(vocab, mergeable)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    _add_special_tokens(tokenizer, tokens, types)
    return tokenizer


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary: every split of a token into two known tokens,
    best-scored merged token first (the order transformers' `generate_merges` produces)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens (e.g. <|im_start|>) become special added tokens and user-defined ones plain
    added tokens, so both are matched whole in text rather than cut by BPE, as llama.cpp does."""
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)


def _post_processor(byte_level: bool, bos: str | None, eos: str | None, tokens: list[str]):
    """Add BOS / EOS (each None unless the file asks for it); byte-level offsets for gpt2."""
    head, tail = [t for t in (bos,) if t], [t for t in (eos,) if t]
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    if head or tail:
        pair = [*head, "$A", *tail, *(f"{t}:1" for t in head), "$B:1", *(f"{t}:1" for t in tail)]
        steps.append(processors.TemplateProcessing(
            single=" ".join([*head, "$A", *tail]), pair=" ".join(pair),
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(head + tail)],
        ))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)


# -- entry points -------------------------------------------------------------------------

def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a GGUF file; ValueError for one that is not a readable GGUF of a supported model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # numpy reshape/mmap errors say nothing about the file
        raise ValueError(f"{path} is not a valid GGUF file (corrupt or truncated?): {exc}") from exc
    return GGUFCheckpoint(path, reader)


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a float32 HF checkpoint directory for a GGUF file. All files are written into a
    temporary sibling directory renamed into place at the end, so a crash leaves nothing behind."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"output directory already exists: {out_dir}")
    ckpt = read_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        files = {
            "config.json": ckpt.config,
            "generation_config.json": ckpt.generation_config(),
            "tokenizer_config.json": ckpt.tokenizer_config(),
        }
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "tokenizer.json").write_text(ckpt.tokenizer_json(), encoding="utf-8")
        progress = tqdm(ckpt.tensors(), total=ckpt.num_tensors, desc=f"dequantizing {ckpt.path.name}",
                        unit="tensor", file=sys.stderr)
        save_file(dict(progress), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            os.replace(tmp, out_dir)  # atomic; fails if another process got there first
        except OSError as exc:
            if out_dir.exists():
                raise FileExistsError(f"output directory already exists: {out_dir}") from exc
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
