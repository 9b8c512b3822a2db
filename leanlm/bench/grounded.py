"""`--prompts wikitext-grounded`: 20 input-grounded prompts built at run time from WikiText-2 test
passages (`wiki.test.raw` in the data folder; nothing of it is copied into the repository).

Each prompt gives one passage of ~150-300 tokens (110-200 words) and asks to repeat, rewrite or
extract from it, the kind of task where the answer re-uses the input and prompt lookup (n-gram)
drafts pay. The passages are the article paragraphs (headings and short lines skipped) of that
length, taken evenly spaced over the file, so the set is the same on every run and machine.
"""
from __future__ import annotations

import re

WIKITEXT = "wiki.test.raw"
NUM_PROMPTS = 20
MIN_WORDS, MAX_WORDS = 110, 200

TASKS = (
    "Repeat the following passage word for word.\n\n{passage}",
    "Rewrite the following passage in plain, simple English, keeping every fact.\n\n{passage}",
    "List every name, date and number that appears in the following passage, each with the "
    "sentence it comes from.\n\n{passage}",
    "Copy the following passage, then correct any spelling mistakes in it.\n\n{passage}",
)


def detokenize(line: str) -> str:
    """WikiText's tokenized spacing back to ordinary text (' @-@ ' -> '-', ' , ' -> ', ' ...)."""
    text = re.sub(r" @(.)@ ", r"\1", line.strip())
    text = re.sub(r" ([,.;:!?)\]'])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    return text.replace(" n't", "n't")


def passages(raw: str, count: int = NUM_PROMPTS) -> list[str]:
    """`count` paragraphs of MIN_WORDS..MAX_WORDS words, evenly spaced over the file."""
    # rows are split on '\n' only: str.splitlines() would also split on Unicode separators
    paras = [detokenize(r) for r in raw.split("\n") if r.strip() and not r.strip().startswith("=")]
    fit = [r for r in paras if MIN_WORDS <= len(r.split()) <= MAX_WORDS]
    if len(fit) < count:
        raise ValueError(f"{WIKITEXT}: only {len(fit)} paragraphs of {MIN_WORDS}-{MAX_WORDS} words, "
                         f"{count} needed")
    step = len(fit) / count
    return [fit[int(i * step)] for i in range(count)]


def grounded_prompts(raw: str, count: int = NUM_PROMPTS) -> list[str]:
    """The prompt texts (before any chat template): task i % len(TASKS) on passage i."""
    return [TASKS[i % len(TASKS)].format(passage=p) for i, p in enumerate(passages(raw, count))]


def load_grounded_prompts(count: int = NUM_PROMPTS) -> list[str]:
    from leanlm.bench.data import find_data_file, read_text

    return grounded_prompts(read_text(find_data_file(WIKITEXT)), count)
