"""The cost model's inputs measured at load: β (each further token in a forward) and a draft
model's step cost relative to the target's."""
import time

import pytest
import torch

from leanlm import LLM
from leanlm.spec import cost
from leanlm.spec.cost import TOKEN_COST, TOKEN_COST_RANGE, calibrate_token_cost, time_linears


class _Timed(torch.nn.Module):
    """Stands in for a model: its one 'linear' sleeps a + b * rows milliseconds."""

    def __init__(self, a, b):
        super().__init__()
        from leanlm.models.layers import Linear

        class Slow(Linear):
            def forward(self, x):
                time.sleep((a + b * x.shape[0]) / 1000)
                return x

        self.lin = Slow(4, 4)
        self.embed_tokens = torch.nn.Embedding(2, 4)
        self.dtype = torch.float32


@pytest.mark.parametrize("a, b", [(20.0, 1.0), (10.0, 5.0)])
def test_beta_is_measured_from_the_forward_times(a, b):
    # a forward of r rows takes a + b r: beta = b / (a + b)
    beta = calibrate_token_cost(_Timed(a, b))
    assert beta == pytest.approx(b / (a + b), rel=0.35)


def test_beta_is_clamped():
    assert calibrate_token_cost(_Timed(20.0, 0.0)) >= TOKEN_COST_RANGE[0]
    assert calibrate_token_cost(_Timed(0.1, 50.0)) <= TOKEN_COST_RANGE[1]


def test_time_linears_covers_every_linear_once(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")))
    calls = []
    for m in cost._linears(llm.engine.model):
        m.register_forward_hook(lambda mod, i, o: calls.append(mod))
    time_linears(llm.engine.model, [1, 3], repeats=1)
    n = len(cost._linears(llm.engine.model))
    assert n == 4 * llm.engine.model.cfg.num_layers + 1  # qkv, o, gate_up, down per layer + head
    assert len(calls) == 2 * 2 * n and len(set(map(id, calls))) == n  # (warm-up + 1) x 2 sizes


def test_engine_reports_what_it_measured(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, spec="self:rtn:int8")
    s = llm.engine.speculator
    lo, hi = TOKEN_COST_RANGE
    assert lo <= s.cost.token_cost <= hi and s.stats.token_cost == s.cost.token_cost
    assert s.proposer.draft_cost > 0 and s.stats.draft_cost == s.proposer.draft_cost
    off = LLM(path, spec="self:rtn:int8", spec_calibrate=False).engine.speculator
    assert off.cost.token_cost == TOKEN_COST
    from leanlm.spec.cost import step_bytes

    assert off.proposer.draft_cost == pytest.approx(step_bytes(off.proposer.model) / step_bytes(llm.engine.model))
