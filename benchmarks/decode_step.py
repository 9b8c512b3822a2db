"""Where a decode step's time goes, per KV codec and batch size: B sequences of --context prompt
tokens decode --steps tokens together (greedy); the table gives the median decode step (the
engine's whole step: scheduler, layers, LM head, sampling) and the median time inside the native
whole-layer executor (native/layers.py), with the share of steps it ran. Float32 compute.

    python benchmarks/decode_step.py --kv bf16 kivi:4:g64:v3:c32:s8:prerope:rotate --batch 1 4 8

--kivi-segment 2048 0 times each configuration twice: with KIVI rows split into segments of 2,048
tokens across threads (the default), then with no split (0), to show what the split gives at long
contexts (other codecs ignore it).
"""
from __future__ import annotations

import argparse
import statistics
import time

from rich.console import Console
from rich.table import Table

from leanlm import LLM, SamplingParams
from leanlm.engine.engine import LLMEngine
from leanlm.native import kivi as native_kivi
from leanlm.native import layers as native_layers

NO_SPLIT = 1 << 30  # tokens per segment: longer than any row, so no row is split


def measure(kv: str, batch: int, context: int, steps: int, model: str | None) -> tuple[float, float, float]:
    llm = LLM(model, dtype="float32", kv=kv, enable_prefix_caching=False, max_num_seqs=batch)
    prompts = [[1000 + 7 * i + j for j in range(context)] for i in range(batch)]
    step_times, layer_times = [], []
    real_step, real_run = LLMEngine.step, native_layers.NativeLayers.run

    def step(self):
        t = time.perf_counter()
        out = real_step(self)
        step_times.append(time.perf_counter() - t)
        return out

    def run(self, *a):
        t = time.perf_counter()
        out = real_run(self, *a)
        layer_times.append((time.perf_counter() - t, out is not None))
        return out

    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm up
    LLMEngine.step, native_layers.NativeLayers.run = step, run
    try:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    finally:
        LLMEngine.step, native_layers.NativeLayers.run = real_step, real_run
    decode = sorted(step_times)[: len(step_times) - batch - 1]  # drop the prefill steps (the slowest)
    ran = [t for t, ok in layer_times if ok]
    return (statistics.median(decode) * 1e3, statistics.median(ran) * 1e3 if ran else float("nan"),
            len(ran) / max(1, len(layer_times)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kv", nargs="+", default=["bf16", "kivi:4:g64:v3:c32:s8:prerope:rotate"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--context", type=int, default=500)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--model", default=None, help="HF checkpoint dir or .gguf (default: the embedded model)")
    ap.add_argument("--kivi-segment", type=int, nargs="+", default=[2048], metavar="TOKENS",
                    help="tokens per segment of a long row in the KIVI kernel, each value timed in "
                         "turn (0: rows are not split)")
    args = ap.parse_args()
    if any(t < 0 for t in args.kivi_segment):
        ap.error(f"--kivi-segment takes token counts >= 0, got {args.kivi_segment}")
    table = Table(title=f"decode step, {args.context}-token prompts + {args.steps} steps, float32 (medians)")
    table.add_column("--kv", overflow="fold")
    table.add_column("KIVI segment", justify="right")
    for col in ("B", "step ms", "executor ms", "executor ran", "tok/s"):
        table.add_column(col, justify="right")
    for kv in args.kv:
        for b in args.batch:
            for seg in args.kivi_segment:
                native_kivi.set_segment(seg or NO_SPLIT)
                step, layers, share = measure(kv, b, args.context, args.steps, args.model)
                table.add_row(kv, "no split" if seg == 0 else str(seg), str(b), f"{step:.2f}",
                              f"{layers:.2f}", f"{share:.0%}", f"{b / step * 1e3:.1f}")
    native_kivi.set_segment(2048)
    Console().print(table)


if __name__ == "__main__":
    main()
