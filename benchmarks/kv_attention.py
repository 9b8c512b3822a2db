"""Decode attention kernels of one layer (SmolLM2-135M's shape: 9 query heads, 3 KV heads of 64)
straight from the cache: a plain float32 or bfloat16 paged cache (ops.c) and KIVI's codes
(kivi_attention.c) with post-RoPE keys, pre-RoPE keys, and pre-RoPE keys at kmix's mixed widths
(3.5 bits on average, values at 4). B sequences of L cached tokens each, random contents,
microseconds per layer call (median of --repeats); a decode step makes 30 such calls.

    python benchmarks/kv_attention.py [--batch 1 3 8] [--context 600 2000] [--repeats 200]
"""
from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from _timing import median_seconds
from leanlm.kv import kmix
from leanlm.kv.quantized import KiviCodec, fill_random
from leanlm.native import kivi, ops

HQ, H, D, BS = 9, 3, 64, 64


def timed(fn, repeats: int) -> float:
    return median_seconds(fn, repeats) * 1e6


def kivi_codec(num_blocks: int, rope, kmix_bits: float | None = None) -> KiviCodec:
    """kivi:4:g64:v3:c32:s8[:prerope] with random codes, scales and zeros, no residual rows; with
    kmix_bits, keys at mixed widths (kmix, a plan from random channel weights), values at 4 bits."""
    plan = kmix.plan_from_weights([torch.rand(H, D, generator=torch.Generator().manual_seed(2))],
                                  kmix_bits) if kmix_bits else None
    c = KiviCodec(1, num_blocks, BS, H, D, torch.float32, "cpu", bits=4, max_partial=1,
                  vbits=4 if plan else 3, vgroup=32, scale_bits=8, rope=rope, key_plan=plan)
    fill_random(c, torch.Generator().manual_seed(0))
    c.res_row.fill_(-1)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 3, 8])
    ap.add_argument("--context", type=int, nargs="+", default=[600, 2000])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    if kivi.kernel() is None or not ops.available():
        raise SystemExit("the native kernels are not available (no C compiler, or LEANLM_NATIVE=0)")
    table = Table(title="decode attention, one layer, us per call (median)")
    for col in ("B", "L", "f32 pages", "bf16 pages", "kivi", "kivi prerope", "kivi / bf16", "kmix 3.5 prerope"):
        table.add_column(col, justify="right")
    g = torch.Generator().manual_seed(1)
    for L in args.context:
        nblk = -(-L // BS)
        for B in args.batch:
            num_blocks = B * nblk
            tables = torch.arange(num_blocks).view(B, nblk)
            lens = torch.full((B,), L)
            q = torch.randn(B, HQ, D, generator=g)
            kc, vc = torch.randn(num_blocks * BS, H, D, generator=g), torch.randn(num_blocks * BS, H, D, generator=g)
            f32 = timed(lambda: ops.paged_attention(q, kc, vc, tables, lens, BS), args.repeats)
            kb, vb = kc.bfloat16(), vc.bfloat16()
            bf = timed(lambda: ops.paged_attention(q, kb, vb, tables, lens, BS), args.repeats)
            cos, sin = torch.randn(nblk * BS, D, generator=g), torch.randn(nblk * BS, D, generator=g)
            plain, pre = kivi_codec(num_blocks, None), kivi_codec(num_blocks, (cos, sin))
            kv = timed(lambda: kivi.decode_attention(plain, 0, q, tables, lens), args.repeats)
            kp = timed(lambda: kivi.decode_attention(pre, 0, q, tables, lens), args.repeats)
            mixed = kivi_codec(num_blocks, (cos, sin), 3.5)
            km = timed(lambda: kivi.decode_attention(mixed, 0, q, tables, lens), args.repeats)
            table.add_row(str(B), str(L), f"{f32:.0f}", f"{bf:.0f}", f"{kv:.0f}", f"{kp:.0f}", f"{kp / bf:.2f}x",
                          f"{km:.0f}")
    Console().print(table)
    Console().print(f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
