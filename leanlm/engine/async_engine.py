"""AsyncLLM: an LLMEngine stepped by one background thread, fed from an asyncio event loop.

The engine is not thread-safe, so only its own thread touches it: the event loop sends
commands (add, abort) through a thread-safe queue that the thread drains before each step,
and the thread hands outputs back to per-request asyncio queues with call_soon_threadsafe.
One thread is enough: torch releases the GIL inside its kernels, so the event loop keeps
answering HTTP while a step runs.

Which thread steps the engine matters on the CPU: GNU OpenMP keeps one worker team per thread
that runs torch ops, and once the teams hold more threads than there are cores it stops
spin-waiting between parallel regions, which made every small op ~10x slower (an add of
[64, 576]: 6 -> 61 us) and the whole serving engine 1.8x slower. `leanlm serve` therefore runs
the engine loop on the main thread, the one that loaded the model (`run_engine_loop`), and the
web server in a second thread that never runs torch ops; `start()` (a background engine thread)
remains for embedding AsyncLLM in an application and for tests.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator

from leanlm.config import EngineConfig
from leanlm.engine.engine import LLMEngine
from leanlm.engine.outputs import EngineStats, RequestOutput
from leanlm.engine.sampling import SamplingParams

log = logging.getLogger("leanlm.async_engine")


class EngineDeadError(RuntimeError):
    """The engine thread is not running (shut down, or never started)."""


class EngineStepError(RuntimeError):
    """engine.step() raised while this request was in flight; the request was dropped."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    accepted: concurrent.futures.Future


@dataclass
class _Abort:
    request_id: str


_STOP = object()


class RequestStream:
    """The outputs of one accepted request. Iterate it once; leaving the loop early (break,
    cancellation, a closed generator) aborts the request so its KV blocks are freed."""

    def __init__(self, owner: "AsyncLLM", request_id: str, outputs: asyncio.Queue):
        self.request_id = request_id
        self._owner, self._outputs = owner, outputs
        self.finished = False

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await self._outputs.get()
                if isinstance(item, BaseException):
                    self.finished = True  # the engine thread already dropped it
                    raise item
                if item.finished:
                    self.finished = True
                yield item
                if self.finished:
                    return
        finally:  # GeneratorExit, CancelledError, or a consumer exception
            self.abort()


