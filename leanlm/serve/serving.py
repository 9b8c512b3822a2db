"""/v1/completions and /v1/chat/completions on top of AsyncLLM: prompt checks, sampling
parameters, and the OpenAI response / SSE chunk formats (logprobs included)."""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.exceptions import TemplateError

from leanlm.engine.async_engine import AsyncLLM, EngineDeadError, EngineStepError, RequestStream
from leanlm.engine.outputs import CompletionOutput, Logprob, RequestOutput
from leanlm.serve.metrics import ServerMetrics
from leanlm.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest


class SSEResponse(StreamingResponse):
    """Ends its request however the response ends: Starlette cancels the send loop when the
    client disconnects, which can leave the generator suspended at a `yield` until it is
    garbage collected (or never started); closing here aborts the request right away."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # a generator that never started runs no `finally` on aclose: hence on_close too
            self.on_close()
            await self.body_iterator.aclose()


# Characters that str.splitlines (and so httpx's aiter_lines and many clients) treat as line
# breaks although SSE does not: escaped, a JSON payload cannot be split in two by the client.
# (json.dumps already escapes the ASCII control characters among them.)
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(
        payload, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)
    return f"data: {data}\n\n"


def _finite(x: float) -> float:
    # JSON has no -Infinity; OpenAI's floor for "impossible" is about this (vLLM uses it too)
    return x if math.isfinite(x) else -9999.0


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, model_name: str, metrics: ServerMetrics):
        self.llm, self.model_name, self.metrics = llm, model_name, metrics

    # -- requests ------------------------------------------------------------------------------
    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        req.check_unsupported()
        prompt = req.single_prompt()
        ids = self.llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_context(len(ids), req.max_tokens, "max_tokens", "prompt")
        params = req.sampling_params(req.max_tokens, req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = await self._start(ids, params, rid)
        fmt = _CompletionFormat(rid, self.model_name, req.logprobs is not None)
        return await self._respond(stream, fmt, req, request)

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        req.check_unsupported()
        try:
            ids = self.llm.tokenizer.encode_chat([m.as_dict() for m in req.messages],
                                                 req.add_generation_prompt)
        except (ValueError, TemplateError) as e:
            raise APIError(400, f"the messages do not fit the chat template: {e}", param="messages") from None
        max_tokens, field = req.output_limit
        self._check_context(len(ids), max_tokens, field, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = req.sampling_params(max_tokens, logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self._start(ids, params, rid)
        fmt = _ChatFormat(rid, self.model_name, req.n, req.logprobs, req.top_logprobs or 0)
        return await self._respond(stream, fmt, req, request)

    def _check_context(self, prompt_len: int, max_tokens: int | None, field: str, param: str) -> None:
        limit = self.llm.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the "
                                f"prompt has {prompt_len} tokens (room for at least one output token "
                                f"is needed). Shorten the {param}.",
                           param=param, code="context_length_exceeded")
        if isinstance(max_tokens, int) and max_tokens >= 1 and prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
                                f"{param}, {max_tokens} for the completion). Reduce the length of the "
                                f"{param} or {field} (at most {limit - prompt_len}).",
                           param=field, code="context_length_exceeded")

    async def _start(self, ids: list[int], params, rid: str) -> RequestStream:
        try:
            return await self.llm.add_request(ids, params, rid)
        except ValueError as e:  # the engine's word on a bad prompt
            raise APIError(400, str(e), param="prompt") from None
        except EngineDeadError as e:
            raise APIError(503, str(e)) from None

    async def _respond(self, stream: RequestStream, fmt, req, request: Request) -> Response:
        tracked = _Tracked(stream, self.metrics)
        if req.stream:
            return SSEResponse(self._events(tracked, fmt, req.include_usage), on_close=tracked.close)
        work = asyncio.ensure_future(self._collect(tracked))
        # A non-streamed reply has no send to fail: watch for the client leaving instead, and
        # cancel the work (which aborts the request) when it does.
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            tracked.close()
        if work.cancelled():
            return Response(status_code=499)  # nobody is listening; nginx's "client closed"
        return JSONResponse(fmt.response(work.result()))

    @staticmethod
    async def _collect(tracked: "_Tracked") -> RequestOutput:
        async for _ in tracked:
            pass
        return _failed(tracked.last)

    @staticmethod
    async def _events(tracked: "_Tracked", fmt, include_usage: bool) -> AsyncIterator[str]:
        try:
            for chunk in fmt.first_chunks():
                yield sse(chunk)
            async for out in tracked:
                for chunk in fmt.chunks(out):
                    yield sse(chunk)
            last = _failed(tracked.last)
            if include_usage:
                yield sse(fmt.usage_chunk(last))
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # headers are sent: the error goes in the stream, as OpenAI does
            yield sse(APIError(500, f"generation failed: {e}").body())
        finally:
            tracked.close()
        yield sse("[DONE]")


class _Tracked:
    """A request's outputs. `close()` (idempotent; every exit path calls it) aborts the request
    if it is still running and records it in the metrics exactly once."""

    def __init__(self, stream: RequestStream, metrics: ServerMetrics):
        self.stream, self.metrics = stream, metrics
        self.last: RequestOutput | None = None
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self.stream:
                self.last = out
                yield out
        except EngineStepError as e:
            raise APIError(500, str(e)) from None
        except EngineDeadError as e:
            raise APIError(503, str(e)) from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stream.abort()
            self.metrics.observe(self.last, aborted=self.last is None or not self.last.finished)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _failed(last: RequestOutput | None) -> RequestOutput:
    if last is None or not last.finished:
        raise APIError(500, "the request ended without a result")
    return last


def _usage(out: RequestOutput) -> dict:
    prompt, completion = len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(o: CompletionOutput) -> str | None:
    return None if o.finish_reason is None else ("length" if o.finish_reason == "length" else "stop")


class _Format:
    """Tracks what each choice has been sent so far, so a stream sends each token once."""

    object_name = chunk_object = ""

    def __init__(self, rid: str, model: str):
        self.rid, self.model, self.created = rid, model, int(time.time())
        self.sent_tokens: dict[int, int] = {}
        self.done: set[int] = set()

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def first_chunks(self) -> list[dict]:
        return []

    def chunks(self, out: RequestOutput) -> list[dict]:
        """One chunk per choice that gained text or tokens or finished in this step."""
        chunks = []
        for o in out.outputs:
            if o.index in self.done:
                continue
            start = self.sent_tokens.get(o.index, 0)
            self.sent_tokens[o.index] = len(o.token_ids)
            delta = out.deltas.get(o.index, "")
            if delta or o.finished or (o.logprobs is not None and len(o.token_ids) > start):
                if o.finished:
                    self.done.add(o.index)
                chunks.append(self._envelope(self.chunk_object, [self.chunk_choice(o, delta, start)]))
        return chunks

    def usage_chunk(self, out: RequestOutput) -> dict:
        return self._envelope(self.chunk_object, [], usage=_usage(out))

    def response(self, out: RequestOutput) -> dict:
        return self._envelope(self.object_name, [self.choice(o) for o in out.outputs], usage=_usage(out))


class _CompletionFormat(_Format):
    object_name = chunk_object = "text_completion"

    def __init__(self, rid: str, model: str, logprobs: bool):
        super().__init__(rid, model)
        self.logprobs = logprobs
        self.text_offset: dict[int, int] = {}

    def _logprobs(self, o: CompletionOutput, start: int) -> dict | None:
        if not self.logprobs or o.logprobs is None:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = self.text_offset.get(o.index, 0)
        for tid, entry in zip(o.token_ids[start:], o.logprobs[start:]):
            chosen = entry[tid]
            tokens.append(chosen.decoded_token)
            token_logprobs.append(_finite(chosen.logprob))
            top.append({lp.decoded_token: _finite(lp.logprob) for lp in entry.values()})
            offsets.append(offset)
            offset += len(chosen.decoded_token or "")
        self.text_offset[o.index] = offset
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                "text_offset": offsets}

    def choice(self, o: CompletionOutput) -> dict:
        return {"index": o.index, "text": o.text, "logprobs": self._logprobs(o, 0),
                "finish_reason": _finish_reason(o), "stop_reason": o.stop_reason}

    def chunk_choice(self, o: CompletionOutput, delta: str, start: int) -> dict:
        return {"index": o.index, "text": delta, "logprobs": self._logprobs(o, start),
                "finish_reason": _finish_reason(o), "stop_reason": o.stop_reason}


class _ChatFormat(_Format):
    object_name, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, rid: str, model: str, n: int, logprobs: bool, top_logprobs: int):
        super().__init__(rid, model)
        self.n, self.logprobs, self.top_logprobs = n, logprobs, top_logprobs

    @staticmethod
    def _token(lp: Logprob) -> dict:
        text = lp.decoded_token or ""
        return {"token": text, "logprob": _finite(lp.logprob), "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, o: CompletionOutput, start: int) -> dict | None:
        if not self.logprobs or o.logprobs is None:
            return None
        content = []
        for tid, entry in zip(o.token_ids[start:], o.logprobs[start:]):
            ranked = sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda lp: lp.rank)
            content.append({**self._token(entry[tid]),
                            "top_logprobs": [self._token(lp) for lp in ranked[:self.top_logprobs]]})
        return {"content": content, "refusal": None}

    def first_chunks(self) -> list[dict]:
        # OpenAI opens each choice with the role, before any content
        return [self._envelope(self.chunk_object, [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]) for i in range(self.n)]

    def choice(self, o: CompletionOutput) -> dict:
        return {"index": o.index, "message": {"role": "assistant", "content": o.text},
                "logprobs": self._logprobs(o, 0), "finish_reason": _finish_reason(o),
                "stop_reason": o.stop_reason}

    def chunk_choice(self, o: CompletionOutput, delta: str, start: int) -> dict:
        return {"index": o.index, "delta": {"content": delta} if delta else {},
                "logprobs": self._logprobs(o, start), "finish_reason": _finish_reason(o),
                "stop_reason": o.stop_reason}


