"""The `leanlm` command. Subcommands register themselves: each module adds its parser and
names the function that runs it, so this file stays a table of contents."""
from __future__ import annotations

import argparse
import sys
import time


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF checkpoint dir, .gguf file, or 'smollm2-135m' (default: the embedded model)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="engine seed for unseeded sampling")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward pass (faster decode, slow first call)")
    p.add_argument("--quant", default=None, metavar="SPEC",
                   help="weight quantization applied at load time: rtn:FORMAT[:gGROUP], e.g. rtn:int8, "
                        "rtn:int4:g32, rtn:nvfp4 (formats: int8/4/3/2, nf4, fp8/6/4, mxfp*, nvfp4, ternary, bfp*)")
    p.add_argument("--quant-head", action="store_true",
                   help="with --quant: quantize the LM head too (default: it stays in the compute dtype)")
    p.add_argument("--kv", default=None, metavar="SPEC",
                   help="KV cache codec: fp16, bf16, fp32, fp8:e4m3, fp8:e5m2, "
                        "kivi:BITS[:gG][:rR][:sinkS][:vVBITS][:cC][:s8][:prerope][:rotate][:ktok|:knorm][:kmix] "
                        "(8/4/3/2 bits; with kmix BITS is the average key bits), "
                        "bfp:MANTISSA[:bBLOCK][:reorder], "
                        "xquant:BITS[:gG][:cl], minicache[:START][:T][:GAMMA][+INNER], "
                        "stream:WINDOW[:sinkS][+INNER] (evicts blocks outside the first S tokens and the "
                        "last WINDOW: a sequence holds at most S + WINDOW + one block) "
                        "(default: the compute dtype; 4x smaller than bf16 at +1.2%% perplexity on SmolLM2: "
                        "kivi:3.5:g128:v4:c64:s8:prerope:rotate:kmix)")
    p.add_argument("--spec", default=None, metavar="SPEC",
                   help="speculative decoding: ngram[:n=N][:k=K], early-exit:E|auto[:k=K][:conf=C], "
                        "draft:MODEL[:k=K][:conf=C], self:QUANT[:k=K][:conf=C][:head=quant|shared] "
                        "(lossless: greedy output is unchanged; fastest on MT-Bench here: "
                        "self:rtn:int8:k=5:head=quant)")
    p.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="KV cache budget: a size (2GiB, 512MiB) or a fraction of free memory (0.3); "
                        "default: min(4GiB, 40%% of available memory)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")


def sampling_from_args(args, **extra):
    from leanlm import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.sample_seed, **extra)


def resolve_model_arg(args) -> str | None:
    """The model of a command with an optional positional MODEL as well as --model."""
    pos = getattr(args, "model_pos", None)
    if pos and args.model and pos != args.model:
        raise ValueError(f"two models given: {pos!r} and --model {args.model!r}; give one")
    return pos or args.model


def load_llm(args, **overrides):
    """The LLM the model flags describe; `overrides` replace or add engine options."""
    from leanlm import LLM

    options = dict(model=resolve_model_arg(args), dtype=args.dtype, device=args.device, seed=args.seed,
                   compile=getattr(args, "compile", False),
                   kv_cache_memory=getattr(args, "kv_cache_memory", None), quant=getattr(args, "quant", None),
                   quant_head=getattr(args, "quant_head", False),
                   kv=getattr(args, "kv", None), spec=getattr(args, "spec", None))
    options.update(overrides)
    t0 = time.perf_counter()
    llm = LLM(**options)
    print(f"[leanlm] loaded {llm.engine.model_path} ({llm.engine.config.torch_dtype}, "
          f"{llm.engine.config.torch_device}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return llm


def stream_reply(llm, prompt_ids: list[int], params) -> tuple[str, dict]:
    """Stream one reply to stdout; return its text and speed figures."""
    t0 = time.perf_counter()
    first = None
    text, n_out = "", 0
    for out in llm.stream(prompt_ids, params):
        if first is None:
            first = time.perf_counter()
        delta = out.deltas.get(0, "")
        text += delta
        print(delta, end="", flush=True)
        n_out = len(out.outputs[0].token_ids)
    end = time.perf_counter()
    print()
    first = first or end
    stats = {"prompt_tokens": len(prompt_ids), "output_tokens": n_out,
             "prompt_tps": len(prompt_ids) / max(first - t0, 1e-9),
             "gen_tps": (n_out - 1) / (end - first) if n_out > 1 else 0.0,
             "ttft_ms": (first - t0) * 1e3}
    return text, stats


def print_speed(stats: dict) -> None:
    print(f"[leanlm] prompt: {stats['prompt_tokens']} tokens at {stats['prompt_tps']:.1f} tok/s "
          f"(TTFT {stats['ttft_ms']:.0f} ms) | generation: {stats['output_tokens']} tokens at "
          f"{stats['gen_tps']:.1f} tok/s", file=sys.stderr)


def cmd_generate(args) -> int:
    llm = load_llm(args)
    params = sampling_from_args(args)
    tok = llm.get_tokenizer()
    if args.chat:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
        print(args.prompt, end="", flush=True)
    _, stats = stream_reply(llm, ids, params)
    print_speed(stats)
    return 0


def cmd_chat(args) -> int:
    llm = load_llm(args)
    params = sampling_from_args(args)
    tok = llm.get_tokenizer()
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("[leanlm] chat: type a message; /reset clears history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode_chat(history)
        if len(ids) >= llm.engine.max_model_len - 1:
            print("[leanlm] conversation is longer than the context; /reset to start over", file=sys.stderr)
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        text, stats = stream_reply(llm, ids, params)
        history.append({"role": "assistant", "content": text})
        if args.verbose:
            print_speed(stats)


def cmd_models(args) -> int:
    from leanlm.models import embedded
    from leanlm.models.model_config import SUPPORTED_ARCHITECTURES

    print(f"embedded model: {embedded.EMBEDDED_ALIAS}")
    try:
        print(f"  GGUF file:    {embedded.embedded_gguf_path()}")
    except ValueError as e:
        print(f"  GGUF file:    missing ({e})")
    print(f"cache folder:   {embedded.cache_root()}  (set LEANLM_CACHE to move it)")
    root = embedded.cache_root()
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            print(f"  {d.name}  ({size / 2**20:.0f} MiB)")
    print(f"architectures:  {', '.join(SUPPORTED_ARCHITECTURES)}")
    print("models load from: a HF checkpoint directory (safetensors), a .gguf file, or the alias above")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanlm", description="A lean LLM inference engine and efficiency lab.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate a continuation or a chat reply, streamed",
                       description="Generate text for one prompt and print the speed.")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with streaming output and history")
    p.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    p.add_argument("--verbose", action="store_true", help="print speed after each reply")
    add_model_args(p)
    add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("models", help="show the embedded model, the cache and supported architectures")
    p.set_defaults(func=cmd_models)

    from leanlm.quant import cli as quant_cli

    quant_cli.register(sub, add_model_args)
    from leanlm.bench import cli as bench_cli

    bench_cli.register(sub, add_model_args)
    from leanlm.serve import cli as serve_cli

    serve_cli.register(sub, add_model_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as e:  # bad input: a clear message, not a traceback
        print(f"leanlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
