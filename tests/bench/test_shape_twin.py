"""benchmarks/shape_twin.py: a kit of a checkpoint's small files and tensor shapes, and the
random-weight twin made from it, which leanlm loads with exactly the source's shapes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from leanlm import LLM, SamplingParams
from tests.conftest import load_benchmark, save_tiny_model


@pytest.fixture(scope="module")
def twin_script():
    return load_benchmark("shape_twin")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_twin_has_the_source_shapes_and_new_values(twin_script, tmp_path):
    src = save_tiny_model("llama", tmp_path / "src")
    twin_script.main(["kit", str(tmp_path / "kit"), "--from", str(src)])
    kit_files = {p.name for p in (tmp_path / "kit").iterdir()}
    assert "shapes.json" in kit_files and "config.json" in kit_files and "tokenizer.json" in kit_files
    assert not any(name.endswith(".safetensors") for name in kit_files)  # the weights stay behind

    twin_script.main(["make", str(tmp_path / "kit"), str(tmp_path / "twin")])
    a, b = tensors(src), tensors(tmp_path / "twin")
    assert set(a) == set(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        if "norm" in name:
            assert torch.equal(b[name], torch.ones_like(b[name])), name
        else:
            assert not torch.equal(a[name].float(), b[name]), name
    assert json.loads((tmp_path / "twin" / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    # leanlm loads the twin and decodes the requested number of tokens with the source's tokenizer
    out = LLM(str(tmp_path / "twin")).generate(["hello world"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5
    assert out[0].prompt_token_ids == LLM(str(src)).generate(["hello world"], SamplingParams(max_tokens=1))[0].prompt_token_ids


def test_kit_and_make_reject_what_they_cannot_use(twin_script, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        twin_script.main(["kit", str(tmp_path / "kit"), "--from", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="no shapes.json"):
        twin_script.main(["make", str(tmp_path / "empty"), str(tmp_path / "twin")])
