"""`leanlm eval ppl`: the GPTQ-protocol perplexity equals exp(mean NLL) of `LLM.score` over the same
windows and a transformers float64 reference; windows, --limit, --json and data lookup."""
import json
import math
import random

import pytest
import torch

from leanlm import LLM
from leanlm.bench.data import find_data_file
from leanlm.bench.perplexity import DATASETS, cut_windows, perplexity, resolve_data
from leanlm.cli import main

CTX = 32
WORDS = ("the quick brown fox jumps over lazy dog hello world héllo wörld 你好 🙂 , . "
         "a tiny model reads this text and guesses the next token").split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(10)]
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text("\n\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32")


@pytest.fixture(scope="module")
def ids(llm, text_file):
    ids = llm.get_tokenizer().encode(text_file.read_text(encoding="utf-8"), add_special_tokens=False)
    assert len(ids) > 5 * CTX + 7  # several windows and a partial tail to drop
    return ids


def hf_reference_ppl(path, windows):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor(windows)
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits.double(), dim=-1)
    nll = -logp[:, :-1].gather(2, x[:, 1:, None]).squeeze(2)
    return math.exp(nll.mean().item())


def test_ppl_is_exp_mean_nll_of_score_and_matches_transformers(llm, ids, tiny_model_dir):
    res = perplexity(llm, ids, ctx=CTX)
    windows = cut_windows(ids, CTX)
    n = len(ids) // CTX
    assert len(windows) == res.windows == n
    assert res.tokens == n * (CTX - 1)
    by_hand = torch.cat([llm.score(w, chunk=CTX) for w in windows])
    assert by_hand.dtype == torch.float64 and by_hand.numel() == res.tokens
    assert res.ppl == pytest.approx(math.exp(-by_hand.mean().item()), rel=1e-12)
    assert res.nll_sum == pytest.approx(-by_hand.sum().item(), rel=1e-12)
    ref = hf_reference_ppl(tiny_model_dir("llama"), windows)
    assert res.ppl == pytest.approx(ref, rel=1e-4)
    assert 1 < res.ppl < 300 * 2  # a random 300-token model: near-uniform, not degenerate
    # feeding a window in chunks scores the same tokens with the same result up to rounding
    chunked = perplexity(llm, ids, ctx=CTX, chunk=7)
    assert chunked.chunk == 7 and chunked.tokens == res.tokens
    assert chunked.ppl == pytest.approx(res.ppl, rel=1e-5)


def test_window_cutting_drops_the_partial_tail_and_limit_takes_the_first():
    ids = list(range(100))
    w = cut_windows(ids, 32)
    assert [len(x) for x in w] == [32, 32, 32]
    assert w[1] == list(range(32, 64)) and w[2][-1] == 95  # tokens 96..99 dropped
    assert cut_windows(ids, 32, limit=2) == w[:2]
    assert cut_windows(ids, 32, limit=50) == w
    assert cut_windows(ids, 100) == [ids]
    with pytest.raises(ValueError, match="fewer than one window"):
        cut_windows(ids, 101)
    with pytest.raises(ValueError, match="ctx must be >= 2"):
        cut_windows(ids, 1)
    with pytest.raises(ValueError, match="limit"):
        cut_windows(ids, 32, limit=0)


def test_limit_scores_only_the_first_windows(llm, ids):
    res = perplexity(llm, ids, ctx=CTX, limit=2)
    assert (res.windows, res.tokens) == (2, 2 * (CTX - 1))
    lp = torch.cat([llm.score(ids[i * CTX:(i + 1) * CTX], chunk=CTX) for i in range(2)])
    assert res.ppl == pytest.approx(math.exp(-lp.mean().item()), rel=1e-12)


def test_ctx_beyond_the_model_context_is_a_clear_error(llm, ids):
    with pytest.raises(ValueError, match="larger than the model's context of 256"):
        perplexity(llm, ids, ctx=512)
    with pytest.raises(ValueError, match="chunk"):
        perplexity(llm, ids, ctx=CTX, chunk=0)


