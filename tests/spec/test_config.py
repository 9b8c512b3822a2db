"""--spec parsing (canonical round trip, clear errors) and load-time checks of the proposers."""
import json
import shutil

import pytest

from leanlm import LLM
from leanlm.spec.config import SpecConfig


@pytest.mark.parametrize("text, canonical", [
    ("ngram", "ngram:n=3:k=8"),
    ("ngram:n=2:k=4", "ngram:n=2:k=4"),
    ("ngram:k=4:n=2", "ngram:n=2:k=4"),
    ("early-exit:8", "early-exit:8:k=4"),
    ("early-exit:8:k=6", "early-exit:8:k=6"),
    ("draft:/models/small:k=5", "draft:/models/small:k=5"),
    ("self:rtn:int4:g32", "self:rtn:int4:g32:k=4"),
    ("self:rtn:int8:k=3", "self:rtn:int8:k=3"),
    ("early-exit:auto", "early-exit:auto:k=6"),                  # conf 0.3 is auto's default
    ("early-exit:auto:conf=0:k=4", "early-exit:auto:k=4:conf=0"),
    ("early-exit:8:conf=0.4", "early-exit:8:k=4:conf=0.4"),
    ("self:rtn:int8:conf=0.5", "self:rtn:int8:k=4:conf=0.5"),
    ("self:rtn:int8:head=quant:k=5", "self:rtn:int8:k=5:head=quant"),
    ("self:rtn:int8:head=shared", "self:rtn:int8:k=4"),
    ("draft:/m:conf=0.25:k=2", "draft:/m:k=2:conf=0.25"),
])
def test_parse_round_trips(text, canonical):
    spec = SpecConfig.parse(text)
    assert str(spec) == canonical
    assert SpecConfig.parse(str(spec)) == spec


@pytest.mark.parametrize("bad, says", [
    ("medusa:3", "unknown proposer 'medusa'"),
    ("ngram:k=0", "k='0'"),
    ("ngram:k=x", "k='x'"),
    ("ngram:m=3", "option 'm'"),
    ("ngram:3", "ngram takes only"),
    ("early-exit", "needs an argument"),
    ("early-exit:x", "exit layer='x'"),
    ("early-exit:auto:e=3", "option 'e'"),
    ("early-exit:8:conf=1.5", "conf='1.5'"),
    ("early-exit:8:conf=x", "conf='x'"),
    ("ngram:conf=0.3", "option 'conf'"),
    ("draft:", "needs an argument"),
    ("draft:m:n=2", "option 'n'"),
    ("self:rtn:int99", "bad quant spec"),
    ("self:rtn:int8:head=int4", "head='int4'"),
    ("draft:m:head=quant", "option 'head'"),
    ("", "empty"),
])
def test_bad_specs_name_the_value_and_the_forms(bad, says):
    with pytest.raises(ValueError) as e:
        SpecConfig.parse(bad)
    assert says in str(e.value) and repr(bad) in str(e.value) and "allowed forms" in str(e.value)


def test_engine_checks(tiny_model_dir):
    path = str(tiny_model_dir("qwen3"))
    with pytest.raises(ValueError, match="exit layer must be in \\[1, 2\\]"):
        LLM(path, spec="early-exit:3")
    with pytest.raises(ValueError, match="needs the paged cache"):
        LLM(path, spec="ngram", compile=True)
    with pytest.raises(ValueError, match="unknown proposer"):
        LLM(path, spec="lookahead")


def test_draft_with_another_tokenizer_is_refused(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen3")
    draft = tmp_path / "draft"
    shutil.copytree(path, draft)
    tok = json.loads((draft / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped: still a different tokenizer
    (draft / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="does not share the target's tokenizer"):
        LLM(str(path), spec=f"draft:{draft}")
