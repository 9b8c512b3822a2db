"""Registers `leanlm eval ...` and `leanlm bench ...` (filled in by the bench modules)."""
from __future__ import annotations


def register(sub, add_model_args) -> None:
    from leanlm.bench import latency, perplexity, serve_load, spec, throughput

    p = sub.add_parser("eval", help="quality: perplexity (more evals to come)",
                       description="Measure model quality on local evaluation data.")
    evals = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    perplexity.add_parser(evals, add_model_args)

    p = sub.add_parser("bench", help="speed: latency rows, offline throughput, serving load; peers side by side",
                       description="Measure speed; compare with a peer engine in the same process.")
    benches = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    latency.add_parser(benches, add_model_args)
    throughput.add_parser(benches, add_model_args)
    serve_load.add_parser(benches)
    spec.add_parser(benches, add_model_args)
