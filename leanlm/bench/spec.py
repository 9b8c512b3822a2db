"""`leanlm bench spec`: speculative decoding against plain decoding, in the same run.

One engine is loaded with the proposer; for each prompt (with `--batch N`: each group of N
prompts, submitted together and decoded as one continuous batch) it decodes greedily once with
the proposer switched off and once with it on (interleaved, so the machine's drift hits both
alike), on the same weights and cache. With --batch the tokens/s are total throughput. Reported: tokens/s of both, the speedup, the proposer's
acceptance rate and mean accepted length (tokens per verification), and whether every output
equals plain greedy decoding token for token. Prefix caching is off, so the second run of a
prompt does not find the first one's blocks. CPU time of the process is reported too: unlike
wall time it does not count the time a busy machine keeps the process paused.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

from leanlm.bench.report import positive_int, print_table, tps, write_json

MT_BENCH = "mt_bench_question.jsonl"
GROUNDED = "wikitext-grounded"


def load_prompts(source: str, tokenizer, limit: int) -> list[list[int]]:
    """Token ids of the first `limit` prompts: `mt-bench` (first turns, chat template),
    `wikitext-grounded` (20 passages to repeat / rewrite / extract from, see bench/grounded.py), or
    a FILE: .jsonl with a `turns` (first taken), `prompt` or `text` field per line, else one per line."""
    if source == GROUNDED:
        from leanlm.bench.grounded import load_grounded_prompts

        return _encode(load_grounded_prompts()[:limit], tokenizer)
    if source == "mt-bench":
        from leanlm.bench.data import find_data_file

        path = find_data_file(MT_BENCH)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"--prompts {source!r}: not 'mt-bench', not {GROUNDED!r} and not a file")
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            row = json.loads(line)
            text = row["turns"][0] if "turns" in row else row.get("prompt", row.get("text"))
            if not isinstance(text, str):
                raise ValueError(f"{path}: a line has no 'turns', 'prompt' or 'text' string")
            texts.append(text)
        else:
            texts.append(line)
        if len(texts) == limit:
            break
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return _encode(texts, tokenizer)


def _encode(texts: list[str], tokenizer) -> list[list[int]]:
    """Each text as one user turn under the model's chat template (plain text without one)."""
    if tokenizer.chat_template:
        return [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
    return [tokenizer.encode(t) for t in texts]


def run(llm, prompts: list[list[int]], max_tokens: int, batch: int = 1) -> dict:
    from collections import Counter

    from leanlm import SamplingParams

    engine = llm.engine
    spec = engine.speculator
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    spec.enabled = False  # warm-up of both paths on a prompt prefix, not timed
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0, max_tokens=4))
    spec.enabled = True
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0, max_tokens=4))
    before = copy.copy(spec.stats)
    before_choices = Counter(spec.stats.choices)
    seconds = {False: 0.0, True: 0.0}
    cpu = {False: 0.0, True: 0.0}  # process CPU time: unaffected by the process being paused
    tokens = {False: 0, True: 0}
    identical = []
    for at in range(0, len(prompts), batch):
        group = prompts[at:at + batch]
        outs = {}
        for on in (False, True):
            spec.enabled = on
            t0, c0 = time.perf_counter(), time.process_time()
            outs[on] = [o.outputs[0].token_ids for o in llm.generate(group, params)]
            seconds[on] += time.perf_counter() - t0
            cpu[on] += time.process_time() - c0
            tokens[on] += sum(len(o) for o in outs[on])
        identical.extend(a == b for a, b in zip(outs[False], outs[True]))
    spec.enabled = True
    s = spec.stats
    drafted, accepted = s.drafted - before.drafted, s.accepted - before.accepted
    verifications, emitted = s.verifications - before.verifications, s.emitted - before.emitted
    base_tps, spec_tps = tokens[False] / seconds[False], tokens[True] / seconds[True]
    return {"spec": s.spec, "num_prompts": len(prompts), "max_tokens": max_tokens, "batch": batch,
            "spec_max_batch": spec.max_batch,
            "baseline_tokens": tokens[False], "spec_tokens": tokens[True],
            "baseline_s": seconds[False], "spec_s": seconds[True],
            "baseline_tps": base_tps, "spec_tps": spec_tps, "speedup": spec_tps / base_tps,
            "baseline_cpu_s": cpu[False], "spec_cpu_s": cpu[True], "speedup_cpu": cpu[False] / cpu[True],
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_len": emitted / verifications if verifications else 0.0,
            "drafted": drafted, "accepted": accepted, "verifications": verifications,
            "target_forwards": s.target_forwards - before.target_forwards,
            "identical_outputs": all(identical), "num_identical": sum(identical),
            # the drafting policy: steps off by the batch cap / by the cost model, and the
            # choices made ('E=13:k=3' for early-exit:auto, 'k=4' or 'off')
            "off_batch_steps": s.off_batch - before.off_batch, "off_cost_steps": s.off_cost - before.off_cost,
            "choices": dict((Counter(s.choices) - before_choices).most_common()),
            "acceptance_estimate": s.acceptance_estimate,
            "token_cost": s.token_cost, "draft_cost": s.draft_cost,  # the cost model's measured inputs
            "layer_acceptance": {str(e): a for e, a in s.layer_acceptance.items()}}


