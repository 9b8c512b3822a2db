"""ShareGPT prompts for the throughput and serving benchmarks (vLLM's benchmark dataset).

The default file is `sharegpt_v3_filtered_500_prompts.jsonl` in the shared data folder (see
data.py): one `{"id", "prompt"}` per line, the first human turn of each conversation, already
filtered as vLLM's benchmark_serving filters (prompt and reply under 800 Llama tokens). vLLM's own
`ShareGPT_V3_*.json` layout (a JSON list of `{"conversations": [{"from": "human", "value": ...}]}`)
is read too, so a user can point `--dataset` at either.

Prompts are taken in file order, the first N: no sampling, so every engine and every run sees the
same requests.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from leanlm.bench.data import find_data_file, read_text

SHAREGPT_FILE = "sharegpt_v3_filtered_500_prompts.jsonl"


def dataset_path(path: str | Path | None) -> Path:
    """`path` as given, else the default ShareGPT file from the data folder (a ValueError naming
    every folder searched and $LEANLM_DATA when it is missing)."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"dataset {str(path)!r} does not exist")
        return path
    return find_data_file(SHAREGPT_FILE)


def _prompt_of(item, where: str) -> str:
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return item["prompt"]
    if isinstance(item, dict) and isinstance(item.get("conversations"), list):
        for turn in item["conversations"]:
            if isinstance(turn, dict) and turn.get("from") in ("human", "user") and isinstance(turn.get("value"), str):
                return turn["value"]
    raise ValueError(f"{where}: expected {{\"prompt\": str}} or a ShareGPT {{\"conversations\": [...]}} item")


def load_prompts(num_prompts: int, path: str | Path | None = None) -> tuple[list[str], Path]:
    """The first `num_prompts` non-empty prompts of the dataset, and the file they came from."""
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be a positive integer, got {num_prompts!r}")
    path = dataset_path(path)
    text = read_text(path)
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of ShareGPT items")
        located = [(item, f"{path} item {i}") for i, item in enumerate(items)]
    else:
        located = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    prompts = []
    for item, where in located:
        prompt = _prompt_of(item, where)
        if prompt.strip():  # an empty prompt is not a request any engine accepts
            prompts.append(prompt)
        if len(prompts) == num_prompts:
            return prompts, path
    raise ValueError(f"{path} holds {len(prompts)} prompts, fewer than the {num_prompts} asked for "
                     f"(--num-prompts)")


def add_dataset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, metavar="PATH",
                   help=f"ShareGPT prompts: jsonl of {{\"id\", \"prompt\"}} or vLLM's ShareGPT json list "
                        f"(default: {SHAREGPT_FILE} in $LEANLM_DATA or ../shared/data)")
