"""The formats x algorithms quality table of issue 4: WikiText-2 perplexity (GPTQ protocol, ctx
2048), its delta to the unquantized model, bits per weight (scales and zero points counted) and the
bytes of the saved checkpoint, for every spec given, RTN and GPTQ alike.

GPTQ runs the real `leanlm quantize` procedure (128 x 512 ShareGPT calibration tokens, layer by
layer) and keeps each checkpoint in --ckpt-dir, so a rerun (or an interrupted run) reuses it.
Rows are appended to --json as they finish; a rerun skips the rows already there.

Usage: python benchmarks/quant_table.py --json docs/quant_table.json --limit 8 \
           rtn:int8 gptq:int8 rtn:int4:g128 gptq:int4:g128 ...
Speed (tg128 vs float32, same run) comes from benchmarks/quant_latency.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch


KV_BUDGET = "256MiB"  # one 2048-token window at a time needs ~90 MiB of float32 KV


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def linear_bits(model) -> tuple[float, int]:
    """(bits per weight over the quantized linear layers, their weight count)."""
    from leanlm.formats.registry import get_format
    from leanlm.quant.checkpoint import quantized_layers

    bits, count = 0.0, 0
    for _, layer in quantized_layers(model).items():
        q = layer.quantized
        n = q.shape[0] * q.shape[1]
        bits += get_format(q.format).bits_per_weight(q.group_size) * n
        count += n
    return bits / count, count


def print_table(done: dict) -> None:
    """One markdown row per format (the spec without its algorithm): RTN and GPTQ side by side."""
    rows = done["rows"]
    base = rows.get("none", {}).get("ppl")
    formats = []
    for item in rows:
        if item != "none":
            key = item.split(":", 1)[1]
            if key not in formats:
                formats.append(key)
    print(f"| format | bits / weight | linear MiB | checkpoint MiB | RTN ppl | GPTQ ppl | "
          f"GPTQ vs RTN | GPTQ quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    counts = [r["linear_weights"] for r in rows.values() if "linear_weights" in r]
    if base and counts:
        print(f"| float32 (unquantized) | 32 | {counts[0] * 4 / 2**20:.0f} | - | {base:.3f} | | | |")

    def ppl(r):
        if r is None:
            return "not run"
        return f"{r['ppl']:.3f} ({r['ppl'] - base:+.2f})" if base and r["ppl"] < 1e4 else f"{r['ppl']:.3g}"

    for key in formats:
        rtn, gptq = rows.get(f"rtn:{key}"), rows.get(f"gptq:{key}")
        any_row = rtn or gptq
        bits = any_row["bits_per_weight"]
        vs = (f"{gptq['ppl'] / rtn['ppl']:.2f}x" if rtn and gptq else "")
        secs = f"{gptq['quantize_seconds']:.0f}" if gptq and gptq.get("quantize_seconds") else ""
        print(f"| {key} | {bits:.2f} | {bits * any_row['linear_weights'] / 8 / 2**20:.0f} | "
              f"{any_row['checkpoint_bytes'] / 2**20:.0f} | {ppl(rtn)} | {ppl(gptq)} | {vs} | {secs} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="*", help="quant specs (ALGO:FORMAT[:gN][:rotate][:act-order]) or 'none'; "
                                            "none given: print the table of what --json holds")
    p.add_argument("--model", default=None)
    p.add_argument("--limit", type=int, default=8, help="WikiText-2 windows of 2048 scored (148 = all)")
    p.add_argument("--ckpt-dir", default="/tmp/leanlm-quant-table")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    from leanlm import LLM
    from leanlm.bench.data import find_data_file, read_text
    from leanlm.bench.perplexity import perplexity
    from leanlm.quant.checkpoint import is_quantized_checkpoint, save_quantized
    from leanlm.quant.cli import load_calibration
    from leanlm.quant.model_quantizer import quantize_model
    from leanlm.quant.spec import QuantSpec

    out = Path(args.json)
    done = json.loads(out.read_text()) if out.is_file() else {"limit": args.limit, "rows": {}}
    if done["limit"] != args.limit:
        raise SystemExit(f"{out} holds --limit {done['limit']} rows; use another --json")
    text_ids = None
    for item in args.specs:
        if item in done["rows"]:
            print(f"[table] {item}: already measured", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        row: dict = {}
        if item == "none":
            llm = LLM(args.model, dtype="float32", kv_cache_memory=KV_BUDGET)
        else:
            spec = QuantSpec.parse(item)
            ckpt = Path(args.ckpt_dir) / item.replace(":", "_")
            if is_quantized_checkpoint(ckpt):
                llm = LLM(str(ckpt), dtype="float32", kv_cache_memory=KV_BUDGET)
                meta = json.loads((ckpt / "quantization.json").read_text())
                row["quantize_seconds"] = (meta.get("extra") or {}).get("seconds")
            else:
                llm = LLM(args.model, dtype="float32", quant=item if spec.algorithm == "rtn" else None,
                          kv_cache_memory=KV_BUDGET)
                if spec.algorithm == "gptq":
                    calib = load_calibration(llm.get_tokenizer())
                    stats = quantize_model(llm.engine.model, spec, calib,
                                           lambda m: print(f"[table] {item}: {m}", file=sys.stderr, flush=True))
                    row["quantize_seconds"] = stats["seconds"]
                save_quantized(llm.engine.model, llm.engine.model_path, ckpt, spec, overwrite=True,
                               extra={"seconds": row.get("quantize_seconds")})
            row["bits_per_weight"], row["linear_weights"] = linear_bits(llm.engine.model)
            row["checkpoint_bytes"] = checkpoint_bytes(ckpt)
        if text_ids is None:
            text_ids = llm.get_tokenizer().encode(read_text(find_data_file("wikitext2_test_gptq_joined.txt")))
        r = perplexity(llm, text_ids, ctx=2048, limit=args.limit, progress=True)
        row.update(ppl=r.ppl, tokens=r.tokens, windows=r.windows, seconds=time.perf_counter() - t0)
        done["rows"][item] = row
        out.write_text(json.dumps(done, indent=2))
        print(f"[table] {item}: ppl {r.ppl:.3f} ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
        del llm
        gc.collect()  # engines hold reference cycles: free each model before the next loads
    print_table(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
