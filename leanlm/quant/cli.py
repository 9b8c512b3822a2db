"""`leanlm quantize [MODEL] --quant gptq:int4:g128 [--calib FILE] -o DIR`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CALIB_FILE = "sharegpt_v3_filtered_500_prompts.jsonl"


def load_calibration(tokenizer, path: str | None = None, num_sequences: int = 128, seq_len: int = 512,
                     seed: int = 0) -> list[list[int]]:
    """`num_sequences` windows of `seq_len` tokens, at seeded random offsets into the calibration
    text (ShareGPT prompts by default, never the evaluation text): a jsonl file's "prompt" / "text"
    fields or a plain text file, tokenized and joined with EOS."""
    import random

    from leanlm.bench.data import find_data_file, read_text

    source = Path(path) if path else find_data_file(CALIB_FILE)
    if not source.is_file():
        raise ValueError(f"calibration file {str(source)!r} does not exist")
    raw = read_text(source)
    if source.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{source}:{n} is not valid JSON") from None
                texts.append(str(row.get("prompt") or row.get("text") or ""))
    else:
        texts = [raw]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in texts:
        stream += tokenizer.encode(t) + ([eos] if eos is not None else [])
    if len(stream) < seq_len + 1:
        raise ValueError(f"calibration text {source} has {len(stream)} tokens, fewer than one "
                         f"{seq_len}-token sequence")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(stream) - seq_len) for _ in range(num_sequences)]
    return [stream[s:s + seq_len] for s in starts]


def register(sub, add_model_args) -> None:
    p = sub.add_parser("quantize", help="quantize a model (RTN or GPTQ) and save a quantized checkpoint",
                       description="Quantize the decoder's linear layers and write a checkpoint that "
                                   "`leanlm generate --model DIR` and LLM(DIR) load with no extra flags.")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", default=None, help="same as --model")
    add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--calib", default=None, help=f"calibration text or jsonl (default: {CALIB_FILE})")
    p.add_argument("--calib-sequences", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from leanlm.cli import load_llm
    from leanlm.quant.checkpoint import save_quantized
    from leanlm.quant.model_quantizer import quantize_model
    from leanlm.quant.spec import QuantSpec

    if not args.quant:
        raise ValueError("--quant SPEC is required, e.g. gptq:int4:g128 or rtn:int8")
    spec = QuantSpec.parse(args.quant)
    for name in ("calib_sequences", "calib_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"output directory {str(out)!r} exists and is not empty; pass --overwrite")
    llm = load_llm(args, quant=None, quant_head=False, compile=False)  # the float model; --quant is applied here
    calib = None
    if spec.algorithm == "gptq":
        calib = load_calibration(llm.get_tokenizer(), args.calib, args.calib_sequences, args.calib_len, args.seed)
    from tqdm import tqdm

    bar = tqdm(total=llm.engine.model_config.num_layers, desc=f"quantizing {spec}", unit="layer")

    def progress(message: str) -> None:
        bar.set_postfix_str(message.split("(")[-1].rstrip(")"))
        bar.update(1)

    t0 = time.perf_counter()
    try:
        stats = quantize_model(llm.engine.model, spec, calib, progress, quant_head=args.quant_head)
    finally:
        bar.close()
    save_quantized(llm.engine.model, llm.engine.model_path, out, spec, overwrite=args.overwrite,
                   extra={"calibration": {"file": args.calib or CALIB_FILE, "sequences": args.calib_sequences,
                                          "seq_len": args.calib_len} if calib else None,
                          "seconds": stats["seconds"]})
    print(f"[leanlm] quantized {llm.engine.model_path} with {spec} in {time.perf_counter() - t0:.0f}s "
          f"-> {out}", file=sys.stderr)
    return 0
