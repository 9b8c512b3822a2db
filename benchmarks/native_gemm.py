"""Float32 linear layers at small M: MKL (torch.mm) vs leanlm's packed native kernel (sgemm.c);
with --int8, INT8 weights: torch's int8pack (bfloat16 activations) vs leanlm's qgemm.c (float32).

Times the 30 decoder layers' linears of SmolLM2-135M (fused qkv 576->960, o 576->576, fused
gate/up 576->3072, down 1536->576; random weights of those shapes, 30 distinct copies so the
weights stream from memory as in decoding) and the LM head (576->49152), at M rows per call: M = 1
is a decode step, M = k+1 a speculative verification of k drafts. Median of --repeats.

    python benchmarks/native_gemm.py [--rows 1 2 5 9 16] [--repeats 7] [--int8]
"""
from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from _timing import median_seconds
from leanlm.native import gemm

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD = (49152, 576)


def timed(fn, repeats: int) -> float:
    return median_seconds(fn, repeats) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 9, 16])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--int8", action="store_true",
                    help="int8 per-channel weights: torch._weight_int8pack_mm vs native qgemm")
    args = ap.parse_args()
    if args.int8:
        return int8_table(args)
    fn = gemm.kernel()
    if fn is None:
        raise SystemExit("the native kernel is unavailable (no C compiler, or LEANLM_NATIVE=0)")
    torch.manual_seed(0)
    layers = [[torch.randn(n, k) for n, k in SHAPES] for _ in range(args.layers)]
    packed = [[gemm.pack(w) for w in ws] for ws in layers]
    head = torch.randn(*HEAD)
    head_p = gemm.pack(head)
    table = Table(title=f"float32 linears, {args.layers} layers + LM head, {torch.get_num_threads()} threads "
                        f"(ms per forward, median of {args.repeats})")
    for col in ("rows", "layers MKL", "layers native", "x", "head MKL", "head native", "x",
                "native vs its M=1"):
        table.add_column(col, justify="right")
    base = None
    for m in args.rows:
        xs = {576: torch.randn(m, 576), 1536: torch.randn(m, 1536)}
        # outputs allocated once and the C function called straight (as the native layer executor
        # does): through gemm.linear_, ~30 us of Python and allocation per call hid ~3 ms of the
        # kernel's growth from M = 1 to M = 4 (docs/BENCHMARKS.md)
        ys = {n: torch.empty(m, n) for n in {w.shape[0] for w in layers[0]} | {HEAD[0]}}
        calls = [(xs[w.shape[1]], p, ys[w.shape[0]]) for ws, ps in zip(layers, packed) for w, p in zip(ws, ps)]
        mkl = timed(lambda: [torch.mm(xs[w.shape[1]], w.t(), out=ys[w.shape[0]]) for ws in layers for w in ws],
                    args.repeats)
        nat = timed(lambda: [fn(x.data_ptr(), m, x.shape[1], p.data_ptr(), y.shape[1], y.data_ptr(), None)
                             for x, p, y in calls], args.repeats)
        hm = timed(lambda: torch.mm(xs[576], head.t(), out=ys[HEAD[0]]), args.repeats)
        hn = timed(lambda: fn(xs[576].data_ptr(), m, 576, head_p.data_ptr(), HEAD[0], ys[HEAD[0]].data_ptr(), None),
                   args.repeats)
        base = base or nat + hn
        table.add_row(str(m), f"{mkl:.2f}", f"{nat:.2f}", f"{mkl / nat:.2f}x", f"{hm:.2f}", f"{hn:.2f}",
                      f"{hm / hn:.2f}x", f"{(nat + hn) / base:.2f}")
    Console().print(table)


def int8_table(args) -> None:
    from leanlm.native import qgemm

    if qgemm.kernel() is None:
        raise SystemExit("the native kernel is unavailable (no C compiler, or LEANLM_NATIVE=0)")
    torch.manual_seed(0)
    shapes = SHAPES * args.layers + [HEAD]
    codes = [torch.randint(-127, 128, s, dtype=torch.int8) for s in shapes]  # distinct: streamed
    scales = [torch.rand(s[0]) * 0.01 for s in shapes]
    panels = [qgemm.pack(c) for c in codes]
    bf_scales = [s.bfloat16() for s in scales]
    table = Table(title=f"int8 linears, {args.layers} layers + LM head, {torch.get_num_threads()} threads "
                        f"(ms per forward, median of {args.repeats})")
    for col in ("rows", "int8pack (bf16 act.)", "native (fp32 act.)", "x"):
        table.add_column(col, justify="right")
    for m in args.rows:
        xs = {576: torch.randn(m, 576), 1536: torch.randn(m, 1536)}
        tp = timed(lambda: [torch._weight_int8pack_mm(xs[c.shape[1]].bfloat16(), c, s).float()
                            for c, s in zip(codes, bf_scales)], args.repeats)
        nat = timed(lambda: [qgemm.linear_(xs[c.shape[1]], p, s, c.shape[0], None)
                             for c, p, s in zip(codes, panels, scales)], args.repeats)
        table.add_row(str(m), f"{tp:.2f}", f"{nat:.2f}", f"{tp / nat:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
