"""Weight-quantization specs, llama.cpp-style short strings: `ALGO:FORMAT[:gGROUP][:rotate][:act-order]`.

    rtn:int8            round-to-nearest INT8, per output channel
    gptq:int4:g128      GPTQ INT4, groups of 128 input features
    gptq:mxfp4:rotate   GPTQ MXFP4 (blocks of 32) on Walsh-Hadamard-rotated weights
    gptq:mxfp4:rotate32 the same with Hadamard blocks of 32 (16/32/64/128...; plain `rotate`:
                        128, or the largest power of two dividing the input features)
    gptq:int4:g128:act-order

A spec round-trips: `str(QuantSpec.parse(s)) == canonical(s)`, and that string appears in every
report and in a quantized checkpoint's json.
"""
from __future__ import annotations

from dataclasses import dataclass

ALGORITHMS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantSpec:
    algorithm: str
    format: str
    group_size: int | None = None   # None: the format's default (per-channel, or its block)
    rotate: bool = False
    act_order: bool = False
    rotate_block: int | None = None  # None: the default block (see quant/rotation.pick_block)

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        from leanlm.formats.registry import format_names

        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"quant spec must be a string like 'gptq:int4:g128', got {text!r}")
        parts = text.strip().lower().split(":")
        if len(parts) < 2:
            raise ValueError(f"quant spec {text!r} needs ALGO:FORMAT (e.g. rtn:int8, gptq:int4:g128)")
        algo, fmt, options = parts[0], parts[1], parts[2:]
        if algo not in ALGORITHMS:
            raise ValueError(f"quant algorithm {algo!r} in {text!r} is not one of {', '.join(ALGORITHMS)}")
        if fmt not in format_names():
            raise ValueError(f"number format {fmt!r} in {text!r} is not known; allowed: "
                             f"{', '.join(format_names())}")
        group, rotate, act_order, block = None, False, False, None
        for opt in options:
            if opt.startswith("g") and opt[1:].isdigit() and int(opt[1:]) > 0:
                if group is not None:
                    raise ValueError(f"quant spec {text!r} gives the group size twice")
                group = int(opt[1:])
            elif opt == "rotate":
                rotate = True
            elif opt.startswith("rotate") and opt[6:].isdigit():
                from leanlm.quant.rotation import MIN_BLOCK, is_power_of_two

                block = int(opt[6:])
                if not is_power_of_two(block) or block < MIN_BLOCK:
                    raise ValueError(f"Hadamard block {block} in {text!r} must be a power of two >= {MIN_BLOCK}")
                rotate = True
            elif opt in ("act-order", "actorder", "desc-act"):
                act_order = True
            else:
                raise ValueError(f"unknown quant option {opt!r} in {text!r}; allowed: gN (group size), "
                                 f"rotate or rotateN (Hadamard block N), act-order")
        if act_order and algo != "gptq":
            raise ValueError(f"act-order applies to gptq only, not {algo!r} (in {text!r})")
        return cls(algo, fmt, group, rotate, act_order, block)

    def __str__(self) -> str:
        parts = [self.algorithm, self.format]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if self.rotate:
            parts.append("rotate" if self.rotate_block is None else f"rotate{self.rotate_block}")
        if self.act_order:
            parts.append("act-order")
        return ":".join(parts)
