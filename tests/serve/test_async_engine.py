"""AsyncLLM on its own: streaming, concurrent requests, bad prompts as ValueError, a consumer
that stops early aborts its request, a failing step fails only what was in flight, shutdown."""
from __future__ import annotations

import asyncio

import pytest

from leanlm import SamplingParams
from leanlm.config import EngineConfig
from leanlm.engine.async_engine import AsyncLLM, EngineDeadError, EngineStepError
from tests.serve.conftest import EngineSpy, wait_idle

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def llm(model_path):
    llm = AsyncLLM.from_config(EngineConfig(model=str(model_path), dtype="float32"))
    yield llm
    llm.shutdown()


async def collect(llm, prompt, params=GREEDY, request_id=None):
    return [out async for out in llm.generate(prompt, params, request_id)]


def test_streams_steps_and_serves_requests_concurrently(llm):
    async def main():
        return await asyncio.gather(collect(llm, [5, 6, 7]), collect(llm, "hello world"),
                                    collect(llm, [5, 6, 7]))

    a, b, c = asyncio.run(main())
    for outs in (a, b, c):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert len(outs[-1].outputs[0].token_ids) == 8
        # snapshots: an earlier output is not grown by later steps
        assert [len(o.outputs[0].token_ids) for o in outs] == sorted({len(o.outputs[0].token_ids) for o in outs})
        assert "".join(o.deltas.get(0, "") for o in outs) == outs[-1].outputs[0].text
    assert a[-1].outputs[0].token_ids == c[-1].outputs[0].token_ids
    assert wait_idle(llm)


def test_bad_prompt_raises_value_error_and_changes_nothing(llm):
    for prompt, words in (([], "empty"), ([5, 10_000], "vocabulary"), ([5] * 300, "context")):
        with pytest.raises(ValueError, match=words):
            asyncio.run(collect(llm, prompt))
    assert wait_idle(llm) and asyncio.run(collect(llm, [5]))[-1].finished


def test_consumer_that_stops_early_aborts_the_request(llm, monkeypatch):
    spy = EngineSpy(llm.engine, monkeypatch)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def take_two():
        seen = 0
        async for _ in llm.generate([5, 6], long, "early"):
            seen += 1
            if seen == 2:
                break

    async def cancelled():
        task = asyncio.ensure_future(collect(llm, [5, 6], long, "cancelled"))
        while "cancelled" not in spy.tokens:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(take_two())
    asyncio.run(cancelled())
    assert wait_idle(llm)
    assert set(spy.aborted) == {"early", "cancelled"}
    spy.assert_aborted_early(200)


def test_failing_step_fails_in_flight_requests_and_keeps_serving(llm, monkeypatch):
    step = llm.engine.step
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return step()

    monkeypatch.setattr(llm.engine, "step", flaky)
    with pytest.raises(EngineStepError, match="boom"):
        asyncio.run(collect(llm, [5, 6, 7]))
    assert wait_idle(llm) and llm.is_running
    assert asyncio.run(collect(llm, [5, 6, 7]))[-1].finished


def test_shutdown_fails_in_flight_requests_and_refuses_new_ones(llm):
    async def main():
        task = asyncio.ensure_future(collect(llm, [5], SamplingParams(max_tokens=200, ignore_eos=True)))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(llm.shutdown)
        with pytest.raises(EngineDeadError):
            await task
        with pytest.raises(EngineDeadError):
            await collect(llm, [5])

    asyncio.run(main())
    assert not llm.is_running
