import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from leanlm.engine.detokenizer import IncrementalDetokenizer, StepText

CORPUS = [
    "héllo wörld 你好 🙂",
    "the quick brown fox jumps over the lazy dog",
    "héllo again, wörld! 你好吗? 🙂🙂",
    "naïve café déjà vu, stop here please",
    "日本語のテキスト and ascii",
]
TEXTS = [
    "héllo wörld 你好吗? naïve 🙂 日本語のテキスト déjà vu!",
    "the lazy fox said 你好 🙂🙂 then stopped; STOP here.",
    "ascii only, stop here please",
]


class CountingTokenizer:
    """A tokenizers.Tokenizer behind the decode(ids, skip_special_tokens) interface,
    recording how many ids each call decodes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[int] = []

    def decode(self, ids, skip_special_tokens):
        self.calls.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text):
        return self.tokenizer.encode(text).ids


@pytest.fixture(scope="module")
def tok():
    # a tiny byte-level BPE: too few merges to hold most multi-byte characters whole
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return CountingTokenizer(tokenizer)


def stream(tok, ids, prompt=(), **kwargs):
    """Feed ids one by one; return (deltas, last StepText, detokenizer)."""
    detok = IncrementalDetokenizer(tok, list(prompt), **kwargs)
    deltas, out = [], None
    for token in ids:
        out = detok.step(token)
        deltas.append(out.delta)
        if out.stopped:
            return deltas, out, detok
    out = detok.finish()
    deltas.append(out.delta)
    return deltas, out, detok


def test_tokenizer_really_splits_characters(tok):
    ids = tok.encode(TEXTS[0])
    assert any(tok.decode([i], False).endswith("\ufffd") for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_rebuild_real_text_without_replacement_chars(tok, text):
    ids = tok.encode(text)
    deltas, out, detok = stream(tok, ids, prompt=tok.encode("héllo 你"))
    assert "".join(deltas) == text == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert not out.stopped and detok.finished


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_equal_full_decode_for_random_sequences(tok, skip_special_tokens):
    rng = random.Random(0)
    vocab = tok.tokenizer.get_vocab_size()
    for _ in range(300):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 7))]
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        deltas, _, _ = stream(tok, ids, prompt=prompt, skip_special_tokens=skip_special_tokens)
        full = tok.decode(ids, skip_special_tokens)
        assert "".join(deltas) == full, (prompt, ids)
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), (prompt, ids)


def test_each_step_decodes_a_small_window(tok):
    ids = tok.encode(" ".join(TEXTS) * 20)
    assert len(ids) > 1000
    tok.calls.clear()
    deltas, _, _ = stream(tok, ids, prompt=tok.encode(TEXTS[1]))
    assert "".join(deltas) == " ".join(TEXTS) * 20
    assert len(tok.calls) <= 2 * len(ids) + 3
    assert max(tok.calls) <= 12  # bounded by the longest split character, not the output


def test_stop_string_across_tokens_is_cut_and_never_partially_emitted(tok):
    text = TEXTS[0]
    ids = tok.encode(text)
    stop = "你好吗"  # several byte tokens, preceded by text in the same token
    detok = IncrementalDetokenizer(tok, [], stop=[stop])
    emitted = ""
    for token in ids:
        out = detok.step(token)
        emitted += out.delta
        # nothing past the stop string's start is ever shown
        assert text.startswith(emitted) and len(emitted) <= text.index(stop)
        if out.stopped:
            break
    assert out == StepText(delta=out.delta, stopped=True, stop_reason=stop)
    assert emitted == detok.text == text[: text.index(stop)]
    with pytest.raises(RuntimeError):
        detok.step(ids[0])


@pytest.mark.parametrize("include", [False, True])
def test_random_stop_strings_match_str_find(tok, include):
    rng = random.Random(1)
    for _ in range(200):
        text = rng.choice(TEXTS)
        start = rng.randrange(len(text) - 1)
        stop = text[start: start + rng.randrange(1, 8)]
        ids = tok.encode(text)
        deltas, out, detok = stream(tok, ids, stop=[stop], include_stop_str_in_output=include)
        at = text.find(stop)
        expected = text[: at + len(stop)] if include else text[:at]
        assert out.stopped and out.stop_reason == stop, (text, stop)
        assert "".join(deltas) == detok.text == expected, (text, stop)


def test_earliest_of_several_stop_strings_wins(tok):
    text = TEXTS[1]
    _, out, detok = stream(tok, tok.encode(text), stop=["STOP", "said 你", "🙂"])
    assert out.stop_reason == "said 你" and detok.text == "the lazy fox "
    # both complete on the same token: the one that starts first wins, not the first listed
    _, out, detok = stream(tok, tok.encode(text), stop=["ox", "lazy fox"])
    assert out.stop_reason == "lazy fox" and detok.text == "the "


def test_possible_stop_prefix_is_held_then_flushed_by_finish(tok):
    text = "the lazy fox said 你"
    detok = IncrementalDetokenizer(tok, [], stop=["你好吗", "fox jumps"])
    for token in tok.encode(text):
        assert not detok.step(token).stopped
    assert detok.text == "the lazy fox said "  # "你" might begin "你好吗"
    out = detok.finish()
    assert out == StepText("你", stopped=False, stop_reason=None)
    assert detok.text == text


def test_finish_flushes_an_incomplete_character(tok):
    ids = tok.encode("ok 日")  # "日" is three byte tokens here
    cut = ids[:-1]
    assert tok.decode(cut, False).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, [])
    shown = "".join(detok.step(t).delta for t in cut)
    assert shown == "ok "  # the split character waits ...
    flushed = detok.finish()
    assert flushed.delta.endswith("\ufffd") and not flushed.stopped  # ... until the end
    assert shown + flushed.delta == tok.decode(cut, False) == detok.text


def test_stop_strings_ignored_before_min_tokens(tok):
    text = "stop here please, stop here"
    ids = tok.encode(text)
    prefix_tokens = len(tok.encode("stop here please,"))
    _, out, detok = stream(tok, ids, stop=["stop"], min_tokens=prefix_tokens)
    assert out.stopped and detok.text == "stop here please, "
