"""`leanlm bench serve` against the real leanlm server (tiny model): every request completes,
token counts come from the server's usage chunks, latencies are ordered sensibly, and the
engine is left with no running requests and no KV blocks in use."""
from leanlm.bench.serve_load import run_serve_bench


def test_bench_serve_against_the_leanlm_server(server, async_llm):
    prompts = [f"hello world number {i}, the quick brown fox" for i in range(12)]
    report = run_serve_bench(server.url, prompts, output_len=8, rate=200.0, max_concurrency=6,
                             seed=1, timeout=60)
    assert report["completed"] == 12 and report["failed"] == 0, report["errors"]
    assert report["model"] == "tiny-llama"  # asked /v1/models
    assert report["requests_without_usage"] == 0
    assert report["output_lens"] == [8] * 12  # ignore_eos + max_tokens, counted by the server
    assert all(n > 0 for n in report["input_lens"])
    assert 0 < report["median_ttft_ms"] <= report["median_e2el_ms"]
    assert report["mean_tpot_ms"] > 0 and report["mean_itl_ms"] > 0
    stats = async_llm.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0
