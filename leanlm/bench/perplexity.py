"""`leanlm eval ppl`: perplexity in the GPTQ protocol (as in GPTQ's `llama_eval`, AWQ, QuaRot).

The whole test text is tokenized once, with no special tokens, and cut into non-overlapping
windows of `ctx` tokens; the last partial window is dropped. Every token of a window except the
first is scored given the window's earlier tokens, so each window is independent (no carried
context) and the number of scored tokens is windows * (ctx - 1). ppl = exp(mean NLL).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from leanlm.bench.data import find_data_file, read_text
from leanlm.bench.report import dtype_name, positive_int, print_table, write_json

DATASETS = {"wikitext2": "wikitext2_test_gptq_joined.txt"}


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int          # scored tokens = windows * (ctx - 1)
    ctx: int
    windows: int
    chunk: int
    seconds: float
    nll_sum: float       # sum of -log p over the scored tokens (float64)
    model: str = ""
    dtype: str = ""
    kv: str = ""                    # the KV codec's spec ('plain': the compute dtype)
    kv_bytes_per_token: float = 0   # all layers, K and V, scales included
    kv_compression: float = 0       # bf16 bytes of a ctx-token sequence / the bytes the cache holds for it

    def to_json(self) -> dict:
        keys = ("ppl", "tokens", "ctx", "model", "dtype", "windows", "chunk", "seconds",
                "kv", "kv_bytes_per_token", "kv_compression")
        d = asdict(self)
        return {k: d[k] for k in keys}


def resolve_data(data: str) -> Path:
    """A dataset name (`wikitext2`) or a path to any text file."""
    if data in DATASETS:
        return find_data_file(DATASETS[data])
    path = Path(data).expanduser()
    if not path.is_file():
        raise ValueError(f"--data {data!r} is neither a known dataset ({', '.join(DATASETS)}) "
                         f"nor an existing text file")
    return path


def cut_windows(ids: list[int], ctx: int, limit: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of exactly `ctx` tokens; the last partial window is dropped."""
    if ctx < 2:
        raise ValueError(f"ctx must be >= 2 (one token of context and one scored), got {ctx}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 window, got {limit}")
    n = len(ids) // ctx
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of ctx={ctx}")
    if limit is not None:
        n = min(n, limit)
    return [ids[i * ctx:(i + 1) * ctx] for i in range(n)]


