"""`leanlm serve`: argument handling, loopback by default, the engine shut down on exit."""
from __future__ import annotations

import pytest

from leanlm.cli import build_parser, main


def test_serve_builds_the_app_binds_loopback_and_shuts_down(model_path, monkeypatch):
    """The web server runs in a thread while the engine steps on the main thread; when the web
    server stops, the engine loop ends and `leanlm serve` returns."""
    import threading

    import uvicorn

    from leanlm.engine.async_engine import AsyncLLM

    seen = {}

    def fake_run(self, sockets=None):
        app = self.config.app
        seen.update(app=app, host=self.config.host, port=self.config.port, llm=app.state.async_llm,
                    thread=threading.current_thread())
        assert app.state.async_llm.is_running
        self.started = True  # as if it had bound, served and been stopped

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert main(["serve", str(model_path), "--port", "8123", "--max-num-seqs", "4",
                 "--kv-cache-memory", "64MiB"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert seen["thread"] is not threading.main_thread()  # the engine owns the main thread
    assert isinstance(seen["llm"], AsyncLLM) and not seen["llm"].is_running
    routes = set(seen["app"].openapi()["paths"])
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
            "/tokenize", "/detokenize"} <= routes


def test_serve_reports_a_port_it_cannot_bind(model_path, monkeypatch, capsys):
    import uvicorn

    def fail_to_bind(self, sockets=None):
        raise SystemExit(1)  # what uvicorn does when the address is in use

    monkeypatch.setattr(uvicorn.Server, "run", fail_to_bind)
    assert main(["serve", str(model_path), "--port", "8124", "--kv-cache-memory", "64MiB"]) == 1
    assert "could not start on 127.0.0.1:8124" in capsys.readouterr().err


def test_serve_arguments(capsys):
    args = build_parser().parse_args(["serve", "--api-key", "k", "--served-model-name", "m"])
    assert args.model_pos is None and args.model is None and args.api_key == "k" and args.host == "127.0.0.1"
    assert main(["serve", "a-dir", "--model", "b-dir"]) == 2
    assert "two models given" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "eighty"])
