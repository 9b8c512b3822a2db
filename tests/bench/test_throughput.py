"""`leanlm bench throughput`: JSON fields and their arithmetic, exact output token counts, the
sequential and transformers baselines, ShareGPT prompt loading and truncation, clear errors."""
import json

import pytest
import torch

from leanlm import LLM
from leanlm.bench.sharegpt import SHAREGPT_FILE, load_prompts
from leanlm.bench.throughput import prepare_requests, run_throughput
from leanlm.cli import main

# short prompts, so that the tiny model's 256-token context and the test's time budget both fit
PROMPTS = ["hello world", "the quick brown fox", "jumps over the lazy dog", "héllo wörld 你好",
           "hello hello hello world", "the lazy dog sleeps"]


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    """A data folder holding a small ShareGPT-format jsonl, made the only one searched."""
    lines = [json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(PROMPTS)]
    lines.insert(2, json.dumps({"id": "empty", "prompt": "  "}))  # skipped: no engine takes it
    (tmp_path / SHAREGPT_FILE).write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("LEANLM_DATA", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32", enable_prefix_caching=False)


def test_cli_with_both_baselines_writes_all_fields(data_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "tp.json"
    model = str(tiny_model_dir("llama"))
    rc = main(["bench", "throughput", "--model", model, "--num-prompts", "4", "--output-len", "5",
               "--baseline", "sequential", "--vs", "hf", "--hf-batch-size", "2", "--baseline-prompts", "3",
               "--max-num-seqs", "3", "--threads", str(torch.get_num_threads()), "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    tok = LLM(model, dtype="float32").get_tokenizer()
    lens = [len(tok.encode(p)) for p in PROMPTS[:4]]
    assert r["prompt_tokens"] == lens and r["num_truncated_prompts"] == 0
    assert (r["num_prompts"], r["total_output_tokens"], r["total_prompt_tokens"]) == (4, 4 * 5, sum(lens))
    secs = r["elapsed_s"]
    assert r["request_throughput"] == pytest.approx(4 / secs)
    assert r["output_throughput"] == pytest.approx(20 / secs)
    assert r["total_token_throughput"] == pytest.approx((20 + sum(lens)) / secs)
    for name in ("sequential", "hf"):  # baselines ran on the first 3 prompts only
        b = r[name]
        assert (b["num_prompts"], b["total_output_tokens"], b["total_prompt_tokens"]) == (3, 15, sum(lens[:3]))
        assert b["output_throughput"] == pytest.approx(15 / b["elapsed_s"]) and b["request_throughput"] > 0
        assert r[f"ratio_vs_{name}"] == pytest.approx(r["output_throughput"] / b["output_throughput"])
    assert r["hf"]["batch_size"] == r["hf_batch_size"] == 2
    assert (r["model"], r["dtype"], r["device"], r["output_len"], r["baseline_prompts"]) == (model, "float32",
                                                                                             "cpu", 5, 3)
    assert r["threads"] == torch.get_num_threads() and r["max_num_seqs"] == 3 and r["prefix_caching"] is False
    assert r["dataset"] == str(data_dir / SHAREGPT_FILE)
    printed = capsys.readouterr()
    for word in ("leanlm (batched", "sequential", "hf generate", "output tok/s", "x"):
        assert word in printed.out
    assert "first 3 of 4 prompts" in printed.err


def test_no_baseline_means_no_sections_and_exact_token_counts(llm):
    r = run_throughput(llm, PROMPTS, output_len=3, model="tiny")
    assert r["total_output_tokens"] == len(PROMPTS) * 3 and r["num_prompts"] == len(PROMPTS)
    assert "sequential" not in r and "hf" not in r and not any(k.startswith("ratio_") for k in r)
    assert r["baseline_prompts"] is None and r["hf_batch_size"] is None


def test_prompts_are_cut_to_max_prompt_len_and_to_the_context(tiny_model_dir):
    small = LLM(str(tiny_model_dir("llama")), dtype="float32", max_model_len=24)
    long_prompt = "hello world " * 50
    full = small.get_tokenizer().encode(long_prompt)
    reqs, cut = prepare_requests(small, ["hello", long_prompt], max_prompt_len=1024, output_len=6)
    assert reqs[1] == full[:24 - 6] and cut == 1  # cut to fit the context; the start is kept
    reqs, cut = prepare_requests(small, ["hello", long_prompt], max_prompt_len=3, output_len=6)
    assert [len(x) for x in reqs] == [min(3, len(small.get_tokenizer().encode("hello"))), 3] and cut >= 1
    r = run_throughput(small, [long_prompt, "hello"], output_len=20)  # prompt + output fill the context
    assert r["total_output_tokens"] == 40 and r["prompt_tokens"][0] == 4 and r["num_truncated_prompts"] == 1
    with pytest.raises(ValueError, match="output_len=24 leaves no room.*context of 24"):
        run_throughput(small, PROMPTS, output_len=24)


def test_load_prompts_in_file_order_from_either_format(data_dir, tmp_path):
    prompts, path = load_prompts(3)
    assert prompts == PROMPTS[:3] and path == data_dir / SHAREGPT_FILE  # the blank one was skipped
    conv = tmp_path / "sharegpt.json"
    conv.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "q1"},
                                                               {"from": "gpt", "value": "a1"}]},
                                {"id": "b", "conversations": [{"from": "human", "value": "q2"}]}]))
    assert load_prompts(2, conv) == (["q1", "q2"], conv)
    with pytest.raises(ValueError, match="holds 2 prompts, fewer than the 5"):
        load_prompts(5, conv)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected"):
        load_prompts(2, bad)


