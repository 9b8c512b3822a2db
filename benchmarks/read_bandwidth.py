"""This machine's memory read bandwidth: a read-only pass (sum) over a 1 GiB float32 tensor with
the given torch thread count; median of 7 passes. The ceiling for batch-1 decode is this number
divided by the bytes of weights read per token.  Usage: python benchmarks/read_bandwidth.py [threads]"""
import statistics
import sys
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(threads)
x = torch.ones(2**28, dtype=torch.float32)  # 1 GiB
x.sum()
times = []
for _ in range(7):
    t = time.perf_counter()
    x.sum()
    times.append(time.perf_counter() - t)
gbs = x.numel() * 4 / statistics.median(times) / 1e9
print(f"read bandwidth: {gbs:.1f} GB/s ({threads} threads, median of 7 passes over 1 GiB)")
