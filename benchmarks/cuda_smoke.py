"""CUDA check (run on a GPU machine): for a tiny random model of every supported architecture,
float32 greedy generation on CUDA equals the CPU's token for token, logprobs agree, and bfloat16 /
float16 run; then decode speed on CUDA for a mid-sized random Llama. Prints a table; exits 1 on
any mismatch.  Usage: PYTHONPATH=. python benchmarks/cuda_smoke.py"""
import sys
import tempfile
import time
from pathlib import Path

import torch

from leanlm import LLM, SamplingParams
from tests.conftest import ARCHS, save_tiny_model

if not torch.cuda.is_available():
    sys.exit("no CUDA device: this check needs a GPU")
print(torch.__version__, torch.cuda.get_device_name())
ok = True
prompts = [[5, 17, 42], [7] * 11 + [99], [250, 1, 2, 3, 4, 5]]
greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
with tempfile.TemporaryDirectory() as tmp:
    for arch in ARCHS:
        path = str(save_tiny_model(arch, Path(tmp) / arch))
        cpu = LLM(path, device="cpu").generate(prompts, greedy)
        gpu = LLM(path, device="cuda").generate(prompts, greedy)
        same = all(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(cpu, gpu))
        lp = max(abs(a.outputs[0].logprobs[i][t].logprob - b.outputs[0].logprobs[i][t].logprob)
                 for a, b in zip(cpu, gpu) for i, t in enumerate(a.outputs[0].token_ids))
        row = [arch, f"greedy cpu==cuda: {same}", f"max |dlogprob| {lp:.2e}"]
        for dt in ("bfloat16", "float16"):
            out = LLM(path, device="cuda", dtype=dt).generate(prompts, greedy)
            row.append(f"{dt}: {sum(len(o.outputs[0].token_ids) for o in out)} tokens")
        seeded = SamplingParams(temperature=1.0, max_tokens=8, seed=3, ignore_eos=True)
        llm = LLM(path, device="cuda")
        a = llm.generate(prompts, seeded)
        b = llm.generate(prompts[::-1], seeded)[::-1]
        seed_ok = all(x.outputs[0].token_ids == y.outputs[0].token_ids for x, y in zip(a, b))
        row.append(f"seeded batch-invariant: {seed_ok}")
        ok &= same and lp < 1e-3 and seed_ok
        print(" | ".join(row), flush=True)

    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    big = Path(tmp) / "big"
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(big)
    from tests.conftest import save_tiny_tokenizer
    save_tiny_tokenizer(big)
    for dt in ("float32", "bfloat16"):
        llm = LLM(str(big), device="cuda", dtype=dt)
        p = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        llm.generate([prompts[0]], p)
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate([prompts[0]], p)
        torch.cuda.synchronize()
        print(f"random llama 16x1024 on cuda, {dt}: tg128 {128 / (time.perf_counter() - t):.1f} tok/s batch 1")
print("CUDA CHECK", "PASSED" if ok else "FAILED")
sys.exit(0 if ok else 1)