def test_bad_values_are_clear_errors(llm, data_dir, tiny_model_dir, tmp_path, monkeypatch, capsys):
    model = str(tiny_model_dir("llama"))
    for flag, value, msg in (("--num-prompts", "0", "positive integer"), ("--output-len", "-1", "positive integer"),
                             ("--hf-batch-size", "x", "not an integer"), ("--vs", "vllm", "invalid choice"),
                             ("--baseline", "parallel", "invalid choice"),
                             ("--baseline-prompts", "0", "positive integer"), ("--repeats", "0", "positive integer")):
        with pytest.raises(SystemExit):
            main(["bench", "throughput", "--model", model, flag, value])
        assert msg in capsys.readouterr().err
    assert main(["bench", "throughput", "--model", model, "--num-prompts", "50"]) == 2
    assert "fewer than the 50 asked for (--num-prompts)" in capsys.readouterr().err
    monkeypatch.setenv("LEANLM_DATA", str(tmp_path / "nowhere"))
    assert main(["bench", "throughput", "--model", model]) == 2
    err = capsys.readouterr().err
    assert SHAREGPT_FILE in err and "LEANLM_DATA" in err and "nowhere" in err
    with pytest.raises(ValueError, match="unknown peer 'vllm'.*allowed: hf"):
        run_throughput(llm, PROMPTS, output_len=2, vs="vllm")
    with pytest.raises(ValueError, match="unknown baseline 'x'.*allowed: sequential"):
        run_throughput(llm, PROMPTS, output_len=2, baseline="x")
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        run_throughput(llm, [], output_len=2)


