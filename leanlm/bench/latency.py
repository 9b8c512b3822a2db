"""`leanlm bench latency`: llama-bench style rows at batch 1.

- `pp<P>`: prompt processing, P / (seconds to prefill a P-token prompt of pseudo-random ids and
  produce one token). Each run gets its own fixed prompt (seeded by run index) so that a prefix
  cache can never turn a repeat into a cache hit; every engine sees the same prompts.
- `tg<G>`: text generation, greedy, EOS ignored, from a short prompt (or, with --context C, a
  C-token prompt, so every step attends to ~C cached tokens: how a KV codec's read cost shows):
  G + 1 tokens are generated and G / (time of the last token - time of the first) is reported, so
  prefill is excluded.

One warm-up of each row, then `repeats` runs; with a peer, the engines alternate run by run so
that the machine's drift hits both alike (speed is only compared inside one process run).
"""
from __future__ import annotations

import random
import statistics
import sys

import torch

from leanlm.bench.peers import PEERS, LeanlmTarget, make_peer
from leanlm.bench.report import dtype_name, human_bytes, positive_int, print_table, tps, write_json

TG_PROMPT_LEN = 4


def prompt_ids(llm, length: int, seed: int) -> list[int]:
    """`length` pseudo-random ordinary (non-special) token ids, fixed by `seed`."""
    tok = llm.get_tokenizer()
    vocab = min(llm.engine.model_config.vocab_size, tok.vocab_size)
    special = tok.special_token_ids
    pool = [i for i in range(vocab) if i not in special]
    return random.Random(seed).choices(pool, k=length)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer (its own parameters and buffers,
    which include the LM head), each tensor counted once; the embedding gather is left out, and a
    LM head tied to the embedding is counted once, as the LM head."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for m in model.modules():
        if not (hasattr(m, "in_features") and hasattr(m, "out_features")):
            continue
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            key = (t.data_ptr(), t.numel())
            if key not in seen:
                seen.add(key)
                # float32 panels are padded to 16 columns: count the matrix, not the zero padding
                n = m.out_features * m.in_features if name == "packed_weight" else t.numel()
                total += n * t.element_size()
    return total


def summarize(runs: list[float]) -> dict:
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs),
            "stdev": statistics.stdev(runs) if len(runs) > 1 else 0.0}


def measure(targets: list, pp_prompts: list[list[int]], tg_prompt: list[int], gen_len: int,
            repeats: int) -> dict[str, dict[str, list[float]]]:
    """tokens/s of each run: {target name: {"pp": [...], "tg": [...]}}. pp_prompts[0] warms up."""
    for t in targets:
        t.prefill_seconds(pp_prompts[0])
        t.decode_tps(tg_prompt, gen_len)
    runs = {t.name: {"pp": [], "tg": []} for t in targets}
    for r in range(repeats):
        for t in targets:
            p = pp_prompts[r + 1]
            runs[t.name]["pp"].append(len(p) / t.prefill_seconds(p))
        for t in targets:
            runs[t.name]["tg"].append(t.decode_tps(tg_prompt, gen_len))
    return runs


