"""The OpenAI wire format: request models (validated strictly, so a wrong type is a 400 and never reaches the
model), error bodies, and the response and stream-chunk bodies.

Chat requests must hold exactly one user message: MoCaE routes on the user's prompt alone, and the experts
were trained on single-turn prompts, so system messages and earlier turns are refused with a 400 rather than
silently dropped. Unknown fields are ignored, like OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

_INT64 = 2**63


class APIError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _integral(value):
    """JSON Schema counts 1.0 as an integer, and so do OpenAI's clients' encoders: accept it as 1 (strict otherwise)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_integral)]
Positive = Annotated[int, Field(ge=1), BeforeValidator(_integral)]  # the bound first, so the schema states it
# What the server refuses with its own message after parsing is stated in the schema too (json_schema_extra), so a
# client generated from /openapi.json, or a fuzzer, knows every request the server accepts. The server's own limits
# (model name, max_tokens) are added where the schema is built (alignx.serving.app.openapi_schema).
_TEXT = {"type": "string", "pattern": "\\S"}  # not empty, not only whitespace


class StreamOptions(_Strict):
    include_usage: bool = False


class _CompletionOptions(_Strict):
    model: str
    max_tokens: Positive | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Annotated[int, Field(ge=-_INT64, lt=_INT64), BeforeValidator(_integral)] | None = None
    stop: str | list[str] | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        {"type": "null"}]})
    n: Integer = Field(1, json_schema_extra={"enum": [1]})
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        return tuple(stops)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(json_schema_extra=_TEXT)


class ChatMessage(_Strict):
    model_config = ConfigDict(json_schema_extra={"required": ["role", "content"]})
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(json_schema_extra={"enum": ["user"]})
    content: str | list[TextPart] | None = Field(None, json_schema_extra={"anyOf": [
        _TEXT, {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}, "minItems": 1}]})


class ChatCompletionRequest(_CompletionOptions):
    messages: list[ChatMessage] = Field(min_length=1, json_schema_extra={"maxItems": 1})
    max_completion_tokens: Positive | None = None

    def prompt(self) -> str:
        if len(self.messages) != 1 or self.messages[0].role != "user":
            raise APIError(
                400, "alignx serve answers single-turn prompts: send exactly one message, with role 'user' "
                "(MoCaE routes on the user's prompt; system messages and earlier turns are not supported)",
                param="messages",
            )
        content = self.messages[0].content
        return content if isinstance(content, str) else "".join(part.text for part in content or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_CompletionOptions):
    prompt: str | list[str] = Field(json_schema_extra={"anyOf": [
        _TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 1}]})

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, "prompt must be one string (batches of prompts: send concurrent requests, "
                           "the server batches them)", param="prompt")
        return self.prompt[0]


def parse(model: type[_Strict], data: object) -> _Strict:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or None
        raise APIError(400, f"{field}: {error['msg']}" if field else error["msg"], param=field) from None


# ---- responses ---------------------------------------------------------------------------------------
# The models below describe the bodies the functions after them build, for the OpenAPI schema (``/openapi.json``);
# tests/serving/test_openapi.py checks every response the server sends against them.


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AlignXField(BaseModel):
    """The routing of a completion: the method, its final per-expert weights (None for the base model) and
    MoCaE's explanation (router, fractal and natural distributions, out-of-distribution flag)."""

    method: str
    weights: dict[str, float] | None
    explanation: dict


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    alignx: AlignXField


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    alignx: AlignXField


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None  # on the first chunk only
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    """One event of a chat stream; the first carries ``alignx``, a last usage-only one ``usage`` (no choices)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    alignx: AlignXField | None = None
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    alignx: AlignXField | None = None
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    method: str
    queue_depth: int




def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(chat: bool, id: str, created: int, model: str, text: str, finish_reason: str, usage: dict,
                  alignx: dict) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": usage, "alignx": alignx}


def chunk_body(chat: bool, id: str, created: int, model: str, *, text: str | None = None,
               finish_reason: str | None = None, first: bool = False, alignx: dict | None = None,
               usage: dict | None = None) -> dict:
    """One stream chunk; ``usage`` alone makes the final usage-only chunk (``choices`` empty)."""
    if usage is not None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": choices}
    if alignx is not None:
        body["alignx"] = alignx
    if usage is not None:
        body["usage"] = usage
    return body