def perplexity(llm, token_ids: list[int], ctx: int = 2048, chunk: int | None = None,
               limit: int | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of `token_ids` under `llm` (a leanlm `LLM`), GPTQ windows of `ctx` tokens.

    `chunk` tokens are fed per forward pass inside a window (default: the whole window at once).
    Every chunk attends to the paged cache as the KV codec stores it, its own tokens included, so
    with a lossless codec the result does not depend on `chunk` beyond float rounding, and with a
    lossy one chunk=1 is exactly what token-by-token decoding sees (see LLM.score)."""
    limit_ctx = llm.engine.max_model_len
    if ctx > limit_ctx:
        raise ValueError(f"ctx={ctx} is larger than the model's context of {limit_ctx} tokens")
    chunk = ctx if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    windows = cut_windows(token_ids, ctx, limit)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(windows), desc="perplexity", unit="win", file=sys.stderr, dynamic_ncols=True)
    nll_sum, count = 0.0, 0
    t0 = time.perf_counter()
    try:
        for w in windows:
            logp = llm.score(w, chunk=chunk)  # float64 [ctx - 1]
            nll_sum -= float(logp.sum())
            count += logp.numel()
            if bar is not None:
                bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.4f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    kv, kv_bytes, compression = kv_footprint(llm, ctx)
    return PerplexityResult(ppl=math.exp(nll_sum / count), tokens=count, ctx=ctx, windows=len(windows),
                            chunk=chunk, seconds=seconds, nll_sum=nll_sum,
                            dtype=dtype_name(llm.engine.config.torch_dtype),
                            kv=kv, kv_bytes_per_token=kv_bytes, kv_compression=compression)


def kv_footprint(llm, context: int | None = None) -> tuple[str, float, float]:
    """(codec spec, bytes per token, compression vs a bf16 cache) of `llm`'s KV cache. With
    eviction (kv stream:...) a sequence holds fewer tokens than it has: the compression is then
    that of a `context`-token sequence (bf16 bytes of all its tokens / the bytes of those held)."""
    import torch

    from leanlm.kv.codecs import PlainCodec

    cache, mc = llm.engine.cache, llm.engine.model_config
    bf16 = PlainCodec.bytes_per_token_for(mc.num_layers, mc.num_kv_heads, mc.head_dim, torch.bfloat16)
    spec = getattr(getattr(cache, "codec", None), "spec", "plain")
    per_token = cache.bytes_per_token()
    ratio = context / cache.held_tokens(context) if context else 1.0
    return spec, per_token, round(bf16 / per_token * ratio, 4)


def model_name(args_model: str | None) -> str:
    """How reports name the model: as the user gave it, or the embedded alias."""
    if args_model:
        return str(args_model)
    from leanlm.models.embedded import EMBEDDED_ALIAS

    return EMBEDDED_ALIAS


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "ppl", help="perplexity on WikiText-2 (GPTQ protocol) or any text file",
        description="Perplexity in the GPTQ protocol: tokenize the whole text once (no special tokens), "
                    "cut it into non-overlapping windows of --ctx tokens (the last partial window is "
                    "dropped), score every token of a window but its first, ppl = exp(mean NLL).")
    add_model_args(p)
    p.add_argument("--data", default="wikitext2",
                   help="'wikitext2' (the WikiText-2 test split, joined with blank lines as GPTQ does; "
                        "found in $LEANLM_DATA, ../shared/data or /work/shared/data) or a text file path")
    p.add_argument("--ctx", type=positive_int, default=2048,
                   help="window length in tokens (at most the model's context; default 2048)")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N windows")
    p.add_argument("--chunk", type=positive_int, default=None,
                   help="tokens per forward pass inside a window (default: --ctx, one pass; 64 with --kv); "
                        "each chunk attends to the cache as the --kv codec stores it, 1 = token-by-token decoding")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write {ppl, tokens, ctx, model, dtype, windows, chunk, seconds, kv, "
                        "kv_bytes_per_token, kv_compression} to PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ppl)


def cmd_ppl(args) -> int:
    from leanlm.cli import load_llm

    path = resolve_data(args.data)  # fail on a missing file before loading the model
    llm = load_llm(args)
    if args.ctx > llm.engine.max_model_len:
        raise ValueError(f"--ctx {args.ctx} is larger than the model's context of "
                         f"{llm.engine.max_model_len} tokens")
    t0 = time.perf_counter()
    ids = llm.get_tokenizer().encode(read_text(path), add_special_tokens=False)
    print(f"[leanlm] {path}: {len(ids)} tokens, {len(ids) // args.ctx} windows of {args.ctx} "
          f"(tokenized in {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    chunk = 64 if args.chunk is None and getattr(args, "kv", None) else args.chunk
    res = perplexity(llm, ids, ctx=args.ctx, chunk=chunk, limit=args.limit,
                     progress=not args.no_progress)
    res.model = model_name(args.model)
    print_table(f"perplexity: {path.name}",
                ["model", "dtype", "kv", "kv B/token", "ctx", "chunk", "windows", "tokens", "ppl", "seconds"],
                [[res.model, res.dtype, res.kv, res.kv_bytes_per_token, res.ctx, res.chunk, res.windows,
                  res.tokens, f"{res.ppl:.4f}", f"{res.seconds:.1f}"]])
    if args.json:
        write_json(args.json, res.to_json())
        print(f"[leanlm] wrote {args.json}", file=sys.stderr)
    return 0