class AsyncLLM:
    def __init__(self, engine: LLMEngine, start: bool = True):
        self.engine = engine  # once started, only the engine thread may touch it
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.model_path = engine.model_path
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (loop, queue); read and written by the engine thread only
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # snapshots the engine thread publishes (a reference swap is atomic under the GIL)
        self._stats: EngineStats = engine.stats()
        self._num_requests = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False
        if start:
            self.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLM":
        return cls(LLMEngine(config))

    # -- event-loop side ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="leanlm-engine", daemon=True)
            self._thread.start()

    def run_engine_loop(self, on_ready=None) -> None:
        """Step the engine in the calling thread until `shutdown()` (from another thread or a
        signal handler); on CPU, call it from the thread that loaded the model. `on_ready()` runs
        once requests are accepted, before the first step (start the web server there)."""
        if self._thread is not None:
            raise RuntimeError("the engine loop is already running")
        self._thread = threading.current_thread()
        if on_ready is not None:
            on_ready()
        self._run()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str | None = None) -> RequestStream:
        """Queue a request and wait until the engine accepted it; the engine's ValueError for a
        bad prompt (empty, too long, ids out of vocabulary) is raised here, unchanged."""
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # the thread's exit takes the lock too: no add is left unanswered
            if self._thread is None or self._stopped:
                raise EngineDeadError("the engine is not running")
            self._commands.put(_Add(request_id, prompt, params, loop, outputs, accepted))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been added just before the cancel
            raise
        return RequestStream(self, request_id, outputs)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the per-step outputs of one request (the last has `finished=True`)."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:  # closing this generator must abort now, not when the inner one is collected
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished); safe from any thread."""
        self._commands.put(_Abort(request_id))

    def stats(self) -> EngineStats:
        """The engine's stats as of its latest step or command (a copy)."""
        return copy.copy(self._stats)

    def has_unfinished(self) -> bool:
        """Whether the engine holds any request, as of its latest step or command."""
        return self._num_requests > 0 or self._stats.num_running + self._stats.num_waiting > 0

    def shutdown(self, timeout: float = 30.0, wait: bool = True) -> None:
        """Stop the engine loop; requests still in flight fail with EngineDeadError. Waits for
        the loop to end unless wait=False or called on the loop's own thread (a signal handler)."""
        if self._thread is None:
            return
        self._commands.put(_STOP)
        if not wait or self._thread is threading.current_thread():
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the engine thread did not stop within %.0fs", timeout)

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        wait = 0.0  # 0: take only what is queued; None: block until a command comes
        try:
            while True:
                # idle: wait for a command, waking every second so that a main-thread loop
                # still runs signal handlers (Ctrl-C) promptly
                if not self._drain(1.0 if not self.engine.has_unfinished() else wait):
                    break
                if self.engine.has_unfinished():
                    t0 = time.perf_counter()
                    progressed = self._step()
                    # a step that did nothing at once (requests that cannot be scheduled yet)
                    # would spin a core: wait briefly for a command (an abort frees room)
                    wait = 0.0 if progressed or time.perf_counter() - t0 > 1e-3 else 0.01
        except Exception:
            log.exception("the engine thread crashed")
        finally:
            with self._lock:
                self._stopped = True
            while True:  # answer what was queued before the lock closed
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(cmd, _Add) and cmd.accepted.set_running_or_notify_cancel():
                    cmd.accepted.set_exception(EngineDeadError("the engine was shut down"))
            self._fail_all(EngineDeadError, "the engine was shut down")
            self._publish()

    def _drain(self, wait: float | None) -> bool:
        """Apply queued commands, waiting up to `wait` seconds (None: forever) for the first;
        False when asked to stop."""
        while True:
            try:
                cmd = self._commands.get_nowait() if wait == 0 else self._commands.get(timeout=wait)
            except queue.Empty:
                break
            wait = 0
            if cmd is _STOP:
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            else:
                self._abort(cmd.request_id)
        self._publish()
        return True

    def _add(self, cmd: _Add) -> None:
        if not cmd.accepted.set_running_or_notify_cancel():
            return  # the caller gave up before we got to it
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params)
        except BaseException as e:  # ValueError for bad input, reaches the caller as is
            cmd.accepted.set_exception(e)
            return
        self._streams[cmd.request_id] = (cmd.loop, cmd.outputs)
        cmd.accepted.set_result(cmd.request_id)

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        try:
            self.engine.abort(request_id)
        except Exception:
            log.exception("aborting request %s failed", request_id)

    def _step(self) -> bool:
        """One engine step and its delivery; False if it produced no output."""
        try:
            outputs = self.engine.step()
        except Exception as e:
            # Which request broke the step is unknown: fail the ones in flight (freeing their
            # KV blocks) and keep serving the next requests.
            log.exception("engine step failed; failing %d in-flight request(s)", len(self._streams))
            self._fail_all(EngineStepError, f"the engine failed while generating: {e!r}")
            self._publish()
            return True
        self._publish()  # before delivering, so a client that sees its end sees fresh stats
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:
                continue  # aborted by the client in the meantime
            if out.finished:
                del self._streams[out.request_id]
            self._deliver(target, _snapshot(out))
        self._num_requests = len(self._streams)
        return bool(outputs)

    def _fail_all(self, error: type[Exception], message: str) -> None:
        for request_id, target in list(self._streams.items()):
            self._abort(request_id)
            self._deliver(target, error(message))  # one instance each: tasks set __traceback__

    def _publish(self) -> None:
        try:
            self._stats = self.engine.stats()
        except Exception:
            log.exception("engine.stats() failed")
        self._num_requests = len(self._streams)

    @staticmethod
    def _deliver(target, item) -> None:
        loop, outputs = target
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            pass


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy whose lists the engine will not grow after this step (the consumer reads it on
    another thread, possibly steps later)."""
    outputs = [replace(o, token_ids=list(o.token_ids),
                       logprobs=None if o.logprobs is None else list(o.logprobs))
               for o in out.outputs]
    metrics = None if out.metrics is None else replace(out.metrics)
    return replace(out, prompt_token_ids=list(out.prompt_token_ids), outputs=outputs,
                   metrics=metrics, deltas=dict(out.deltas))
