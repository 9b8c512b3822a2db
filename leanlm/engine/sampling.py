"""Sampling parameters and the batched sampler.

Each step the engine passes the last-position logits of every running sequence, one
`SamplingState` per row. The sampler applies, per row: repetition penalty (HF style),
presence / frequency penalties (OpenAI style), the min_tokens EOS block, temperature,
top-k, top-p and min-p, then draws one token. Work is vectorised over rows with
per-row parameter tensors; randomness comes from each seeded row's own generator so a
seeded request gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

MAX_LOGPROBS = 20
_GREEDY_TEMPERATURE = 1e-5
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
_TOP_P_HEAD = 1024  # top-p looks for its set among this many tokens before a full sort


# --------------------------------------------------------------------------- params


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _reject(name: str, value, allowed: str):
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass
class SamplingParams:
    """How to sample one request (names and defaults as vLLM's SamplingParams)."""

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16  # None = until the context limit
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top-n alternatives per generated token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            _reject("n", self.n, "an integer >= 1")
        if not _is_real(self.temperature) or self.temperature < 0:
            _reject("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < -1:
            _reject("top_k", self.top_k, "an integer >= 1, or 0 / -1 for no top-k")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            _reject("top_p", self.top_p, "in (0, 1]")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            _reject("min_p", self.min_p, "in [0, 1]")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            _reject("repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not -2 <= value <= 2:
                _reject(name, value, "in [-2, 2]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            _reject("max_tokens", self.max_tokens, "an integer >= 1, or None")
        upper = "" if self.max_tokens is None else f" and <= max_tokens ({self.max_tokens})"
        if (not _is_int(self.min_tokens) or self.min_tokens < 0
                or (self.max_tokens is not None and self.min_tokens > self.max_tokens)):
            _reject("min_tokens", self.min_tokens, f"an integer >= 0{upper}")
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                _reject(name, getattr(self, name), "a bool")
        if self.seed is not None and (
                not _is_int(self.seed) or not _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]):
            low, high = _SEED_RANGE
            _reject("seed", self.seed, f"None or an integer in [{low}, {high}]")
        if self.logprobs is not None and (
                not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            _reject("logprobs", self.logprobs, f"None or an integer in [0, {MAX_LOGPROBS}]")

    @staticmethod
    def _normalise_stop(stop) -> list[str]:
        if stop is None:
            return []
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
            _reject("stop", stop, "a non-empty string or a list of non-empty strings")
        return list(items)

    @staticmethod
    def _normalise_stop_token_ids(ids) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            _reject("stop_token_ids", ids, "a list of integers >= 0")
        return list(ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE


# --------------------------------------------------------------------------- state


class SamplingState:
    """What the sampler needs to know about one running sequence.

    Penalty history lives in dense [V] tensors on the logits' device, built at the first
    sampled step; `append` only queues the id in Python and the sampler folds the queue in
    with one scatter, so per-step cost does not grow with the sequence length.
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int],
                 default_generator: torch.Generator | None = None,
                 eos_token_ids: Iterable[int] = (), seed: int | None = None) -> None:
        self.params = params
        self.eos_token_ids = tuple(eos_token_ids)
        self.num_output_tokens = 0
        self._seed = seed
        self._generator = None if seed is not None else default_generator
        p = params
        self._uses_repetition = p.repetition_penalty != 1.0
        self._uses_counts = p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        # a copy: the caller's list may grow with outputs before the first sample
        self._prompt_ids = list(prompt_token_ids) if self._uses_repetition else []
        self._queued: list[int] = []  # output ids not yet folded into the tensors below
        self._seen: torch.Tensor | None = None  # bool [V]: prompt or output token
        self._counts: torch.Tensor | None = None  # float [V]: output occurrences

    @classmethod
    def create(cls, params: SamplingParams, prompt_token_ids: Sequence[int],
               default_generator: torch.Generator | None = None,
               eos_token_id: int | Iterable[int] | None = None,
               sample_index: int = 0) -> "SamplingState":
        """`default_generator` serves unseeded requests (None: torch's global RNG).
        `eos_token_id` may be one id or several (e.g. Llama 3). With `seed` set, the
        `sample_index`-th of a request's n samples is seeded with seed + sample_index
        (as vLLM does), so the n samples differ yet each is reproducible."""
        if eos_token_id is None:
            eos = ()
        elif isinstance(eos_token_id, int):
            eos = (eos_token_id,)
        else:
            eos = tuple(eos_token_id)
        seed = None if params.seed is None else params.seed + sample_index
        return cls(params, prompt_token_ids, default_generator, eos, seed)

    @property
    def uses_penalties(self) -> bool:
        return self._uses_repetition or self._uses_counts

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end the sequence when sampled: EOS (unless ignore_eos) and stop_token_ids."""
        eos = () if self.params.ignore_eos else self.eos_token_ids
        return frozenset(eos) | frozenset(self.params.stop_token_ids)

    @property
    def min_tokens_blocked(self) -> bool:
        return self.num_output_tokens < self.params.min_tokens

    def append(self, token_id: int) -> None:
        """Record one generated token (call once per accepted output token)."""
        self.num_output_tokens += 1
        if self.uses_penalties:
            self._queued.append(token_id)

    @property
    def needs_positions(self) -> bool:
        """Does the processing of a token depend on the output tokens before it (penalties, a
        pending min_tokens block)? Then each speculative position needs its own state (`ahead`)."""
        return self.uses_penalties or self.min_tokens_blocked

    def ahead(self, tokens: Sequence[int]) -> "SamplingState | LookaheadState":
        """This state as it will be once `tokens` more are output, without changing it: what the
        sampler processes a speculative position with (itself when nothing depends on them)."""
        return LookaheadState(self, tokens) if tokens and self.needs_positions else self

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The generator for this row; a seeded one is created on first use on `device`."""
        if self._seed is not None and self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
        return self._generator

    def penalty_tensors(self, vocab_size: int, device: torch.device):
        """(seen [V] bool or None, counts [V] float or None), up to date with `append`."""
        # normal tensors even when first asked inside inference mode (a speculative drafter's
        # pass): the sampler updates them in place outside it
        with torch.inference_mode(False):
            return self._penalty_tensors(vocab_size, device)

    def _penalty_tensors(self, vocab_size: int, device: torch.device):
        if self._seen is None and self._counts is None:
            if self._uses_repetition:
                self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
                prompt = torch.tensor(self._prompt_ids, dtype=torch.long)
                self._seen[prompt.to(device)] = True
                self._prompt_ids = []  # now held by the mask
            if self._uses_counts:
                self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if self._queued:
            ids = torch.tensor(self._queued, dtype=torch.long).to(device)
            if self._seen is not None:
                self._seen[ids] = True
            if self._counts is not None:
                self._counts.index_add_(0, ids, torch.ones(len(self._queued), device=device))
            self._queued.clear()
        return self._seen, self._counts


class LookaheadState:
    """Read-only view of a SamplingState after `tokens` more outputs (drafts not yet accepted):
    the penalties count them and the min_tokens block counts them, exactly as the state will
    once they are appended, so draft position j is processed as plain decoding would process
    it. Randomness stays the base state's generator."""

    def __init__(self, base: SamplingState, tokens: Sequence[int]) -> None:
        self.base, self.tokens = base, list(tokens)
        self.params, self.eos_token_ids = base.params, base.eos_token_ids
        self.num_output_tokens = base.num_output_tokens + len(self.tokens)
        self._tensors = None

    # the same rules as the base state's, read from this view's params and output count
    stop_token_ids = SamplingState.stop_token_ids
    min_tokens_blocked = SamplingState.min_tokens_blocked
    needs_positions = SamplingState.needs_positions

    @property
    def uses_penalties(self) -> bool:
        return self.base.uses_penalties

    def generator(self, device: torch.device) -> torch.Generator | None:
        return self.base.generator(device)

    def penalty_tensors(self, vocab_size: int, device: torch.device):
        """The base state's (seen, counts) with `tokens` added, on copies."""
        if self._tensors is None:
            seen, counts = self.base.penalty_tensors(vocab_size, device)
            ids = torch.tensor(self.tokens, dtype=torch.long).to(device)
            if seen is not None:
                seen = seen.clone()
                seen[ids] = True
            if counts is not None:
                counts = counts.clone().index_add_(0, ids, torch.ones(len(self.tokens), device=device))
            self._tensors = seen, counts
        return self._tensors


def position_states(state: SamplingState, draft: Sequence[int]) -> list:
    """The states of the k + 1 positions a draft of k tokens is verified at: position j follows
    the state's outputs and draft[:j]."""
    return [state.ahead(draft[:j]) for j in range(len(draft) + 1)]


# --------------------------------------------------------------------------- sampler


@dataclass
class SampleResult:
    """One sampled token per row. The logprob fields are None when no row asked for
    logprobs; otherwise they hold one entry per row (None for rows that did not ask)."""

    token_ids: list[int]
    logprobs: list[float | None] | None = None  # the sampled token's logprob
    top_logprobs: list[list[tuple[int, float]] | None] | None = None  # sorted, best first


class Sampler:
    """Stateless batched sampler: `sample(logits [B, V], states) -> SampleResult`."""

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SampleResult:
        raw = self._check(logits, states)
        processed = self._penalise(raw, states)
        token_ids = torch.empty(len(states), dtype=torch.long, device=raw.device)
        greedy = [i for i, s in enumerate(states) if s.params.greedy]
        rand = [i for i, s in enumerate(states) if not s.params.greedy]
        if greedy:
            # max(dim).indices is argmax (first maximum on ties) at ~2.5x its speed on CPU
            _put_rows(token_ids, greedy, _take_rows(processed, greedy).max(dim=-1).indices)
        if rand:
            rand_states = [states[i] for i in rand]
            probs = self._filter(_take_rows(processed, rand), rand_states)
            _put_rows(token_ids, rand, _exponential_race(probs, rand_states))
        return _to_host(raw, token_ids, states)

    def processed(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Logits [B, V] after the penalties and the min_tokens block (float32; the input itself
        when no row has either): greedy picks the argmax of these."""
        return self._penalise(self._check(logits, states), states)

    def filtered_probs(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """The distribution `sample` draws from, [B, V] float32: one-hot at the argmax for
        greedy rows (for rejection sampling and tests)."""
        raw = self._check(logits, states)
        processed = self._penalise(raw, states)
        probs = self._filter(processed, states)
        greedy = [i for i, s in enumerate(states) if s.params.greedy]
        if greedy:
            onehot = torch.zeros_like(probs[greedy])
            onehot.scatter_(1, processed[greedy].argmax(dim=-1, keepdim=True), 1.0)
            probs[greedy] = onehot
        return probs

    @staticmethod
    def _check(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits must be [batch={len(states)}, vocab], got {tuple(logits.shape)}")
        return logits.float()

    @staticmethod
    def _penalise(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Penalties and the min_tokens block, on a copy (logprobs need the raw logits)."""
        penalised = [i for i, s in enumerate(states) if s.uses_penalties]
        blocked = [(i, t) for i, s in enumerate(states) if s.min_tokens_blocked
                   for t in s.stop_token_ids]
        if not penalised and not blocked:
            return logits
        out = logits.clone()
        vocab, device = out.shape[1], out.device
        tensors = {i: states[i].penalty_tensors(vocab, device) for i in penalised}
        rep = [i for i in penalised if tensors[i][0] is not None]
        if rep:
            seen = torch.stack([tensors[i][0] for i in rep])
            r = _column([states[i].params.repetition_penalty for i in rep], device)
            rows = out[rep]
            # HF: a seen token's positive logit is divided, a negative one multiplied.
            out[rep] = torch.where(seen, torch.where(rows > 0, rows / r, rows * r), rows)
        counted = [i for i in penalised if tensors[i][1] is not None]
        if counted:
            counts = torch.stack([tensors[i][1] for i in counted])
            freq = _column([states[i].params.frequency_penalty for i in counted], device)
            pres = _column([states[i].params.presence_penalty for i in counted], device)
            out[counted] = out[counted] - freq * counts - pres * (counts > 0).float()
        if blocked:
            rows, cols = zip(*blocked)
            out[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = -math.inf
        return out

    @staticmethod
    def _filter(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p -> probabilities [R, V] (float32)."""
        device, vocab = logits.device, logits.shape[1]
        params = [s.params for s in states]
        # greedy rows only reach here from filtered_probs; temperature 1 keeps them finite
        temps = _column([1.0 if p.greedy else p.temperature for p in params], device)
        logits = logits / temps
        if any(p.top_k > 0 for p in params):
            logits = _top_k(logits, [min(p.top_k, vocab) if p.top_k > 0 else 0 for p in params])
        nucleus = [i for i, p in enumerate(params) if p.top_p < 1]
        if nucleus:
            logits[nucleus] = _top_p(logits[nucleus], [params[i].top_p for i in nucleus])
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = _column([p.min_p for p in params], device)
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(device).unsqueeze(1)


def _take_rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return t if len(rows) == t.shape[0] else t[rows]


def _put_rows(t: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    if len(rows) == t.shape[0]:
        t.copy_(values)
    else:
        t[rows] = values


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Keep logits >= each row's k-th largest (ties at the k-th value all stay); k=0: off."""
    k_max = max(ks)
    kth = logits.topk(k_max, dim=-1).values
    index = torch.tensor([max(k, 1) - 1 for k in ks], device=logits.device).unsqueeze(1)
    threshold = kth.gather(1, index)
    off = torch.tensor([k == 0 for k in ks], device=logits.device).unsqueeze(1)
    threshold = threshold.masked_fill(off, -math.inf)
    return logits.masked_fill(logits < threshold, -math.inf)


def _top_p(logits: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """Keep the smallest most-likely set whose mass reaches p (the top token always stays).

    On CPU a full sort of a 50k vocabulary costs ~2.5 ms a row and a top-1024 ~0.4 ms, so
    rows first look for their set in the top tokens and only rows whose set is larger
    are fully sorted. Choosing rows is a host sync: only the CPU gets it for free."""
    probs = logits.softmax(dim=-1)
    p = torch.tensor(ps, dtype=torch.float32, device=logits.device).unsqueeze(1)
    unsorted = list(range(len(ps)))
    if probs.device.type == "cpu" and _TOP_P_HEAD < probs.shape[1]:
        head, order = probs.topk(_TOP_P_HEAD, dim=-1)
        keep = _nucleus_mask(probs, head, order, p)
        unsorted = [i for i, ok in enumerate((head.sum(dim=-1) >= p[:, 0]).tolist()) if not ok]
    if len(unsorted) == len(ps):
        keep = _nucleus_mask(probs, *probs.sort(dim=-1, descending=True), p)
    elif unsorted:
        rows = probs[unsorted]
        keep[unsorted] = _nucleus_mask(rows, *rows.sort(dim=-1, descending=True), p[unsorted])
    return logits.masked_fill(~keep, -math.inf)


def _nucleus_mask(probs: torch.Tensor, sorted_probs: torch.Tensor, order: torch.Tensor,
                  p: torch.Tensor) -> torch.Tensor:
    """Bool [R, V]: tokens whose more-likely predecessors hold less than p; `sorted_probs`
    is `probs` sorted high to low (maybe only its head; tokens past it are dropped)."""
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # exactly 0 for the top token
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, mass_before < p)


def _exponential_race(probs: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """argmax(p / q) with q i.i.d. Exp(1) picks token i with probability p_i. Each seeded
    row draws from its own generator; rows sharing one generator draw in one call."""
    u = torch.empty_like(probs)
    groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
    for row, state in enumerate(states):
        gen = state.generator(probs.device)
        groups.setdefault(id(gen), (gen, []))[1].append(row)
    for gen, rows in groups.values():
        if len(rows) == len(states):
            u.uniform_(generator=gen)
        elif len(rows) == 1:
            u[rows[0]].uniform_(generator=gen)
        else:
            u[rows] = torch.empty(len(rows), u.shape[1], device=u.device).uniform_(generator=gen)
    # -log(u) ~ Exp(1), and is ~6x faster than exponential_ on CPU; the clamp keeps
    # q > 0, as q == 0 would make 0/0 = nan, which argmax would pick
    q = u.log_().neg_().clamp_min_(torch.finfo(u.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def _to_host(raw: torch.Tensor, token_ids: torch.Tensor,
             states: Sequence[SamplingState]) -> SampleResult:
    """Copy tokens (and logprobs) to the host in a single transfer."""
    asked = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not asked:
        return SampleResult(token_ids=token_ids.tolist())
    logprobs = torch.log_softmax(raw[asked], dim=-1)
    chosen = logprobs.gather(1, token_ids[asked].unsqueeze(1)).squeeze(1)
    n_max = min(max(states[i].params.logprobs for i in asked), raw.shape[1])
    parts = [token_ids.double(), chosen.double()]
    if n_max:
        top_values, top_ids = logprobs.topk(n_max, dim=-1)
        parts += [top_values.double().flatten(), top_ids.double().flatten()]
    # one float64 buffer: token ids < 2**53 are exact
    host = torch.cat(parts).tolist()
    batch, n_asked = len(states), len(asked)
    result = SampleResult(token_ids=[int(t) for t in host[:batch]],
                          logprobs=[None] * batch, top_logprobs=[None] * batch)
    values_at = batch + n_asked
    ids_at = values_at + n_asked * n_max
    for j, row in enumerate(asked):
        result.logprobs[row] = host[batch + j]
        n = states[row].params.logprobs
        start = j * n_max
        result.top_logprobs[row] = [(int(host[ids_at + start + m]), host[values_at + start + m])
                                    for m in range(n)]
    return result
