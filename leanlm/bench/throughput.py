"""`leanlm bench throughput`: offline throughput, as vLLM's benchmark_throughput measures it.

The first N ShareGPT prompts (see sharegpt.py) are tokenized as raw text with the model's
tokenizer (no chat template: the same token ids go to every engine, and the prompt lengths are
the dataset's own), truncated to --max-prompt-len tokens (and to what leaves room for the output
in the model's context). Every request generates exactly --output-len tokens: greedy, EOS ignored.

- leanlm: one `LLM.generate` call with all the prompts at once, so continuous batching decides
  how they share the steps; timed after a short warm-up on 2 other prompts.
- `--baseline sequential`: the same engine object, one `generate` call per prompt.
- `--vs hf`: transformers `generate` on left-padded batches of --hf-batch-size rows.

Baselines may run on only the first --baseline-prompts prompts (they are slow); each throughput
is measured on the prompts its engine ran, and ratios compare output tokens/s. Prefix caching is
off, so that a prompt seen in one run cannot become a cache hit in the next.

`--repeats N` times the leanlm run and the `--kv-baseline` run N times each, alternating which goes
first (A B, B A, A B, ...), and reports each engine's median run and the median of the N ratios of
runs made back to back. Shared machines drift by tens of percent within minutes: one A-then-B pair
measured the same two engines at 1.74x and, an hour later, 2.37x.
"""
from __future__ import annotations

import gc
import math
import statistics
import sys
import time

import torch

from leanlm.bench.peers import PEERS, make_peer
from leanlm.bench.report import dtype_name, positive_int, print_table, tps, write_json
from leanlm.bench.sharegpt import add_dataset_arg, load_prompts

BASELINES = ("sequential",)
WARMUP_PROMPT_LEN = 16
WARMUP_OUTPUT_LEN = 4


def prepare_requests(llm, prompts: list[str], max_prompt_len: int, output_len: int) -> tuple[list[list[int]], int]:
    """Token ids of each prompt (raw text, the tokenizer's own special tokens), cut to fit; and how
    many were cut. Truncation keeps the start of a prompt, where its question usually is."""
    limit = llm.engine.max_model_len
    cap = min(max_prompt_len, limit - output_len)
    if cap < 1:
        raise ValueError(f"output_len={output_len} leaves no room for a prompt in the model's context "
                         f"of {limit} tokens")
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in prompts]
    return [x[:cap] for x in ids], sum(len(x) > cap for x in ids)


def stats(num_requests: int, prompt_tokens: int, output_tokens: int, seconds: float) -> dict:
    """vLLM's throughput fields for one engine's run."""
    return {"num_prompts": num_requests, "elapsed_s": seconds,
            "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
            "request_throughput": num_requests / seconds, "output_throughput": output_tokens / seconds,
            "total_token_throughput": (prompt_tokens + output_tokens) / seconds}


def _params(output_len: int):
    from leanlm import SamplingParams

    return SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)


def _check_lengths(outputs, output_len: int, what: str) -> int:
    got = [len(o.outputs[0].token_ids) for o in outputs]
    if any(n != output_len for n in got):
        raise RuntimeError(f"{what}: a request produced {min(got)}..{max(got)} tokens, expected {output_len}")
    return sum(got)


def warm_up(llm) -> None:
    """Two short requests of pseudo-random tokens (never the measured prompts): first-call costs
    (allocation, kernels' first runs) are paid here, not inside the timed run."""
    from leanlm.bench.latency import prompt_ids

    n = max(1, min(WARMUP_PROMPT_LEN, llm.engine.max_model_len - WARMUP_OUTPUT_LEN - 1))
    llm.generate([prompt_ids(llm, n, seed=s) for s in (7, 8)], _params(WARMUP_OUTPUT_LEN))


def time_batched(llm, reqs: list[list[int]], output_len: int) -> dict:
    t0 = time.perf_counter()
    outputs = llm.generate(reqs, _params(output_len), use_tqdm=True)
    seconds = time.perf_counter() - t0
    n_out = _check_lengths(outputs, output_len, "leanlm")
    return stats(len(reqs), sum(map(len, reqs)), n_out, seconds)


def time_sequential(llm, reqs: list[list[int]], output_len: int) -> dict:
    from tqdm import tqdm

    outputs, seconds = [], 0.0
    for ids in tqdm(reqs, desc="leanlm sequential", unit="req"):
        t0 = time.perf_counter()  # only generate is timed, not the progress bar
        outputs += llm.generate(ids, _params(output_len))
        seconds += time.perf_counter() - t0
    n_out = _check_lengths(outputs, output_len, "leanlm sequential")
    return stats(len(reqs), sum(map(len, reqs)), n_out, seconds)


