"""Shared fixtures: tiny random models of each supported architecture, saved as HF checkpoints."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Keep tests on the machine's 2 cores without oversubscription, and never touch a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton decides between compiling and interpreting (TRITON_INTERPRET) when it is first imported,
# and torch may import it in any earlier test: without a GPU, choose the interpreter now (the
# KIVI Triton kernels' tests, tests/kv/test_kivi_triton.py, run on CPU tensors through it)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module. The scripts are not a package: they import each other by
    bare name (`from _timing import ...`), as when run from that folder, so it is on sys.path while
    the module loads."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY, tie_word_embeddings=True,
                              rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if arch == "llama-linear":
        return tf.LlamaConfig(**TINY, rope_scaling={"rope_type": "linear", "factor": 2.0})
    if arch == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY)
    if arch == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=16)
    raise KeyError(arch)


ARCHS = ["llama", "llama-linear", "mistral", "qwen2", "qwen3"]


def save_tiny_model(arch: str, path: Path, seed: int = 0) -> Path:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    # Random init has tiny weights; scale norms/biases so every code path matters numerically.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def save_tiny_tokenizer(path: Path) -> None:
    """A 300-token byte-level BPE (same vocabulary size as the tiny models) with a chat template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog. héllo wörld 你好 🙂"] * 10,
                            trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: arch -> directory of a saved tiny random HF model (cached per session)."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            made[arch] = save_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return made[arch]

    return make