def run_latency(llm, prompt_len: int = 512, gen_len: int = 128, repeats: int = 5,
                vs: str | None = None, model: str = "", threads: int | None = None,
                peer_options: dict | None = None, context: int | None = None) -> dict:
    """Measure leanlm (and a peer) and return the report dict (see `leanlm bench latency --help`)."""
    for name, v in (("prompt_len", prompt_len), ("gen_len", gen_len), ("repeats", repeats)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if vs is not None and vs not in PEERS:
        raise ValueError(f"unknown peer {vs!r} for --vs; allowed: {', '.join(PEERS)}")
    limit = llm.engine.max_model_len
    if prompt_len >= limit:
        raise ValueError(f"prompt_len={prompt_len} leaves no room to generate in the model's context "
                         f"of {limit} tokens")
    if context is not None and (not isinstance(context, int) or context < 1):
        raise ValueError(f"context must be a positive integer, got {context!r}")
    tg_len = TG_PROMPT_LEN if context is None else context
    if tg_len + gen_len + 1 > limit:
        raise ValueError(f"context {tg_len} + gen_len={gen_len} does not fit the model's context of {limit} tokens")
    pp_prompts = [prompt_ids(llm, prompt_len, seed=1000 + r) for r in range(repeats + 1)]
    tg_prompt = prompt_ids(llm, tg_len, seed=0)
    targets = [LeanlmTarget(llm)]
    if vs is not None:
        targets.append(make_peer(vs, llm, **(peer_options or {})))
    runs = measure(targets, pp_prompts, tg_prompt, gen_len, repeats)

    pp, tg = f"pp{prompt_len}", f"tg{gen_len}"
    ours = runs["leanlm"]
    wbytes = decode_weight_bytes(llm.engine.model)
    tg_med = statistics.median(ours["tg"])
    report = {
        f"{pp}_tps": statistics.median(ours["pp"]), f"{tg}_tps": tg_med,
        f"{pp}_runs": ours["pp"], f"{tg}_runs": ours["tg"],
        "bandwidth_gbs": wbytes * tg_med / 1e9, "weight_bytes": wbytes,
        "model": model, "dtype": dtype_name(llm.engine.config.torch_dtype),
        "device": str(llm.engine.config.torch_device),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "compile": bool(llm.engine.config.compile),
        "quant": None if llm.engine.config.quant_spec is None else str(llm.engine.config.quant_spec),
        "prompt_len": prompt_len, "gen_len": gen_len, "repeats": repeats, "context": tg_len,
    }
    from leanlm.bench.perplexity import kv_footprint

    report["kv"], report["kv_bytes_per_token"], report["kv_compression"] = kv_footprint(llm, tg_len)
    if vs is not None:
        theirs = runs[vs]
        report["peer"] = {"name": vs, f"{pp}_tps": statistics.median(theirs["pp"]),
                          f"{tg}_tps": statistics.median(theirs["tg"]),
                          f"{pp}_runs": theirs["pp"], f"{tg}_runs": theirs["tg"]}
        peer = targets[-1]
        if getattr(peer, "gguf_path", None):
            report["peer"].update(gguf=peer.gguf_path, gguf_type=peer.gguf_type, version=peer.version,
                                  weight_bytes=peer.weight_bytes,
                                  bandwidth_gbs=peer.weight_bytes * report["peer"][f"{tg}_tps"] / 1e9)
        report[f"ratio_{pp}"] = report[f"{pp}_tps"] / report["peer"][f"{pp}_tps"]
        report[f"ratio_{tg}"] = report[f"{tg}_tps"] / report["peer"][f"{tg}_tps"]
    return report


NOISY_SPREAD = 0.25  # (max - min) / median above which a row is flagged


def _spread(runs: list[float]) -> float:
    return (max(runs) - min(runs)) / statistics.median(runs)


def _all_runs(report: dict):
    yield "leanlm", report
    if report.get("peer"):
        yield report["peer"]["name"], report["peer"]


def print_report(report: dict) -> None:
    pp, tg = f"pp{report['prompt_len']}", f"tg{report['gen_len']}"
    peer = report.get("peer")
    cols = ["test", "leanlm t/s", "min–max"]
    if peer:
        cols += [f"{peer['name']} t/s", "min–max", f"leanlm/{peer['name']}"]
    rows = []
    for row in (pp, tg):
        s = summarize(report[f"{row}_runs"])
        r = [row, tps(s["median"]), f"{tps(s['min'])}–{tps(s['max'])}"]
        if peer:
            ps = summarize(peer[f"{row}_runs"])
            r += [tps(ps["median"]), f"{tps(ps['min'])}–{tps(ps['max'])}", f"{report[f'ratio_{row}']:.2f}x"]
        rows.append(r)
    caption = (f"{report['model']} · {report['dtype']}" + (f" · {report['quant']}" if report.get("quant") else "")
               + (f" · kv {report['kv']}" if report.get("kv") else "")
               + (f" · {tg} at context {report['context']}" if report.get("context") else "")
               + f" · {report['device']} · {report['threads']} threads · "
               f"median of {report['repeats']} runs after 1 warm-up")
    print_table("leanlm bench latency (batch 1)", cols, rows, caption)
    noisy = [f"{name} {row}" for name, runs in _all_runs(report) for row in (pp, tg)
             if _spread(runs[f"{row}_runs"]) > NOISY_SPREAD]
    if noisy:
        print(f"warning: runs of {', '.join(noisy)} differ by more than {NOISY_SPREAD:.0%} of their median: "
              f"the machine was busy (other processes?); compare only quiet runs", file=sys.stderr)
    print(f"{tg} weight-read bandwidth: {report['bandwidth_gbs']:.1f} GB/s "
          f"({human_bytes(report['weight_bytes'])} of linear + LM-head weights per token "
          f"x {report[f'{tg}_tps']:.2f} tok/s)")
    if peer and peer.get("bandwidth_gbs") is not None:
        print(f"{peer['name']} ({peer['gguf_type']} GGUF, llama-cpp-python {peer['version']}): "
              f"{peer['bandwidth_gbs']:.1f} GB/s ({human_bytes(peer['weight_bytes'])} of matrices per token)")


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "latency", help="llama-bench style pp/tg tokens/s at batch 1, optionally vs transformers or llama.cpp",
        description="Prompt processing (pp<P>: prefill of a P-token pseudo-random prompt, max_tokens=1) "
                    "and text generation (tg<G>: G greedy tokens with EOS ignored, decode steps only) "
                    "in tokens/s at batch 1: one warm-up, then --repeats runs; prints median and "
                    "min–max, plus the weight-read bandwidth the tg row achieves.",
        epilog="Speed drifts on shared machines: compare engines only inside one run (--vs).")
    add_model_args(p)
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per row (default 5)")
    p.add_argument("--prompt-len", type=positive_int, default=512, help="pp row prompt length (default 512)")
    p.add_argument("--gen-len", type=positive_int, default=128, help="tg row generated tokens (default 128)")
    p.add_argument("--vs", choices=PEERS, default=None,
                   help="also time a peer engine on the same checkpoint, dtype and prompts, and print "
                        "leanlm/peer ratios (hf = transformers on the same checkpoint; llama.cpp = "
                        "llama-cpp-python on a GGUF of the same weights, the type matching --quant / "
                        "--dtype: int8 -> Q8_0, int4 -> Q4_1, float32 -> F32, bfloat16 -> BF16)")
    p.add_argument("--peer-gguf", default=None, metavar="FILE",
                   help="with --vs llama.cpp: run this GGUF instead of re-encoding the model's")
    p.add_argument("--peer-gguf-type", default=None, metavar="TYPE",
                   help="with --vs llama.cpp: the GGUF type to re-encode the model's weights to "
                        "(Q8_0, Q4_0, Q4_1, F16, BF16, F32; default: matched as above)")
    p.add_argument("--context", type=positive_int, default=None, metavar="C",
                   help=f"tg row from a C-token prompt: decode speed with C tokens cached (e.g. 2048 to "
                        f"compare --kv codecs; default {TG_PROMPT_LEN})")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads for every engine (default: torch's current setting)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write pp<P>_tps, tg<G>_tps (medians), the runs, bandwidth_gbs, model, dtype, "
                        "device, threads, context, kv, kv_bytes_per_token, kv_compression and, with --vs, "
                        "peer and ratio_* to PATH")
    p.set_defaults(func=cmd_latency)


def source_gguf(model: str | None):
    """The GGUF file a model argument stands for (the embedded model's for none or its alias), or None."""
    from pathlib import Path

    from leanlm.models.embedded import EMBEDDED_ALIAS, embedded_gguf_path

    if model in (None, EMBEDDED_ALIAS):
        return embedded_gguf_path()
    return Path(model) if str(model).endswith(".gguf") else None


def cmd_latency(args) -> int:
    from leanlm.bench.perplexity import model_name
    from leanlm.cli import load_llm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if (args.peer_gguf or args.peer_gguf_type) and args.vs != "llama.cpp":
        raise ValueError("--peer-gguf and --peer-gguf-type go with --vs llama.cpp")
    llm = load_llm(args)
    peer_options = None
    if args.vs == "llama.cpp":
        peer_options = {"source_gguf": source_gguf(args.model), "gguf_type": args.peer_gguf_type,
                        "peer_gguf": args.peer_gguf}
    report = run_latency(llm, prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats,
                         vs=args.vs, model=model_name(args.model), threads=torch.get_num_threads(),
                         peer_options=peer_options, context=args.context)
    print_report(report)
    if args.json:
        write_json(args.json, report)
        print(f"[leanlm] wrote {args.json}", file=sys.stderr)
    return 0