def time_hf(llm, reqs: list[list[int]], output_len: int, batch_size: int) -> dict:
    from tqdm import tqdm

    peer = make_peer("hf", llm)
    peer.generate_batched(reqs[:2], min(output_len, WARMUP_OUTPUT_LEN), batch_size)  # warm-up, as leanlm's
    with tqdm(total=len(reqs), desc="hf generate", unit="req") as bar:
        seconds = peer.generate_batched(reqs, output_len, batch_size, progress=bar.update)
    result = stats(len(reqs), sum(map(len, reqs)), len(reqs) * output_len, seconds)
    result["batch_size"] = batch_size
    return result


def run_throughput(llm, prompts: list[str], output_len: int = 128, max_prompt_len: int = 1024,
                   baseline: str | None = None, vs: str | None = None, hf_batch_size: int = 32,
                   baseline_prompts: int | None = None, model: str = "", threads: int | None = None,
                   dataset: str = "") -> dict:
    """Time leanlm (and the baselines) and return the report dict (see `leanlm bench throughput -h`)."""
    for name, v in (("output_len", output_len), ("max_prompt_len", max_prompt_len),
                    ("hf_batch_size", hf_batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not prompts:
        raise ValueError("no prompts to run (num_prompts must be >= 1)")
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; allowed: {', '.join(BASELINES)}")
    if vs is not None and vs not in PEERS:
        raise ValueError(f"unknown peer {vs!r} for --vs; allowed: {', '.join(PEERS)}")
    if baseline_prompts is not None and (not isinstance(baseline_prompts, int) or baseline_prompts < 1):
        raise ValueError(f"baseline_prompts must be a positive integer, got {baseline_prompts!r}")
    reqs, truncated = prepare_requests(llm, prompts, max_prompt_len, output_len)
    k = min(baseline_prompts or len(reqs), len(reqs))

    warm_up(llm)
    preempted = llm.engine.stats().num_preemptions
    report = time_batched(llm, reqs, output_len)
    report["num_preemptions"] = llm.engine.stats().num_preemptions - preempted
    if baseline == "sequential":
        report["sequential"] = time_sequential(llm, reqs[:k], output_len)
        report["ratio_vs_sequential"] = report["output_throughput"] / report["sequential"]["output_throughput"]
    if vs == "hf":
        report["hf"] = time_hf(llm, reqs[:k], output_len, hf_batch_size)
        report["ratio_vs_hf"] = report["output_throughput"] / report["hf"]["output_throughput"]

    cfg = llm.engine.config
    lens = [len(r) for r in reqs]
    report.update({
        "model": model, "dtype": dtype_name(cfg.torch_dtype), "device": str(cfg.torch_device),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "compile": bool(cfg.compile), "max_num_seqs": cfg.max_num_seqs, "seed": cfg.seed,
        "prefix_caching": bool(cfg.enable_prefix_caching), "dataset": str(dataset),
        "num_prompts": len(reqs), "output_len": output_len, "max_prompt_len": max_prompt_len,
        "num_truncated_prompts": truncated, "prompt_tokens": lens,
        "prompt_tokens_min": min(lens), "prompt_tokens_mean": sum(lens) / len(lens),
        "prompt_tokens_max": max(lens),
        "baseline_prompts": k if (baseline or vs) else None,
        "hf_batch_size": hf_batch_size if vs == "hf" else None,
    })
    report.update(kv_capacity(llm, report["prompt_tokens_mean"] + output_len))
    return report


def run_kv_baseline(llm, prompts: list[str], output_len: int, max_prompt_len: int) -> dict:
    """The same requests on an engine with another KV codec (--kv-baseline): its throughput, how
    many sequences its pool fits and how often it preempted."""
    reqs, _ = prepare_requests(llm, prompts, max_prompt_len, output_len)
    warm_up(llm)
    preempted = llm.engine.stats().num_preemptions
    result = time_batched(llm, reqs, output_len)
    result["num_preemptions"] = llm.engine.stats().num_preemptions - preempted
    result.update(kv_capacity(llm, sum(map(len, reqs)) / len(reqs) + output_len))
    return result


def kv_capacity(llm, tokens_per_seq: float) -> dict:
    """The KV cache's codec and size: bytes per token, the bytes it holds, its capacity in tokens,
    and how many sequences of `tokens_per_seq` tokens fit at once (at most max_num_seqs)."""
    from leanlm.bench.perplexity import kv_footprint

    kv, per_token, compression = kv_footprint(llm, round(tokens_per_seq))
    used, free, block = llm.engine.cache.usage()
    capacity = (used + free) * block
    tokens_per_seq = min(tokens_per_seq, llm.engine.cache.held_tokens(math.ceil(tokens_per_seq)))  # eviction
    codec = getattr(llm.engine.cache, "codec", None)
    return {"kv": kv, "kv_bytes_per_token": per_token, "kv_compression": compression,
            "kv_cache_bytes": codec.allocated_bytes() if codec is not None else None,
            "kv_capacity_tokens": capacity,
            "seqs_fit": min(llm.engine.config.max_num_seqs, int(capacity // (-(-tokens_per_seq // block) * block)))}


def print_report(report: dict) -> None:
    cols = ["engine", "prompts", "seconds", "req/s", "output tok/s", "total tok/s", "leanlm ×"]

    def row(name: str, r: dict, ratio: float | None) -> list:
        return [name, r["num_prompts"], f"{r['elapsed_s']:.2f}", f"{r['request_throughput']:.2f}",
                tps(r["output_throughput"]), tps(r["total_token_throughput"]),
                "—" if ratio is None else f"{ratio:.2f}x"]

    rows = [row(f"leanlm (batched, max_num_seqs={report['max_num_seqs']})", report, None)]
    if "sequential" in report:
        rows.append(row("leanlm sequential (1 request at a time)", report["sequential"],
                        report["ratio_vs_sequential"]))
    if "hf" in report:
        rows.append(row(f"hf generate (batches of {report['hf']['batch_size']})", report["hf"],
                        report["ratio_vs_hf"]))
    if "kv_baseline" in report:
        b = report["kv_baseline"]
        rows[0][0] += f" --kv {report['kv']}"
        rows.append(row(f"leanlm --kv {b['kv']} ({b['seqs_fit']} sequences fit, {b['num_preemptions']} "
                        f"preemptions)", b, report["ratio_vs_kv_baseline"]))
    kv = (f"kv {report['kv']}: {report['kv_capacity_tokens']} tokens, {report['seqs_fit']} sequences fit, "
          f"{report['num_preemptions']} preemptions · ") if "kv" in report else ""
    caption = (f"{report['model']} · {report['dtype']} · {report['device']} · {report['threads']} threads · {kv}"
               f"{report['num_prompts']} ShareGPT prompts of {report['prompt_tokens_min']}–"
               f"{report['prompt_tokens_max']} tokens (mean {report['prompt_tokens_mean']:.0f}) · "
               f"{report['output_len']} output tokens each · 'leanlm ×' = leanlm output tok/s / that row's")
    if report.get("repeats", 1) > 1:
        caption += f" · median run of {report['repeats']} per engine, alternating"
        if "ratios_vs_kv_baseline" in report:
            caption += (f"; the --kv-baseline ratio is the median of the back-to-back ratios "
                        f"{', '.join(f'{r:.2f}x' for r in report['ratios_vs_kv_baseline'])}")
    print_table("leanlm bench throughput (offline)", cols, rows, caption)
    if report["num_truncated_prompts"]:
        print(f"note: {report['num_truncated_prompts']} prompts were cut to "
              f"{max(report['prompt_tokens'])} tokens (--max-prompt-len / the model's context)", file=sys.stderr)
    k = report.get("baseline_prompts")
    if k is not None and k < report["num_prompts"]:
        print(f"note: baselines ran on the first {k} of {report['num_prompts']} prompts (--baseline-prompts); "
              f"ratios compare throughputs, each on its own prompts", file=sys.stderr)


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "throughput", help="offline throughput on ShareGPT prompts (vLLM benchmark_throughput style)",
        description="Generate --output-len tokens (greedy, EOS ignored) for each of the first --num-prompts "
                    "ShareGPT prompts with one LLM.generate call, after a 2-prompt warm-up, and report "
                    "requests/s, output tokens/s and total (prompt + output) tokens/s. Prompts are the raw "
                    "text tokenized by the model's tokenizer (no chat template), cut to --max-prompt-len "
                    "tokens. Baselines run in the same process on the same token ids.",
        epilog="Speed drifts on shared machines: compare engines only inside one run (--baseline, --vs, "
               "--kv-baseline), and repeat the comparison (--repeats).")
    add_model_args(p)
    add_dataset_arg(p)
    p.add_argument("--num-prompts", type=positive_int, default=64, help="requests: the first N prompts (default 64)")
    p.add_argument("--output-len", type=positive_int, default=128,
                   help="tokens generated per request, exactly (default 128)")
    p.add_argument("--max-prompt-len", type=positive_int, default=1024,
                   help="cut longer prompts to this many tokens, keeping their start (default 1024; "
                        "also cut to fit the model's context with the output)")
    p.add_argument("--max-num-seqs", type=positive_int, default=None,
                   help="most sequences leanlm decodes together (default: the engine's, 64)")
    p.add_argument("--baseline", choices=BASELINES, default=None,
                   help="also run the prompts one request at a time on the same engine")
    p.add_argument("--vs", choices=PEERS, default=None,
                   help="also run a peer on the same token ids, dtype and threads (hf = transformers "
                        "batched generate)")
    p.add_argument("--hf-batch-size", type=positive_int, default=32,
                   help="rows per transformers generate call with --vs hf (default 32)")
    p.add_argument("--baseline-prompts", type=positive_int, default=None, metavar="K",
                   help="run baselines on the first K prompts only (at most --num-prompts), as they can be slow "
                        "(default: all); "
                        "their throughput is measured on those K")
    p.add_argument("--kv-baseline", default=None, metavar="SPEC",
                   help="also run the same prompts on a second engine whose KV cache uses codec SPEC "
                        "(e.g. bf16) under the same --kv-cache-memory, in this process: the ratio "
                        "compares --kv with it")
    p.add_argument("--repeats", type=positive_int, default=1, metavar="N",
                   help="time the leanlm run and the --kv-baseline run N times each, alternating which "
                        "goes first (A B, B A, ...); report each engine's median run and the median of "
                        "the N back-to-back ratios (default 1). Shared machines drift by tens of percent "
                        "within minutes")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads for every engine (default: torch's current setting)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write request_throughput, output_throughput, total_token_throughput, elapsed_s, "
                        "token totals, sequential / hf sections and ratio_vs_* (leanlm output tok/s / "
                        "baseline's), the KV cache (kv, kv_bytes_per_token, kv_compression, kv_cache_bytes, "
                        "kv_capacity_tokens, seqs_fit: sequences of mean length that fit, num_preemptions), "
                        "a kv_baseline section and ratio_vs_kv_baseline with --kv-baseline, with --repeats the runs of "
                        "each engine and ratios_vs_kv_baseline, and the config (model, dtype, prompt_tokens, threads, ...) to PATH")
    p.set_defaults(func=cmd_throughput)


def median_run(runs: list[dict]) -> dict:
    """The run with the median output throughput (of an even number, the slower middle one)."""
    return sorted(runs, key=lambda r: r["output_throughput"])[(len(runs) - 1) // 2]


def run_summary(r: dict) -> dict:
    return {k: r[k] for k in ("elapsed_s", "output_throughput", "total_token_throughput", "num_preemptions")}


def combine_repeats(mains: list[dict], bases: list[dict]) -> dict:
    """One report from `--repeats` runs: each engine's median run; the sequential / hf baselines
    (timed once, in the first run) compared with the median run; the kv baseline's ratio as the
    median of the ratios of runs made back to back (mains[i] with bases[i])."""
    report = dict(median_run(mains))
    report["repeats"] = len(mains)
    for key in ("sequential", "hf"):
        if key in mains[0]:
            report[key] = mains[0][key]
            report[f"ratio_vs_{key}"] = report["output_throughput"] / report[key]["output_throughput"]
    if len(mains) > 1:
        report["runs"] = [run_summary(r) for r in mains]
    if bases:
        base = dict(median_run(bases))
        if len(bases) > 1:
            base["runs"] = [run_summary(r) for r in bases]
        report["kv_baseline"] = base
        ratios = [m["output_throughput"] / b["output_throughput"] for m, b in zip(mains, bases)]
        report["ratios_vs_kv_baseline"] = ratios
        report["ratio_vs_kv_baseline"] = statistics.median(ratios)
    return report


def cmd_throughput(args) -> int:
    from leanlm.bench.perplexity import model_name

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    prompts, path = load_prompts(args.num_prompts, args.dataset)  # before the model: fail fast
    from leanlm.cli import load_llm

    # prefix caching off: a prompt cached by one run must not speed up a baseline (module docstring)
    extra = {} if args.max_num_seqs is None else {"max_num_seqs": args.max_num_seqs}
    mains, bases = [], []

    # each run loads its engine afresh: one engine's weights and KV pool in memory at a time
    def run_main():
        first = not mains  # the sequential / hf baselines are timed once
        llm = load_llm(args, enable_prefix_caching=False, **extra)
        mains.append(run_throughput(
            llm, prompts, output_len=args.output_len, max_prompt_len=args.max_prompt_len,
            baseline=args.baseline if first else None, vs=args.vs if first else None,
            hf_batch_size=args.hf_batch_size, baseline_prompts=args.baseline_prompts,
            model=model_name(args.model), threads=torch.get_num_threads(), dataset=str(path)))

    def run_base():
        base = load_llm(args, enable_prefix_caching=False, kv=args.kv_baseline, **extra)
        bases.append(run_kv_baseline(base, prompts, args.output_len, args.max_prompt_len))

    runs = (run_main, run_base) if args.kv_baseline is not None else (run_main,)
    for i in range(args.repeats):
        for run in runs if i % 2 == 0 else runs[::-1]:
            run()
            gc.collect()  # the engine of the run that ended is freed before the next one loads
    report = combine_repeats(mains, bases)
    print_report(report)
    if args.json:
        write_json(args.json, report)
        print(f"[leanlm] wrote {args.json}", file=sys.stderr)
    return 0
