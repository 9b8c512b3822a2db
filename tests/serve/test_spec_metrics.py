"""/metrics of a speculating server (early-exit:auto on a tiny model whose last layer is nearly an
identity, so DEL drafts from layer 2; spec_max_batch=1, so a request with n=2 decodes without
drafts): every SpecStats counter is exported, with the engine's values, after real requests."""
from __future__ import annotations

import pytest

from tests.serve.conftest import ServerThread, wait_idle
from tests.serve.test_server import scrape
from tests.spec.test_dynamic_exit import scaled_model

SPEC = "early-exit:auto"


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir, tmp_path_factory):
    from leanlm.config import EngineConfig
    from leanlm.engine.async_engine import AsyncLLM
    from leanlm.serve.app import build_app

    path = scaled_model(str(tiny_model_dir("qwen3")), tmp_path_factory.mktemp("del") / "m", 0.02)
    llm = AsyncLLM.from_config(EngineConfig(model=path, dtype="float32", seed=0, spec=SPEC, spec_max_batch=1))
    srv = ServerThread(build_app(llm, "tiny-del")).start()
    yield srv, llm
    srv.stop()
    llm.shutdown()


def test_metrics_export_the_speculation_counters(spec_server):
    import httpx

    srv, llm = spec_server
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for n in (1, 2):  # n=2: two decoding sequences > spec_max_batch: steps without drafting
            r = http.post("/v1/completions", json=dict(model="tiny-del", prompt=[5, 9, 17, 33, 65, 129, 7],
                                                      max_tokens=24, temperature=0, n=n, ignore_eos=True))
            assert r.status_code == 200, r.text
        assert wait_idle(llm)
        got = scrape(http)
    s = llm.stats().spec
    assert s.spec.startswith(SPEC)  # the label: the canonical spec

    def value(name, **labels):
        return got[(f"leanlm:{name}", tuple(sorted({"spec": s.spec, **labels}.items())))]

    assert value("spec_decode_num_draft_tokens_total") == s.drafted > 0
    assert value("spec_decode_num_accepted_tokens_total") == s.accepted > 0
    assert value("spec_decode_num_verifications_total") == s.verifications > 0
    assert value("spec_decode_num_target_forwards_total") == s.target_forwards
    assert value("spec_decode_draft_acceptance_rate") == pytest.approx(s.accepted / s.drafted)
    assert value("spec_decode_mean_accepted_length") == pytest.approx(s.emitted / s.verifications)
    assert value("spec_decode_acceptance_estimate") == pytest.approx(s.acceptance_estimate)
    # steps turned off: by the batch cap (the n=2 request) and by the cost model
    assert value("spec_decode_num_drafting_off_steps_total", reason="batch_cap") == s.off_batch > 0
    assert value("spec_decode_num_drafting_off_steps_total", reason="cost_model") == s.off_cost
    # DEL's choices: exit layer and draft length per step, the latest choice, per-layer acceptance
    assert s.exit_layers[2] > 0  # it drafted from the agreeing layer
    for layer, steps in s.exit_layers.items():
        assert value("spec_decode_num_steps_by_exit_layer_total", exit_layer=str(layer)) == steps
    for k, steps in s.draft_lengths.items():
        assert value("spec_decode_num_steps_by_draft_length_total", draft_length=str(k)) == steps
    assert sum(s.draft_lengths.values()) == sum(s.exit_layers.values()) == sum(s.choices.values())
    assert s.draft_lengths[0] == s.exit_layers[0] == s.off_cost
    assert value("spec_decode_exit_layer") == s.exit_layer
    assert value("spec_decode_draft_length") == s.draft_length
    assert set(s.layer_acceptance) == {1, 2} and s.layer_acceptance[2] > 0.8
    for layer, alpha in s.layer_acceptance.items():
        assert value("spec_decode_layer_acceptance_estimate", layer=str(layer)) == pytest.approx(alpha)
    # the scrape reads a snapshot, not the speculator's live counters
    live = llm.engine.speculator.stats
    assert s.choices is not live.choices and s.exit_layers is not live.exit_layers
