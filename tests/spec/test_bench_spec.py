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
