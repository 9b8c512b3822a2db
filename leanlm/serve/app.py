"""The FastAPI app: routes, API-key check, body size limit, OpenAI-schema errors.

Routes (all JSON unless noted):
  POST /v1/completions, POST /v1/chat/completions   (SSE with "stream": true)
  GET  /v1/models, GET /v1/models/{model}
  POST /tokenize, POST /detokenize
  GET  /health, GET /metrics (Prometheus text)

With an API key, every route needs `Authorization: Bearer KEY` except /health and /metrics:
load balancers and Prometheus scrapers probe those without credentials, and they reveal no
request content (the server binds 127.0.0.1 unless told otherwise).
"""
from __future__ import annotations

import logging
import secrets
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from jinja2.exceptions import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from leanlm.engine.async_engine import AsyncLLM
from leanlm.serve.metrics import CONTENT_TYPE, ServerMetrics
from leanlm.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                   DetokenizeRequest, TokenizeRequest, parse_body)
from leanlm.serve.serving import OpenAIServing

log = logging.getLogger("leanlm.serve")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20  # a full context of token ids as JSON is far below this


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes (by its
    Content-Length, or while reading a chunked body) so it is never held in memory."""
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                       code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(async_llm: AsyncLLM, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    metrics = ServerMetrics(async_llm, served_model_name)
    serving = OpenAIServing(async_llm, served_model_name, metrics)
    created = int(time.time())
    app = FastAPI(title="leanlm", summary="OpenAI-compatible leanlm server")
    app.state.async_llm, app.state.metrics = async_llm, metrics

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{served_model_name}`.", param="model", code="model_not_found")

    async def body(model, request: Request):
        req = parse_body(model, await read_body(request, max_body_bytes))
        check_model(req.model)
        return req

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "leanlm",
                "root": str(async_llm.model_path), "max_model_len": async_llm.max_model_len}

    api = APIRouter(dependencies=[Depends(authorize)])

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await serving.completion(await body(CompletionRequest, request), request)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serving.chat(await body(ChatCompletionRequest, request), request)

    @api.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{model:path}")
    async def get_model(model: str):
        check_model(model)
        return model_card()

    @api.post("/tokenize")
    async def tokenize(request: Request):
        req = await body(TokenizeRequest, request)
        tok = async_llm.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' (a string) or 'messages'", param="prompt")
        if req.prompt is not None:
            tokens = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            try:
                tokens = tok.encode_chat([m.as_dict() for m in req.messages], req.add_generation_prompt)
            except (ValueError, TemplateError) as e:
                raise APIError(400, f"the messages do not fit the chat template: {e}",
                               param="messages") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": async_llm.max_model_len}

    @api.post("/detokenize")
    async def detokenize(request: Request):
        req = await body(DetokenizeRequest, request)
        bad = [t for t in req.tokens if not 0 <= t < async_llm.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {async_llm.vocab_size})",
                           param="tokens")
        return {"prompt": async_llm.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    app.include_router(api)

    @app.get("/health")
    async def health():
        if not async_llm.is_running:
            raise APIError(503, "the engine is not running")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    _install_error_handlers(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, in OpenAI's schema."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = f"{e.detail}: {request.method} {request.url.path}"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, f"invalid request: {e.errors()}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal server error: {type(e).__name__}: {e}").body(),
                            status_code=500)