def test_kv_budget_fields_say_how_many_sequences_fit(data_dir, tiny_model_dir, tmp_path):
    """--kv and --kv-cache-memory: the report names the codec, the cache's bytes and capacity, and
    how many sequences of the mean length fit; a 4x smaller codec fits more in the same budget."""
    model = str(tiny_model_dir("llama"))
    fields = {}
    for kv in ("bf16", "kivi:2:g16"):
        out = tmp_path / f"{kv}.json"
        assert main(["bench", "throughput", "--model", model, "--num-prompts", "4", "--output-len", "40",
                     "--max-num-seqs", "4", "--kv", kv, "--kv-cache-memory", "160KiB", "--json", str(out)]) == 0
        fields[kv] = r = json.loads(out.read_text())
        assert r["kv"] == kv and r["kv_cache_bytes"] <= 160 * 1024
        per_seq = -(-(r["prompt_tokens_mean"] + 40) // 16) * 16  # whole blocks
        assert r["seqs_fit"] == min(4, r["kv_capacity_tokens"] // per_seq)
        assert r["kv_capacity_tokens"] % 16 == 0 and r["num_preemptions"] >= 0
        assert r["total_output_tokens"] == 4 * 40
    # bf16: 3 layers x 2 heads x 2 x 16 x 2 = 384 B/token; kivi:2 at g16: 3 x 2 x (8 codes + 4 K + 4 V (s, z))
    assert (fields["bf16"]["kv_bytes_per_token"], fields["kivi:2:g16"]["kv_bytes_per_token"]) == (384, 96)
    assert fields["kivi:2:g16"]["kv_capacity_tokens"] > fields["bf16"]["kv_capacity_tokens"]


def test_kv_baseline_runs_the_same_requests_on_another_codec(data_dir, tiny_model_dir, tmp_path, capsys):
    """--kv-baseline SPEC: a second engine, same budget and requests, another codec; the ratio is
    the two output throughputs and each side says how many sequences it fit."""
    model, out = str(tiny_model_dir("llama")), tmp_path / "r.json"
    assert main(["bench", "throughput", "--model", model, "--num-prompts", "4", "--output-len", "24",
                 "--max-num-seqs", "4", "--kv", "kivi:2:g16", "--kv-baseline", "bf16",
                 "--kv-cache-memory", "160KiB", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    b = r["kv_baseline"]
    assert r["kv"] == "kivi:2:g16" and b["kv"] == "bf16"
    assert b["total_output_tokens"] == r["total_output_tokens"] == 4 * 24
    assert b["total_prompt_tokens"] == r["total_prompt_tokens"]
    assert r["ratio_vs_kv_baseline"] == pytest.approx(r["output_throughput"] / b["output_throughput"])
    assert b["kv_capacity_tokens"] < r["kv_capacity_tokens"] and b["num_preemptions"] >= 0
    assert "--kv bf16" in capsys.readouterr().out


def test_repeats_alternate_the_engines_and_take_medians(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    """--repeats 3: the two engines run A B, B A, A B; each side reports its median run, the ratio
    is the median of the three back-to-back ratios, and the sequential baseline runs once."""
    from leanlm.bench import throughput

    order = []
    for name, tag in (("run_throughput", "main"), ("run_kv_baseline", "base"), ("time_sequential", "seq")):
        real = getattr(throughput, name)
        monkeypatch.setattr(throughput, name, lambda *a, _real=real, _tag=tag, **k: order.append(_tag) or _real(*a, **k))
    model, out = str(tiny_model_dir("llama")), tmp_path / "r.json"
    assert main(["bench", "throughput", "--model", model, "--num-prompts", "3", "--output-len", "8",
                 "--kv", "kivi:4:g16", "--kv-baseline", "bf16", "--baseline", "sequential",
                 "--repeats", "3", "--json", str(out)]) == 0
    assert order == ["main", "seq", "base", "base", "main", "main", "base"]
    r = json.loads(out.read_text())
    runs, base_runs = r["runs"], r["kv_baseline"]["runs"]
    assert r["repeats"] == 3 and len(runs) == len(base_runs) == 3
    assert r["output_throughput"] == sorted(x["output_throughput"] for x in runs)[1]
    assert r["kv_baseline"]["output_throughput"] == sorted(x["output_throughput"] for x in base_runs)[1]
    ratios = [a["output_throughput"] / b["output_throughput"] for a, b in zip(runs, base_runs)]
    assert r["ratios_vs_kv_baseline"] == pytest.approx(ratios)
    assert r["ratio_vs_kv_baseline"] == pytest.approx(sorted(ratios)[1])
    assert r["ratio_vs_sequential"] == pytest.approx(r["output_throughput"] / r["sequential"]["output_throughput"])
    assert r["total_output_tokens"] == r["kv_baseline"]["total_output_tokens"] == 3 * 8
