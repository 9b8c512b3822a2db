"""Where a decode step's time goes: torch.profiler over decode steps of one (KV codec, batch)
engine, with the ops (and on a GPU the kernels, Triton's included) ranked by self time.

On a GPU a small model's decode step is bound by the host (Python and kernel launches), not by
the device, so the host-side ranking is the one to read there: what to fuse or leave out.

    python benchmarks/step_profile.py kivi:4:g64:v3:c32:s8:prerope:rotate@4 --device cuda --context 600
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import time

from torch.profiler import ProfilerActivity, profile

from decode_interleaved import parse_config, prompts
from leanlm import LLM, SamplingParams


def profile_steps(kv: str, batch: int, context: int, steps: int, model: str | None, device: str,
                  warmup: int = 5, python: bool = False):
    """Prefill, `warmup` decode steps, then `steps` profiled ones, under torch.profiler or (python)
    cProfile. Returns (the profiler, median step seconds of the profiled steps, the token ids)."""
    if context < 1 or steps < 1:
        raise ValueError(f"context and steps must be >= 1, got {context} and {steps}")
    llm = LLM(model, dtype="float32", kv=kv, enable_prefix_caching=False, max_num_seqs=batch, device=device)
    params = SamplingParams(temperature=0, max_tokens=warmup + steps + 2, ignore_eos=True)
    ids = [llm.engine.add_request(None, p, params)
           for p in prompts(batch, context, llm.engine.runner.model.cfg.vocab_size)]
    outputs: dict = {}

    def step():
        for out in llm.engine.step():
            outputs[out.request_id] = list(out.outputs[0].token_ids)

    while len(outputs) < batch or min(map(len, outputs.values())) < 1:  # prefill
        step()
    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    times = []
    prof = cProfile.Profile() if python else profile(activities=activities)
    with prof:
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    tokens = [outputs[i] for i in ids]
    del llm
    gc.collect()
    return prof, sorted(times)[len(times) // 2], tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", metavar="KV@B", help="a KV cache spec and a batch size, e.g. bf16@1")
    ap.add_argument("--context", type=int, default=600, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=10, help="profiled decode steps")
    ap.add_argument("--model", default=None, help="HF checkpoint dir or .gguf (default: the embedded model)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--top", type=int, default=25, help="rows of each table")
    ap.add_argument("--python", action="store_true", help="cProfile (Python functions by own time) "
                    "instead of torch.profiler")
    args = ap.parse_args()
    try:
        kv, batch = parse_config(args.config)
        prof, step_s, _ = profile_steps(kv, batch, args.context, args.steps, args.model, args.device,
                                        python=args.python)
    except ValueError as e:
        ap.error(str(e))
    print(f"{args.config}: median step {step_s * 1e3:.2f} ms under the profiler, {args.steps} steps")
    if args.python:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
        return
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.device.startswith("cuda"):
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
