"""Request bodies of the OpenAI-compatible API (pydantic) and the OpenAI error schema.

Models are strict (no "1" -> 1 coercion, as OpenAI's own API) and ignore unknown fields, so
clients that send extra OpenAI fields (user, metadata, ...) still work. Fields a client may
set that would silently change the meaning of a request if ignored (echo, suffix, tools) are
rejected instead.
"""
from __future__ import annotations

import itertools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from leanlm.engine.sampling import MAX_LOGPROBS, SamplingParams


class APIError(Exception):
    """An error answered in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None  # None: OpenAI's default, 1
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extras, as vLLM's
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams for this request; its ValueError (a value out of range) becomes a
        400 naming the field."""
        def pick(value, default):
            return default if value is None else value

        try:
            return SamplingParams(
                n=self.n, temperature=pick(self.temperature, 1.0), top_p=pick(self.top_p, 1.0),
                top_k=pick(self.top_k, 0), min_p=pick(self.min_p, 0.0),
                repetition_penalty=pick(self.repetition_penalty, 1.0),
                presence_penalty=pick(self.presence_penalty, 0.0),
                frequency_penalty=pick(self.frequency_penalty, 0.0),
                max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, seed=self.seed,
                logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output)
        except ValueError as e:  # messages start with the field's name: "top_p must be ..."
            field = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param=field if field in type(self).model_fields else None) from None


class CompletionRequest(_Sampling):
    # a string, token ids, or a list holding one of those (several prompts: rejected)
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_unsupported(self) -> None:
        if self.echo:
            raise APIError(400, "echo=true is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, f"best_of={self.best_of} is not supported (only best_of == n)",
                           param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got "
                                f"{self.logprobs}", param="logprobs")

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"prompt holds {len(p)} prompts; this server takes one prompt "
                                    f"per request (send several requests: they are batched)",
                               param="prompt")
            return p[0]
        return p


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self):
        if self.content is None and self.role != "assistant":  # assistant: tool calls, unsupported
            raise ValueError(f"a {self.role!r} message needs 'content'")
        return self

    def as_dict(self) -> dict:
        if isinstance(self.content, list):  # text parts, joined as OpenAI does for text-only models
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: until the context is full
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[Any] | None = None
    response_format: dict | None = None

    def check_unsupported(self) -> None:
        if self.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported",
                           param="response_format")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got "
                                    f"{self.top_logprobs}", param="top_logprobs")

    @property
    def output_limit(self) -> tuple[int | None, str]:
        """(max output tokens, the field that set it); max_completion_tokens wins."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body; malformed JSON and wrong types become a 400 naming the problem."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {errors[0]['ctx']['error']}") from None
        parts = []
        for _, group in itertools.groupby(errors, key=lambda e: tuple(e["loc"][:1])):
            group = list(group)
            parts += [_describe(group)] if _is_union_miss(group) else [_describe([e]) for e in group]
        more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
        parts = parts[:3]
        param = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
        raise APIError(400, "invalid request: " + "; ".join(parts) + more, param=param) from None


def _common_prefix(errors) -> tuple:
    locs = [tuple(e["loc"]) for e in errors]
    prefix = []
    for parts in zip(*locs):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return tuple(prefix)


def _is_union_miss(errors) -> bool:
    """Several errors under one field, each in a different branch of a union (pydantic tags
    each branch's errors with the branch's type): one "expected one of" reads better."""
    if len(errors) < 2:
        return False
    prefix = _common_prefix(errors)
    return bool(prefix) and all(len(e["loc"]) > len(prefix) and _is_type_tag(e["loc"][len(prefix)])
                                for e in errors)


def _is_type_tag(part) -> bool:
    # branch tags look like 'str', 'list[int]', 'TextPart'; field names are snake_case
    return isinstance(part, str) and ("[" in part or part in _SCALARS or part[:1].isupper())


_SCALARS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _describe(errors) -> str:
    err = errors[0]
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if len(errors) > 1:  # a union miss
        prefix = _common_prefix(errors)
        branches = list(dict.fromkeys(str(e["loc"][len(prefix)]) for e in errors))
        where = ".".join(str(x) for x in prefix)
        return f"{where}: expected one of {', '.join(branches)} (got {got})"
    where = ".".join(str(x) for x in err["loc"]) or "body"
    return f"{where}: {err['msg']}" + ("" if err["type"] == "missing" else f" (got {got})")
