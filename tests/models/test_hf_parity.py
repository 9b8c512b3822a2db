"""leanlm's forward pass equals Hugging Face transformers' on tiny random models of every
supported architecture, for a batch of prompts of different lengths, prefill and decode."""
import pytest
import torch

from leanlm.kv.cache import ContiguousKVCache, SeqSlice
from leanlm.models.registry import load_model
from tests.conftest import ARCHS


def hf_logits(path, ids):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([seq])).logits[0] for seq in ids]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_prefill_and_decode(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    model, cfg = load_model(path, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    lengths, n_decode = [5, 17, 11], 4
    full = [torch.randint(0, cfg.vocab_size, (n + n_decode,), generator=gen).tolist() for n in lengths]
    ref = hf_logits(path, full)

    cache = ContiguousKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    rows = [cache.allocate(64) for _ in lengths]
    # prefill: all prompts flattened into one batch
    seqs, off = [], 0
    for r, n in zip(rows, lengths):
        seqs.append(SeqSlice(kv=r, start=0, n=n, q_offset=off))
        off += n
    ids = torch.tensor([t for seq, n in zip(full, lengths) for t in seq[:n]])
    pos = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        hidden = model(ids, pos, cache, cache.prepare(seqs))
        logits = model.compute_logits(hidden)
    for s, n, r in zip(seqs, lengths, ref):
        got = logits[s.q_offset: s.q_offset + n]
        assert rel_err(got, r[:n]) < 1e-4, f"{arch} prefill"
    # decode: one token per sequence per step, sequences at different lengths
    for step in range(n_decode):
        seqs = [SeqSlice(kv=r, start=n + step, n=1, q_offset=i) for i, (r, n) in enumerate(zip(rows, lengths))]
        ids = torch.tensor([seq[n + step] for seq, n in zip(full, lengths)])
        pos = torch.tensor([n + step for n in lengths])
        with torch.no_grad():
            logits = model.compute_logits(model(ids, pos, cache, cache.prepare(seqs)))
        for i, (n, r) in enumerate(zip(lengths, ref)):
            assert rel_err(logits[i], r[n + step]) < 1e-4, f"{arch} decode step {step}"


def test_chunked_prefill_matches_one_shot(tiny_model_dir):
    """A prompt fed in chunks attends to its own cache exactly as a one-shot prefill."""
    path = tiny_model_dir("qwen2")
    model, cfg = load_model(path, torch.float32, torch.device("cpu"))
    ids = torch.randint(0, cfg.vocab_size, (23,), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(path, [ids.tolist()])[0]
    cache = ContiguousKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    row = cache.allocate(32)
    outs = []
    for start in range(0, 23, 8):
        n = min(8, 23 - start)
        ctx = cache.prepare([SeqSlice(row, start, n, 0)])
        with torch.no_grad():
            outs.append(model.compute_logits(model(ids[start:start + n], torch.arange(start, start + n), cache, ctx)))
    assert rel_err(torch.cat(outs), ref) < 1e-4


def test_bfloat16_close_to_float32(tiny_model_dir):
    path = tiny_model_dir("llama")
    ids = torch.randint(0, 160, (9,), generator=torch.Generator().manual_seed(2))
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, cfg = load_model(path, dtype, torch.device("cpu"))
        cache = ContiguousKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, "cpu")
        row = cache.allocate(16)
        with torch.no_grad():
            h = model(ids, torch.arange(9), cache, cache.prepare([SeqSlice(row, 0, 9, 0)]))
            outs[dtype] = model.compute_logits(h).float()
    assert rel_err(outs[torch.bfloat16], outs[torch.float32]) < 5e-2


def test_unsupported_architecture_lists_supported(tmp_path):
    import json

    from leanlm.models.model_config import ModelConfig

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        ModelConfig.from_dir(tmp_path)


def test_pickle_checkpoint_refused(tmp_path):
    from leanlm.models.loader import checkpoint_files

    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="pickle"):
        checkpoint_files(tmp_path)


def test_mismatched_checkpoint_is_an_error(tiny_model_dir, tmp_path):
    import json
    import shutil

    src = tiny_model_dir("llama")
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 96  # weights no longer fit the config
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(tmp_path / "m", torch.float32, torch.device("cpu"))
