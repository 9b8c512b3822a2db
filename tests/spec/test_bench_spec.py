"""`leanlm bench spec` end to end on a tiny model, and the proposer's counters in /metrics."""
import json

from leanlm import LLM, SamplingParams
from leanlm.cli import main


def test_bench_spec_writes_the_fields(tiny_model_dir, tmp_path):
    path = str(tiny_model_dir("qwen3"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [t, "second turn"]}) for t in
                                 ["hello world, the quick brown fox", "the lazy dog jumps over the fox, the lazy dog"]))
    out = tmp_path / "spec.json"
    assert main(["bench", "spec", "--model", path, "--spec", "ngram:n=2:k=4", "--prompts", str(prompts),
                 "--max-tokens", "12", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for field in ("spec", "baseline_tps", "spec_tps", "speedup", "acceptance_rate", "mean_accepted_len",
                  "identical_outputs"):
        assert field in r
    assert r["spec"] == "ngram:n=2:k=4" and r["num_prompts"] == 2
    assert r["identical_outputs"] is True and r["baseline_tokens"] == r["spec_tokens"]
    assert r["baseline_tps"] > 0 and r["spec_tps"] > 0
    assert 0 <= r["acceptance_rate"] <= 1 and r["mean_accepted_len"] >= 1


def test_bench_spec_needs_a_spec(tiny_model_dir, capsys):
    assert main(["bench", "spec", "--model", str(tiny_model_dir("qwen3"))]) == 2
    assert "needs --spec" in capsys.readouterr().err


def test_metrics_export_the_spec_counters(tiny_model_dir):
    from leanlm.serve.metrics import _spec_metrics

    llm = LLM(str(tiny_model_dir("qwen3")), spec="early-exit:2:k=3")
    llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    s = llm.engine.stats().spec
    families = {m.name: m.samples[0] for m in _spec_metrics(s, "tiny")}
    assert families["leanlm:spec_decode_num_draft_tokens"].value == s.drafted > 0
    assert families["leanlm:spec_decode_num_accepted_tokens"].value == s.accepted
    assert families["leanlm:spec_decode_draft_acceptance_rate"].labels == {"model_name": "tiny",
                                                                            "spec": "early-exit:2:k=3"}
    assert families["leanlm:spec_decode_mean_accepted_length"].value == s.mean_accepted_len >= 1


def test_bench_spec_batch_reports_total_throughput_and_the_policy(tiny_model_dir, tmp_path):
    """--batch 2: prompts decoded two at a time with and without the proposer; the JSON says so
    and carries the drafting policy's counters (early-exit:auto's choices)."""
    path = str(tiny_model_dir("qwen3"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["hello world, the quick brown fox", "the lazy dog jumps over the fox",
                                  "a b c d e f g a b c d", "one two three one two three"]))
    out = tmp_path / "spec.json"
    assert main(["bench", "spec", "--model", path, "--spec", "early-exit:auto", "--prompts", str(prompts),
                 "--max-tokens", "10", "--batch", "2", "--spec-max-batch", "8", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["batch"] == 2 and r["spec_max_batch"] == 8 and r["num_prompts"] == 4
    assert r["identical_outputs"] is True and r["baseline_tokens"] == r["spec_tokens"] == 40
    assert r["choices"].get("off", 0) == r["off_cost_steps"] and r["off_batch_steps"] == 0
    # every speculating step chose (a layer and k) or stayed off, one choice per step
    assert 0 < sum(r["choices"].values()) <= r["target_forwards"]
