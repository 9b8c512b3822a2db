"""`--spec SPEC` / `LLM(spec=...)`: which proposer drafts tokens, parsed once, round-tripping to
its canonical string (the string every report prints).

    ngram[:n=N][:k=K]          prompt lookup: the last N tokens matched earlier in the sequence
    early-exit:E[:k=K][:conf=C]      the target's first E layers + final norm + LM head
    early-exit:auto[:k=K][:conf=C]   DEL: exit layer and draft length (<= K) chosen as it runs
    draft:MODEL[:k=K][:conf=C] a separate model with the target's tokenizer
    self:QUANT[:k=K][:conf=C][:head=quant|shared]  the target itself, quantized (e.g.
                               self:rtn:int4:g32); head=quant quantizes its LM head too (a
                               quarter of a float32 step's bytes), shared (default) drafts with
                               the target's own head

conf=C (model drafters): a sequence stops drafting after a token whose draft probability is under
C. Default 0 (off: always k drafts) for the fixed drafters, 0.3 for early-exit:auto, whose cost
model counts on dropping drafts that are unlikely to be accepted.
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("ngram", "early-exit", "draft", "self")
DEFAULT_K = {"ngram": 8, "early-exit": 4, "draft": 5, "self": 4}
AUTO_K = 6          # early-exit:auto: the most it may draft (it picks k <= this each step)
DEFAULT_CONF = 0.0  # fixed model drafters: no confidence stop
AUTO_CONF = 0.3
DEFAULT_NGRAM_N = 3
MAX_K = 32
OPTIONS = {"ngram": ("k", "n"), "self": ("k", "conf", "head")}  # name=value options; others: k, conf
FORMS = ("ngram[:n=N][:k=K], early-exit:E|auto[:k=K][:conf=C], draft:MODEL[:k=K][:conf=C], "
         "self:QUANT[:k=K][:conf=C][:head=quant|shared] (e.g. ngram:n=3:k=8, early-exit:8, early-exit:auto, "
         "draft:/path/to/model:k=5, self:rtn:int4:g32:conf=0.4)")


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"spec {spec!r}: {why}; allowed forms: {FORMS}")


def _int_option(spec: str, name: str, value: str, low: int, high: int) -> int:
    if not value.isdigit() or not low <= int(value) <= high:
        raise _bad(spec, f"{name}={value!r} must be an integer in [{low}, {high}]")
    return int(value)


def _conf_option(spec: str, value: str) -> float:
    try:
        conf = float(value)
    except ValueError:
        conf = -1.0
    if not 0.0 <= conf < 1.0:
        raise _bad(spec, f"conf={value!r} must be a probability in [0, 1)")
    return conf


@dataclass(frozen=True)
class SpecConfig:
    kind: str                    # one of KINDS
    k: int                       # most draft tokens per step
    n: int = DEFAULT_NGRAM_N     # ngram: tokens matched
    exit_layer: int = 0          # early-exit: layers the draft runs; 0: auto (DEL)
    target: str = ""             # draft: the model; self: the quant spec
    conf: float = 0.0            # model drafters: confidence under which drafting stops
    quant_head: bool = False     # self: the draft's LM head quantized too (else the target's)

    @property
    def auto(self) -> bool:
        return self.kind == "early-exit" and self.exit_layer == 0

    @classmethod
    def parse(cls, spec: "str | SpecConfig") -> "SpecConfig":
        if isinstance(spec, SpecConfig):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise _bad(str(spec), "empty or not a string")
        text = spec.strip()
        kind, _, rest = text.partition(":")
        if kind not in KINDS:
            raise _bad(spec, f"unknown proposer {kind!r} (known: {', '.join(KINDS)})")
        parts = rest.split(":") if rest else []
        # k= (and n=) options come last; everything before them is the proposer's argument,
        # which may itself hold colons (a quant spec, a path)
        options: dict[str, str] = {}
        while parts and "=" in parts[-1]:
            name, _, value = parts.pop().partition("=")
            if name in options or name not in OPTIONS.get(kind, ("k", "conf")):
                raise _bad(spec, f"option {name!r} is not allowed here or repeated")
            options[name] = value
        arg = ":".join(parts)
        auto = kind == "early-exit" and arg == "auto"
        k = _int_option(spec, "k", options["k"], 1, MAX_K) if "k" in options else \
            AUTO_K if auto else DEFAULT_K[kind]
        conf = _conf_option(spec, options["conf"]) if "conf" in options else \
            AUTO_CONF if auto else DEFAULT_CONF
        if kind == "ngram":
            if arg:
                raise _bad(spec, f"ngram takes only n= and k= options, got {arg!r}")
            n = _int_option(spec, "n", options["n"], 1, 64) if "n" in options else DEFAULT_NGRAM_N
            return cls("ngram", k, n=n)
        if not arg:
            raise _bad(spec, f"{kind} needs an argument")
        if kind == "early-exit":
            layer = 0 if auto else _int_option(spec, "exit layer", arg, 1, 10_000)
            return cls(kind, k, exit_layer=layer, conf=conf)
        if kind == "self":
            from leanlm.quant.spec import QuantSpec

            try:
                arg = str(QuantSpec.parse(arg))
            except ValueError as e:
                raise _bad(spec, f"bad quant spec ({e})") from None
        head = options.get("head", "shared")
        if head not in ("quant", "shared"):
            raise _bad(spec, f"head={head!r} must be 'quant' or 'shared'")
        return cls(kind, k, target=arg, conf=conf, quant_head=head == "quant")

    def __str__(self) -> str:
        if self.kind == "ngram":
            return f"ngram:n={self.n}:k={self.k}"
        arg = ("auto" if self.auto else self.exit_layer) if self.kind == "early-exit" else self.target
        default = AUTO_CONF if self.auto else DEFAULT_CONF
        return (f"{self.kind}:{arg}:k={self.k}" + (f":conf={self.conf:g}" if self.conf != default else "")
                + (":head=quant" if self.quant_head else ""))
