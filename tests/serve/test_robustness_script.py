"""benchmarks/serve_robustness.py on a tiny random llama: it starts real `leanlm serve`
processes, survives 20 concurrent streams with 4 client disconnects and forces preemption on a
tight KV budget, and reports both checks as passing with sane numbers."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import save_tiny_model

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_robustness.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("serve_robustness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_script_passes_on_a_tiny_model(script, tmp_path):
    model = save_tiny_model("llama", tmp_path / "tiny")
    out = tmp_path / "robustness.json"
    rc = script.main([
        "--model", str(model), "--dtype", "float32", "--builtin-prompts", "--max-prompt-tokens", "32",
        "--num-requests", "20", "--max-tokens", "16",
        "--num-tight-requests", "8", "--tight-max-tokens", "48",
        "--startup-timeout", "60", "--request-timeout", "60", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, json.dumps(report["checks"], indent=1)[:3000]
    assert report["passed"] is True

    load = report["checks"]["load_disconnect"]
    assert load["passed"] and load["failures"] == []
    assert load["requests"] == 20 and load["planned_disconnects"] == 4
    assert load["disconnected"] == 4
    assert load["completed"] == 16 and load["incomplete_streams"] == 0
    assert load["http_5xx"] == 0 and load["stream_errors"] == 0
    assert sum(load["status_counts"].values()) == 20
    assert load["after"] == {**load["after"], "num_requests_running": 0, "num_requests_waiting": 0,
                             "kv_blocks_used": 0}
    assert 0 <= load["max_running_seen"] <= 20  # sampled by scrapes: a fast run may show 0
    assert 0 <= load["server_abort_count"] <= 4
    assert load["completion_tokens"] <= 16 * 16

    pre = report["checks"]["preemption"]
    assert pre["passed"] and pre["failures"] == []
    assert pre["requests"] == 8 and pre["preemptions"] > 0
    assert pre["equal"] == 8 and pre["different"] == 0
    assert pre["reference_failed"] == 0 and pre["tight_failed"] == 0
    assert pre["kv_blocks_used_after"] == 0
    assert 0 < pre["kv_blocks_total"] < pre["needed_blocks"]
    assert pre["bytes_per_token"] == 3 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head dim x fp32


def test_bytes_per_token_and_budget(script, tmp_path):
    model = save_tiny_model("llama", tmp_path / "tiny")
    assert script.bytes_per_token(str(model), "bfloat16")[0] == 3 * 2 * 2 * 16 * 2
    args = script.build_parser().parse_args(["--tight-max-tokens", "16"])
    memory, max_len, facts = script.tight_budget(args, 768, [[1] * 48] * 8, context=256)
    # 8 requests of 64 tokens: 32 blocks needed, a quarter is 8 blocks = 128 tokens >= 64
    assert facts["needed_blocks"] == 32 and max_len == 128
    assert int(memory) == 8 * 16 * 768


def test_metrics_parser(script):
    text = ('# HELP x\nleanlm:kv_blocks_used{model_name="m"} 3.0\n'
            'leanlm:request_success_total{finished_reason="abort",model_name="m"} 4.0\n'
            'leanlm:request_success_total{finished_reason="length",model_name="m"} 2.0\n')
    samples = script.parse_metrics(text)
    assert script.metric(samples, "leanlm:kv_blocks_used") == 3
    assert script.metric(samples, "leanlm:request_success_total", finished_reason="abort") == 4
    assert script.metric(samples, "leanlm:request_success_total") == 6
    assert script.metric(samples, "leanlm:num_preemptions_total") is None


def test_help(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    assert "--tight-kv-memory" in capsys.readouterr().out
