"""The wikitext-grounded prompt set of `leanlm bench spec`: 20 prompts, the same on every build,
each holding its WikiText-2 passage verbatim (after detokenization) with a task about it."""
import pytest

from leanlm.bench.data import find_data_file
from leanlm.bench.grounded import MAX_WORDS, MIN_WORDS, TASKS, detokenize, grounded_prompts, passages


def raw_text():
    from leanlm.bench.data import read_text

    try:
        return read_text(find_data_file("wiki.test.raw"))
    except ValueError:
        pytest.skip("wiki.test.raw is not in the data folder")


def test_twenty_deterministic_prompts_each_holding_its_passage():
    raw = raw_text()
    prompts, ps = grounded_prompts(raw), passages(raw)
    assert len(prompts) == len(ps) == 20 and len(set(ps)) == 20
    assert grounded_prompts(raw) == prompts  # built again: identical
    rows = {detokenize(r) for r in raw.split("\n")}
    for i, (prompt, passage) in enumerate(zip(prompts, ps)):
        assert passage in prompt and prompt.endswith(passage)
        assert prompt.startswith(TASKS[i % len(TASKS)].split("{")[0])
        assert MIN_WORDS <= len(passage.split()) <= MAX_WORDS
        assert passage in rows  # a whole paragraph of the file
        assert "@-@" not in passage and " , " not in passage


def test_bench_spec_encodes_them_with_the_chat_template():
    from leanlm.bench.spec import load_prompts

    raw_text()

    class Tok:
        chat_template = "x"

        def encode_chat(self, messages):
            return [len(messages[0]["content"])]

    assert load_prompts("wikitext-grounded", Tok(), 3) == [[len(p)] for p in grounded_prompts(raw_text())[:3]]


def test_too_few_passages_is_a_clear_error():
    with pytest.raises(ValueError, match="only 1 paragraphs"):
        passages(" = Title = \n" + " ".join(["word"] * 150) + "\n", 20)
