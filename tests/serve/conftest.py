"""A real server for the serve tests: a tiny llama, one AsyncLLM (float32), and uvicorn in a
thread on a free 127.0.0.1 port, shared by the whole test session."""
from __future__ import annotations

import socket
import threading
import time

import pytest

MODEL_NAME = "tiny-llama"
API_KEY = "test-secret"


class ServerThread:
    """uvicorn.Server on an already-bound socket (no port race), stopped by `stop()`."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="session")
def model_path(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def async_llm(model_path):
    from leanlm.config import EngineConfig
    from leanlm.engine.async_engine import AsyncLLM

    llm = AsyncLLM.from_config(EngineConfig(model=str(model_path), dtype="float32", seed=0))
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def server(async_llm):
    from leanlm.serve.app import build_app

    srv = ServerThread(build_app(async_llm, MODEL_NAME)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def keyed_server(async_llm):
    """A second app on the same engine, with an API key and a small body limit."""
    from leanlm.serve.app import build_app

    srv = ServerThread(build_app(async_llm, MODEL_NAME, api_key=API_KEY, max_body_bytes=4096)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def wait_idle(async_llm, timeout: float = 5.0) -> bool:
    """True once the engine holds no request (within `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = async_llm.stats()
        if not async_llm.has_unfinished() and s.num_running == 0 and s.num_waiting == 0:
            return True
        time.sleep(0.01)
    return False


class EngineSpy:
    """Watches the engine from its own thread: which requests it finished, how many tokens
    each got, and which were aborted (to tell an abort from a request that just ran out)."""

    def __init__(self, engine, monkeypatch):
        self.finished: set[str] = set()
        self.aborted: list[str] = []
        self.tokens: dict[str, int] = {}
        step, abort = engine.step, engine.abort

        def spy_step():
            outs = step()
            for o in outs:
                self.tokens[o.request_id] = max(len(c.token_ids) for c in o.outputs)
                if o.finished:
                    self.finished.add(o.request_id)
            return outs

        def spy_abort(request_id):
            self.aborted.append(request_id)
            abort(request_id)

        monkeypatch.setattr(engine, "step", spy_step)
        monkeypatch.setattr(engine, "abort", spy_abort)

    def assert_aborted_early(self, max_tokens: int) -> None:
        assert self.aborted, "nothing was aborted"
        for rid in self.aborted:
            assert rid not in self.finished, f"{rid} ran to its end instead of being aborted"
            assert self.tokens.get(rid, 0) < max_tokens


@pytest.fixture
def engine_spy(async_llm, monkeypatch):
    return EngineSpy(async_llm.engine, monkeypatch)
