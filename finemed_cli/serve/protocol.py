"""The OpenAI chat-completions wire format `finemed serve` speaks: the request it accepts (validated by
pydantic; a field it does not implement is refused with a 400 naming it, never ignored: a client asking for
`logprobs` or a `frequency_penalty` would otherwise read an answer made without them as one made with them),
the objects it answers with, and OpenAI-style errors.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finemed_cli.config.serve import SEED_MAX


class RequestError(Exception):
    """A request the server refuses: answered as OpenAI's JSON error with a 4xx status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.code)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: clients (the `openai` package among them) raise from its fields."""
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One turn. Other fields are refused unless null or empty: clients that send a response's message back
    carry `refusal: null, tool_calls: null` and the like, which ask for nothing."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self, where: str) -> str:
        """The message's text; parts other than text are refused (the models finemed serves read text)."""
        given = next((k for k, v in (self.model_extra or {}).items() if v not in (None, "", [], {})), None)
        if given is not None:
            raise RequestError(400, f"{where.rsplit('.', 1)[0]}.{given}: finemed serve does not implement this "
                               "field; leave it out", param=f"{where.rsplit('.', 1)[0]}.{given}")
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise RequestError(400, f"{where}: content of type {bad[0]!r} is not supported; send text only",
                               param=where)
        return "".join(p.text or "" for p in self.content)


def check_stops(cls: Any, v: str | list[str] | None) -> list[str] | None:
    """The `stop` field as a list (pydantic validator of the chat and completions requests)."""
    stops = [v] if isinstance(v, str) else v
    if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
        raise ValueError("at most 4 non-empty stop strings")
    return stops


def refuse_non_neutral(req: BaseModel, neutral: dict[str, Any]) -> None:
    """A 400 naming the first field given a value other than its neutral one (the one that asks for
    nothing: a penalty of 0, no logprobs): the server implements those fields only at that value."""
    for name, value in neutral.items():
        given = getattr(req, name)
        if given not in (value, None) and not (value is None and given in ({}, [], False)):
            raise RequestError(400, f"{name}: finemed serve does not implement {name}={given!r}; leave it out",
                               param=name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """What `/v1/chat/completions` accepts. `ttt` is finemed's own field (the openai client sends it with
    `extra_body={"ttt": True}`); the model id NAME+ttt asks for the same. Any other field is a 400."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    ttt: bool | None = None
    user: str | None = None  # an end-user id for the caller's own logs: nothing to do with the answer
    logprobs: bool | None = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    _stops = field_validator("stop")(check_stops)

    def refuse_unsupported(self) -> None:
        refuse_non_neutral(self, {"logprobs": False, "top_logprobs": None, "frequency_penalty": 0.0,
                                  "presence_penalty": 0.0, "logit_bias": None})
        if self.tools:
            raise RequestError(400, "tools (function calling) are not supported by finemed serve", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise RequestError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(one line, the parameter) for pydantic's errors about a request body."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "missing" and loc == []:
        return "the request needs a JSON body", None
    if first.get("type") == "extra_forbidden":
        return f"{param}: finemed serve does not implement this field; leave it out", param
    return (f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")), param


class StopScanner:
    """Cuts streamed text before the first stop string, holding back only a tail that could still begin one."""

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = stops or []
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is now safe to send."""
        if not self.stops:
            return piece
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = next((k for k in range(min(self.keep, len(self.pending)), 0, -1)
                     if any(s.startswith(self.pending[-k:]) for s in self.stops)), 0)
        n = len(self.pending) - hold
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Completion:
    """The ids and builders of one response (the same id and `created` on every chunk of a stream)."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def full(self, text: str, finish: str, usage: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
        body = self._base("chat.completion")
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                            "finish_reason": finish}]
        body["usage"] = usage
        if extra:
            body["finemed"] = extra
        return body

    def chunk(self, delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:
        body = self._base("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if extra:
            body["finemed"] = extra
        return body

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        body = self._base("chat.completion.chunk")
        body["choices"] = []
        body["usage"] = usage
        return body


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
