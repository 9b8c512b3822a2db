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


# --- the llama.cpp peer -------------------------------------------------------------------------
# CI does not compile llama.cpp, so these tests run the peer against a stand-in module with the
# llama-cpp-python surface the peer uses; docs/BENCHMARKS.md has the real runs.

def _fake_llama_cpp(monkeypatch, loads: list):
    import sys
    import types

    class ModelParams:  # llama.cpp's default: extra (AMX / repack) buffer types on
        use_extra_bufts = True

    low = types.SimpleNamespace(llama_model_default_params=ModelParams)

    class Llama:
        def __init__(self, path, **kwargs):
            # as llama-cpp-python does: the model params come from the low-level default
            loads.append(dict(kwargs, path=path, params=low.llama_model_default_params()))

        def reset(self):
            pass

        def eval(self, ids):
            assert len(ids) > 0

        def generate(self, ids, **kwargs):
            assert kwargs["temp"] == 0.0 and kwargs["top_k"] == 1
            while True:
                yield 7

    module = types.ModuleType("llama_cpp")
    module.llama_cpp, module.Llama, module.__version__ = low, Llama, "stand-in"
    module.llama_model_default_params = low.llama_model_default_params
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    return low, ModelParams


@pytest.fixture(scope="module")
def tiny_gguf_file(tmp_path_factory):
    from tests.models.test_gguf import tiny_model, write_gguf

    path = tmp_path_factory.mktemp("peer") / "tiny.gguf"
    write_gguf(path, tiny_model("llama"))
    return path


def test_llama_cpp_peer_loads_without_extra_buffers_and_reports_its_gguf(llm, tiny_gguf_file, monkeypatch):
    loads = []
    low, original = _fake_llama_cpp(monkeypatch, loads)
    r = run_latency(llm, prompt_len=10, gen_len=3, repeats=2, model="tiny", vs="llama.cpp",
                    peer_options={"peer_gguf": tiny_gguf_file})
    assert len(loads) == 1 and loads[0]["path"] == str(tiny_gguf_file)
    assert loads[0]["params"].use_extra_bufts is False              # the AMX crash workaround
    assert low.llama_model_default_params is original               # and only during the load
    assert loads[0]["n_threads"] == loads[0]["n_threads_batch"] == torch.get_num_threads()
    peer = r["peer"]
    assert peer["name"] == "llama.cpp" and peer["gguf"] == str(tiny_gguf_file) and peer["gguf_type"] == "F32"
    assert peer["version"] == "stand-in" and len(peer["tg3_runs"]) == 2
    assert r["ratio_tg3"] == pytest.approx(r["tg3_tps"] / peer["tg3_tps"])
    assert peer["bandwidth_gbs"] == pytest.approx(peer["weight_bytes"] * peer["tg3_tps"] / 1e9)
    import gguf

    matrices = [t for t in gguf.GGUFReader(str(tiny_gguf_file)).tensors if len(t.shape) >= 2]
    assert peer["weight_bytes"] == 4 * sum(int(t.shape.prod()) for t in matrices)  # F32 file


def test_llama_cpp_peer_gguf_matches_leanlm_quantization(tiny_gguf_file, tmp_path, monkeypatch):
    import gguf

    from leanlm.bench.peers import peer_gguf_for

    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    plain = LLM(str(tiny_gguf_file), dtype="float32")
    assert peer_gguf_for(plain, tiny_gguf_file) == tiny_gguf_file   # F32 file, float32 run: as is
    int8 = LLM(str(tiny_gguf_file), dtype="float32", quant="rtn:int8")
    q8 = peer_gguf_for(int8, tiny_gguf_file)
    assert q8.parent == tmp_path / "cache" / "gguf" and q8.name.endswith(".Q8_0.gguf")
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(str(q8)).tensors
             if len(t.shape) >= 2 and t.name != "token_embd.weight"}
    assert types == {"Q8_0"}
    stamp = q8.stat().st_mtime_ns
    assert peer_gguf_for(int8, tiny_gguf_file) == q8 and q8.stat().st_mtime_ns == stamp  # converted once
    assert peer_gguf_for(int8, tiny_gguf_file, "Q4_1").name.endswith(".Q4_1.gguf")
    with pytest.raises(ValueError, match="GGUF file"):
        peer_gguf_for(int8, None)
    nf4 = LLM(str(tiny_gguf_file), dtype="float32", quant="rtn:nf4:g32")
    with pytest.raises(ValueError, match="no llama.cpp type matches 'nf4'"):
        peer_gguf_for(nf4, tiny_gguf_file)


def test_llama_cpp_peer_missing_is_a_clear_error(llm, tiny_gguf_file, monkeypatch, tiny_model_dir, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ValueError, match=r"leanlm\[peers\]"):
        run_latency(llm, prompt_len=10, gen_len=3, repeats=1, vs="llama.cpp",
                    peer_options={"peer_gguf": tiny_gguf_file})
    assert main(["bench", "latency", "--model", str(tiny_model_dir("llama")), "--peer-gguf", "x.gguf"]) == 2
    assert "--peer-gguf and --peer-gguf-type go with --vs llama.cpp" in capsys.readouterr().err


def test_context_flag_decodes_from_a_long_prompt_and_reports_the_kv_codec(tiny_model_dir, tmp_path, monkeypatch):
    """--context C: the tg row's prompt has C tokens (each step attends to >= C cached tokens);
    the JSON names the codec and its bytes per token."""
    import leanlm.bench.latency as latency

    seen = []
    real = latency.measure
    monkeypatch.setattr(latency, "measure", lambda t, pp, tg, g, r: seen.append(len(tg)) or real(t, pp, tg, g, r))
    out = tmp_path / "lat.json"
    model = str(tiny_model_dir("llama"))
    assert main(["bench", "latency", "--model", model, "--prompt-len", "8", "--gen-len", "4", "--repeats", "1",
                 "--kv", "kivi:4", "--context", "100", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert seen == [100] and r["context"] == 100 and r["tg4_tps"] > 0
    assert (r["kv"], r["kv_bytes_per_token"]) == ("kivi:4:g16", 144)  # 3 layers x 2 heads x (16 + 4 + 4)
    assert r["kv_compression"] == round(2 * 3 * 2 * 16 * 2 / 144, 4)


def test_context_that_does_not_fit_is_a_clear_error(llm):
    limit = llm.engine.max_model_len
    with pytest.raises(ValueError, match=f"context {limit} \\+ gen_len=4 does not fit"):
        run_latency(llm, prompt_len=8, gen_len=4, repeats=1, context=limit)
