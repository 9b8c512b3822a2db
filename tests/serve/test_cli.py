"""`leanlm serve`: argument handling, loopback by default, the engine shut down on exit."""
from __future__ import annotations

import pytest

from leanlm.cli import build_parser, main


def test_serve_builds_the_app_binds_loopback_and_shuts_down(model_path, monkeypatch):
    import uvicorn

    from leanlm.engine.async_engine import AsyncLLM

    seen = {}

    def fake_run(app, host, port, log_level):
        seen.update(app=app, host=host, port=port, llm=app.state.async_llm)
        assert app.state.async_llm.is_running

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", str(model_path), "--port", "8123", "--max-num-seqs", "4",
                 "--kv-cache-memory", "64MiB"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert isinstance(seen["llm"], AsyncLLM) and not seen["llm"].is_running
    routes = set(seen["app"].openapi()["paths"])
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
            "/tokenize", "/detokenize"} <= routes


def test_serve_arguments(capsys):
    args = build_parser().parse_args(["serve", "--api-key", "k", "--served-model-name", "m"])
    assert args.model_pos is None and args.model is None and args.api_key == "k" and args.host == "127.0.0.1"
    assert main(["serve", "a-dir", "--model", "b-dir"]) == 2
    assert "two models given" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "eighty"])