def test_cli_writes_json_with_the_same_numbers(llm, ids, tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "sub" / "ppl.json"
    model = str(tiny_model_dir("llama"))
    rc = main(["eval", "ppl", "--model", model, "--dtype", "float32", "--data", str(text_file),
               "--ctx", str(CTX), "--limit", "3", "--json", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) == {"ppl", "tokens", "ctx", "model", "dtype", "windows", "chunk", "seconds",
                         "kv", "kv_bytes_per_token", "kv_compression"}
    # tiny llama: 3 layers, 2 KV heads of 16 channels, float32: 2 * 3 * 2 * 16 * 4 bytes, half of bf16's
    assert (data["kv"], data["kv_bytes_per_token"], data["kv_compression"]) == ("plain", 768, 0.5)
    direct = perplexity(llm, ids, ctx=CTX, limit=3)
    assert data["ppl"] == pytest.approx(direct.ppl, rel=1e-9)
    assert (data["tokens"], data["ctx"], data["windows"], data["chunk"]) == (3 * (CTX - 1), CTX, 3, CTX)
    assert (data["model"], data["dtype"]) == (model, "float32")
    assert data["seconds"] > 0
    printed = capsys.readouterr().out
    assert "ppl" in printed and f"{direct.ppl:.4f}" in printed


def test_cli_smoke_whole_file_with_progress(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "p.json"
    assert main(["eval", "ppl", "--model", str(tiny_model_dir("llama")), "--data", str(text_file),
                 "--ctx", str(CTX), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["windows"] > 5 and data["tokens"] == data["windows"] * (CTX - 1) and data["ppl"] > 1


def test_wikitext2_is_found_through_LEANLM_DATA(monkeypatch, tmp_path, tiny_model_dir, text_file):
    (tmp_path / DATASETS["wikitext2"]).write_text(text_file.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setenv("LEANLM_DATA", str(tmp_path))
    assert resolve_data("wikitext2") == tmp_path / DATASETS["wikitext2"]
    out = tmp_path / "w.json"
    assert main(["eval", "ppl", "--model", str(tiny_model_dir("llama")), "--ctx", str(CTX),
                 "--limit", "2", "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["windows"] == 2


def test_missing_data_is_a_clear_error_naming_where_it_looked(monkeypatch, tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "nodata"
    empty.mkdir()
    monkeypatch.setenv("LEANLM_DATA", str(empty))
    with pytest.raises(ValueError) as e:
        find_data_file(DATASETS["wikitext2"])
    assert DATASETS["wikitext2"] in str(e.value) and str(empty) in str(e.value)
    rc = main(["eval", "ppl", "--model", str(tiny_model_dir("llama")), "--data", "wikitext2"])
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and str(empty) in err
    rc = main(["eval", "ppl", "--model", str(tiny_model_dir("llama")), "--data", str(tmp_path / "nope.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.txt" in err and "neither a known dataset" in err


def test_cli_rejects_bad_ctx(tiny_model_dir, text_file, capsys):
    model = str(tiny_model_dir("llama"))
    assert main(["eval", "ppl", "--model", model, "--data", str(text_file), "--ctx", "4096"]) == 2
    assert "--ctx 4096 is larger than the model's context of 256" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "ppl", "--model", model, "--data", str(text_file), "--ctx", "-3"])
    assert "positive integer" in capsys.readouterr().err


def test_embedded_model_on_wikitext2_matches_the_gptq_reference_pipeline():
    """The real model and data: leanlm's tokenization and scores equal the GPTQ reference code path
    (HF tokenizer on the whole text, HF model, float64 log-softmax) on the first two 256-token windows."""
    import transformers as tf

    try:
        path = find_data_file(DATASETS["wikitext2"])
        llm = LLM(dtype="float32")
    except ValueError as e:
        pytest.skip(f"embedded model or WikiText-2 not available: {e}")
    text = path.read_text(encoding="utf-8")
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    hf_ids = tf.AutoTokenizer.from_pretrained(llm.engine.model_path)(text, add_special_tokens=False)["input_ids"]
    assert ids == hf_ids and len(ids) > 250_000
    res = perplexity(llm, ids, ctx=256, limit=2)
    ref = hf_reference_ppl(llm.engine.model_path, cut_windows(hf_ids, 256, limit=2))
    assert res.tokens == 2 * 255
    assert res.ppl == pytest.approx(ref, rel=1e-4)
    assert 5 < res.ppl < 60  # SmolLM2-135M on WikiText-2 at a short context
