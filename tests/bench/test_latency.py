"""`leanlm bench latency`: JSON report fields and their arithmetic, the weight bytes a decode step
reads, the prompts, and clear errors for bad flags."""
import json
import statistics

import pytest
import torch

from leanlm import LLM
from leanlm.bench.latency import decode_weight_bytes, prompt_ids, run_latency
from leanlm.bench.peers import HFPeer, LeanlmTarget
from leanlm.cli import main


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32")


def test_cli_vs_hf_writes_all_fields_and_ratios(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lat.json"
    model = str(tiny_model_dir("llama"))
    rc = main(["bench", "latency", "--model", model, "--prompt-len", "16", "--gen-len", "8",
               "--repeats", "2", "--vs", "hf", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("pp16_tps", "tg8_tps", "bandwidth_gbs", "ratio_pp16", "ratio_tg8"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert len(r["pp16_runs"]) == len(r["tg8_runs"]) == 2 and min(r["pp16_runs"] + r["tg8_runs"]) > 0
    assert r["pp16_tps"] == pytest.approx(statistics.median(r["pp16_runs"]))
    assert r["tg8_tps"] == pytest.approx(statistics.median(r["tg8_runs"]))
    assert (r["model"], r["dtype"], r["device"]) == (model, "float32", "cpu")
    assert r["threads"] == torch.get_num_threads() >= 1
    peer = r["peer"]
    assert peer["name"] == "hf" and peer["pp16_tps"] > 0 and peer["tg8_tps"] > 0
    assert r["ratio_pp16"] == pytest.approx(r["pp16_tps"] / peer["pp16_tps"])
    assert r["ratio_tg8"] == pytest.approx(r["tg8_tps"] / peer["tg8_tps"])
    assert r["bandwidth_gbs"] == pytest.approx(r["weight_bytes"] * r["tg8_tps"] / 1e9)
    printed = capsys.readouterr().out
    for word in ("pp16", "tg8", "leanlm/hf", "GB/s"):
        assert word in printed


def test_rows_are_named_after_the_lengths_without_peer(llm):
    r = run_latency(llm, prompt_len=10, gen_len=3, repeats=1, model="tiny")
    assert set(r) >= {"pp10_tps", "tg3_tps", "pp10_runs", "tg3_runs", "bandwidth_gbs", "threads"}
    assert "peer" not in r and not any(k.startswith("ratio_") for k in r)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied LM head (+ no biases) / untied (+ qkv biases)
def test_decode_weight_bytes_counts_linears_and_lm_head_once(arch, tiny_model_dir):
    import transformers as tf

    path = tiny_model_dir(arch)
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = hf.config
    # every projection weight and bias, plus one LM head matrix (tied or not); no norms, no embedding gather
    expected = sum(p.numel() for n, p in hf.named_parameters() if "_proj." in n)
    expected += cfg.vocab_size * cfg.hidden_size
    assert decode_weight_bytes(LLM(str(path), dtype="float32").engine.model) == 4 * expected
    assert decode_weight_bytes(LLM(str(path), dtype="bfloat16").engine.model) == 2 * expected


def test_prompts_are_fixed_ordinary_tokens(llm):
    a, b = prompt_ids(llm, 64, seed=1), prompt_ids(llm, 64, seed=1)
    assert a == b != prompt_ids(llm, 64, seed=2)
    special = llm.get_tokenizer().special_token_ids
    assert all(0 <= t < 300 and t not in special for t in a)


def test_targets_time_the_same_work(llm, tiny_model_dir):
    prompt = prompt_ids(llm, 12, seed=3)
    for target in (LeanlmTarget(llm), HFPeer(tiny_model_dir("llama"), torch.float32, torch.device("cpu"))):
        assert target.prefill_seconds(prompt) > 0
        assert target.decode_tps(prompt[:4], 5) > 0  # checks internally that exactly 6 tokens came


def test_bad_values_are_clear_errors(llm, tiny_model_dir, capsys):
    model = str(tiny_model_dir("llama"))
    for flag, value, msg in (("--repeats", "-1", "positive integer"), ("--repeats", "0", "positive integer"),
                             ("--gen-len", "x", "not an integer"), ("--vs", "vllm", "invalid choice")):
        with pytest.raises(SystemExit):
            main(["bench", "latency", "--model", model, flag, value])
        assert msg in capsys.readouterr().err
    with pytest.raises(ValueError, match="repeats must be a positive integer, got -2"):
        run_latency(llm, repeats=-2)
    with pytest.raises(ValueError, match="unknown peer 'vllm'.*allowed: hf"):
        run_latency(llm, prompt_len=8, gen_len=2, repeats=1, vs="vllm")
    with pytest.raises(ValueError, match="context of 256"):
        run_latency(llm, prompt_len=256, gen_len=2, repeats=1)
    assert main(["bench", "latency", "--model", model, "--prompt-len", "300"]) == 2
    assert "prompt_len=300" in capsys.readouterr().err


def test_noisy_runs_are_flagged(capsys):
    from leanlm.bench.latency import print_report

    base = {"prompt_len": 4, "gen_len": 2, "model": "m", "dtype": "float32", "device": "cpu", "threads": 1,
            "repeats": 3, "weight_bytes": 1000, "bandwidth_gbs": 1e-5, "pp4_runs": [10.0, 10.5, 11.0],
            "tg2_runs": [5.0, 5.1, 5.2], "tg2_tps": 5.1}
    print_report(base)
    assert "warning" not in capsys.readouterr().err
    print_report({**base, "tg2_runs": [5.0, 1.0, 5.2]})
    assert "leanlm tg2" in capsys.readouterr().err
