"""Format names -> WeightFormat instances (the FORMAT part of a `--quant` spec)."""
from __future__ import annotations

from leanlm.formats import microscaling, minifloat
from leanlm.formats.base import WeightFormat
from leanlm.formats.bfp import BFPFormat
from leanlm.formats.intq import IntFormat
from leanlm.formats.ternary import TernaryFormat

INT_NAMES = ("int8", "int8-asym", "int4", "int4-sym", "int3", "int3-sym", "int2", "int2-sym")
OTHER_NAMES = ("ternary", "ternary-b3", "bfp8", "bfp6", "bfp4")


def format_names() -> tuple[str, ...]:
    return (*INT_NAMES, *minifloat.FORMAT_NAMES, *microscaling.FORMAT_NAMES, *OTHER_NAMES)


def get_format(name: str) -> WeightFormat:
    """The format named `name` (see `format_names()`), or a ValueError listing them."""
    if name in INT_NAMES:
        return IntFormat.from_name(name)
    if name in minifloat.FORMAT_NAMES:
        return minifloat.make_format(name)
    if name in microscaling.FORMAT_NAMES:
        return microscaling.make_format(name)
    if name in ("ternary", "ternary-b3"):
        return TernaryFormat(base3=name == "ternary-b3")
    if name.startswith("bfp") and name in OTHER_NAMES:
        return BFPFormat(int(name[3:]))
    raise ValueError(f"unknown number format {name!r}; allowed: {', '.join(format_names())}")