def _top(choices: dict, n: int = 6) -> str:
    return ", ".join(f"{c} x{v}" for c, v in list(choices.items())[:n]) or "none"


def add_parser(benches, add_model_args) -> None:
    p = benches.add_parser("spec", help="speculative decoding vs plain greedy decoding, same run",
                           description=__doc__.split("\n\n")[0])
    add_model_args(p)  # includes --spec
    p.add_argument("--prompts", default="mt-bench", help="mt-bench (first turns), wikitext-grounded (20 passages to repeat, rewrite or "
                        "extract from, built from WikiText-2 test) or a FILE (.jsonl or lines)")
    p.add_argument("--num-prompts", type=positive_int, default=80)
    p.add_argument("--max-tokens", type=positive_int, default=128)
    p.add_argument("--batch", type=positive_int, default=1,
                   help="concurrent requests: prompts go in groups of N, each decoded as one batch; "
                        "tokens/s are then total throughput")
    p.add_argument("--spec-max-batch", type=positive_int, default=None,
                   help="no drafting above this many decoding sequences (engine default 4); raise it "
                        "to let the cost model alone decide")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=cmd_spec)


def cmd_spec(args) -> int:
    from leanlm.cli import load_llm

    if not args.spec:
        raise ValueError("bench spec needs --spec SPEC (e.g. ngram:n=3:k=8, early-exit:8, draft:MODEL)")
    extra = {"spec_max_batch": args.spec_max_batch} if args.spec_max_batch else {}
    llm = load_llm(args, enable_prefix_caching=False, **extra)
    prompts = load_prompts(args.prompts, llm.get_tokenizer(), args.num_prompts)
    print(f"[leanlm] bench spec {llm.engine.config.spec}: {len(prompts)} prompts, up to {args.max_tokens} "
          f"tokens each, greedy, batch {args.batch}", file=sys.stderr)
    r = run(llm, prompts, args.max_tokens, args.batch)
    print_table(f"speculative decoding: {r['spec']} ({args.prompts}, {r['num_prompts']} prompts)",
                ["decoding", "tokens", "seconds", "tok/s", "speedup", "acceptance", "mean accepted len",
                 "identical"],
                [["plain greedy", r["baseline_tokens"], f"{r['baseline_s']:.1f}", tps(r["baseline_tps"]),
                  "1.00x", "", "", ""],
                 [r["spec"], r["spec_tokens"], f"{r['spec_s']:.1f}", tps(r["spec_tps"]), f"{r['speedup']:.2f}x",
                  f"{r['acceptance_rate']:.1%}", f"{r['mean_accepted_len']:.2f}",
                  f"{r['num_identical']}/{r['num_prompts']}"]],
                caption=f"{r['drafted']} drafted, {r['accepted']} accepted, {r['verifications']} verifications, "
                        f"{r['target_forwards']} target forwards (speculating half); CPU-time speedup "
                        f"{r['speedup_cpu']:.2f}x ({r['baseline_cpu_s']:.1f} vs {r['spec_cpu_s']:.1f} CPU s); "
                        f"batch {r['batch']}, drafting off in {r['off_batch_steps']} steps (batch > "
                        f"{r['spec_max_batch']}) and {r['off_cost_steps']} (cost model); choices "
                        f"{_top(r['choices'])}; cost model: β {r['token_cost']:.3f}"
                        + (f", draft step {r['draft_cost']:.2f} of a target step" if r["draft_cost"] else ""))
    if args.json:
        write_json(args.json, r)
    return 0
