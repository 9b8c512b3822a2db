"""Incremental detokenization with stop strings.

Decoding the whole output each step is O(n) per token. Instead, as vLLM and TGI do, we
decode a small window of recent tokens twice — up to `read_offset` (already emitted)
and up to the end — and emit the difference. The window starts at `prefix_offset`, a
few tokens back, so that decoders that depend on context (leading spaces, byte-level
merges) see it. A decode ending in U+FFFD means a token split a UTF-8 character: wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output, for context
_INCOMPLETE = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...


@dataclass
class StepText:
    delta: str  # newly final text, safe to show
    stopped: bool = False  # a stop string was found; no more text will come
    stop_reason: str | None = None  # the stop string that matched


class IncrementalDetokenizer:
    """Turns output tokens into text deltas, one token at a time, and finds stop strings.

    Text that could still be the start of a stop string is held back until it cannot
    (or until `finish`), so a stop string is never partially emitted.
    """

    def __init__(self, tokenizer: Decoder, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False, min_tokens: int = 0) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens  # as vLLM: stop strings count only from min_tokens on
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if self._ids and self._decode(self._ids).endswith(_INCOMPLETE):
            self._ids = []  # the prompt ends inside a character: its context would mislead
        self._prefix_offset = 0  # window start
        self._read_offset = len(self._ids)  # tokens before this are already decoded
        self._num_output = 0
        self._held = ""  # decoded but not emitted: could begin a stop string
        self._pieces: list[str] = []  # emitted text (joined lazily: O(1) per step)
        self._done = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def finished(self) -> bool:
        return self._done

    def step(self, token_id: int) -> StepText:
        """Add one output token; return the text it finalises."""
        if self._done:
            raise RuntimeError("step() after the detokenizer finished (stop string or finish())")
        self._ids.append(token_id)
        self._num_output += 1
        return self._release(self._read_new_text(flush=False), final=False)

    def finish(self) -> StepText:
        """Generation ended for another reason (EOS, length): flush everything held,
        including an incomplete trailing character, still honouring stop strings."""
        if self._done:
            return StepText("", stopped=False)
        return self._release(self._read_new_text(flush=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _read_new_text(self, flush: bool) -> str:
        """Text of tokens past read_offset, if it ends on a whole character (or `flush`)."""
        if self._read_offset == len(self._ids):
            return ""
        window = self._ids[self._prefix_offset:]
        before = self._decode(window[: self._read_offset - self._prefix_offset])
        after = self._decode(window)
        if not flush and (len(after) <= len(before) or after.endswith(_INCOMPLETE)):
            return ""  # nothing new yet, or a character is still split across tokens
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return after[len(before):]

    def _release(self, new_text: str, final: bool) -> StepText:
        pending = self._held + new_text
        self._held = ""
        if not self._stop or self._num_output < self._min_tokens:
            if final:
                self._done = True
            return self._emit(pending)
        # `pending` holds no complete stop string yet (else we would have stopped), and
        # emitted text ends with no stop-string prefix, so a match lies inside `pending`.
        match = _first_match(pending, self._stop)
        if match is not None:
            at, stop = match
            self._done = True
            end = at + len(stop) if self._include_stop else at
            return self._emit(pending[:end], stop)
        if final:
            self._done = True
            return self._emit(pending)
        hold = _longest_stop_prefix_suffix(pending, self._stop)
        self._held = pending[len(pending) - hold:] if hold else ""
        return self._emit(pending[: len(pending) - hold])

    def _emit(self, delta: str, stop: str | None = None) -> StepText:
        if delta:
            self._pieces.append(delta)
        return StepText(delta, stopped=stop is not None, stop_reason=stop)


def _first_match(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string in `text` (the first listed one on a tie)."""
    best = None
    for stop in stops:
        at = text.find(stop)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    return best


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
