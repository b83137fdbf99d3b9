"""`/v1/completions` (OpenAI's legacy text completions) with `logprobs` and `echo`: what lm-eval's
`local-completions` model sends for loglikelihood tasks (`echo: true, logprobs: 1, max_tokens: 1` on token ids;
it sums `token_logprobs[ctxlen:-1]`).

A request with `logprobs` runs on the engine's scoring context (`ServeEngine.scoring`: a llama.cpp
context keeping the logits of every position, opened at the first such request), so the chat context keeps
llama.cpp's last-position-only logits and ordinary requests are not slowed; one without runs on the chat
context, behind the same lock as chat requests. Not streamed (`stream` is refused with 400); a client that goes
away stops the decoding at its next token, as on /v1/chat/completions.
"""

from __future__ import annotations

import codecs
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finemed_cli.config.serve import SEED_MAX, TTT_SUFFIX
from finemed_cli.generate.llamacpp import LlamaCpp, Sampling
from finemed_cli.serve.protocol import RequestError, StopScanner, check_stops, refuse_non_neutral, usage

if TYPE_CHECKING:
    from finemed_cli.serve.engine import ServeEngine

MAX_LOGPROBS = 20  # vLLM's limit (OpenAI's was 5)


class CompletionRequest(BaseModel):
    """What `/v1/completions` accepts; any other field is refused with a 400 naming it."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(default=16, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    n: int | None = Field(default=None, ge=1, le=1)
    best_of: int | None = Field(default=None, ge=1, le=1)
    user: str | None = None  # an end-user id for the caller's own logs: nothing to do with the answer
    stream: bool = False
    suffix: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    _stops = field_validator("stop")(check_stops)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        if not p:
            raise RequestError(400, "prompt: give at least one prompt", param="prompt")
        return list(p)  # type: ignore[arg-type]

    def refuse_unsupported(self) -> None:
        refuse_non_neutral(self, {"stream": False, "suffix": None, "frequency_penalty": 0.0,
                                  "presence_penalty": 0.0, "logit_bias": None})


@dataclass
class Choice:
    """One prompt's answer: the completion's tokens and text, and every position's row of logits wanted."""

    ids: list[int]
    gen: list[int]
    text: str
    finish: str
    cut: bool = False  # a stop string cut the text
    rows: Any = None  # numpy (len(ids) + len(gen) - 1) x vocab: row j predicts token j + 1


def complete(engine: ServeEngine, req: CompletionRequest, gone: threading.Event | None = None) -> dict[str, Any]:
    """Answer a completions request (in a worker thread): every prompt in turn, on the scoring context when
    `logprobs` is asked for, else on the chat context; `gone` (its client went away) stops it at the next
    token, the body then answering nobody."""
    req.refuse_unsupported()
    model = req.model or engine.name
    if model == engine.name + TTT_SUFFIX:
        raise RequestError(400, "TTT is answered on /v1/chat/completions only", param="model")
    if model != engine.name:
        raise RequestError(404, f"the model {model!r} does not exist; this server has {engine.name}", param="model",
                           code="model_not_found")
    seed = req.seed if req.seed is not None else engine.config.seed
    sampling = Sampling(req.temperature if req.temperature is not None else engine.config.temperature,
                        req.top_p if req.top_p is not None else engine.config.top_p, seed=seed)
    prompts = [_ids(engine.llama, p, i) for i, p in enumerate(req.prompts())]
    for ids in prompts:
        if len(ids) + req.max_tokens > engine.llama.context_length:
            raise RequestError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({req.max_tokens}) exceed the "
                               f"context of {engine.llama.context_length} tokens", param="prompt",
                               code="context_length_exceeded")
    choices = []
    gone = gone or threading.Event()
    for ids in prompts:
        if gone.is_set():
            break
        if req.logprobs is not None:
            with engine.scoring() as llama:
                choices.append(_run(llama, ids, req.max_tokens, sampling, req.stop, rows=True, gone=gone))
        else:
            with engine.turn(engine.lock):
                choices.append(_run(engine.llama, ids, req.max_tokens, sampling, req.stop, rows=False, gone=gone))
    body = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [_choice_body(engine.llama, i, c, req) for i, c in enumerate(choices)]}
    body["usage"] = usage(sum(len(c.ids) for c in choices), sum(len(c.gen) for c in choices))
    return body


def _ids(llama: LlamaCpp, prompt: str | list[int], i: int) -> list[int]:
    """Token ids of a prompt: text is tokenized with special tokens parsed and the BOS the GGUF asks for (as
    llama-server does); ids are taken as they are, checked against the vocabulary."""
    if isinstance(prompt, str):
        ids = llama.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    else:
        vocab = llama.llm.n_vocab()
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(400, f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
        ids = list(prompt)
    if not ids:
        raise RequestError(400, f"prompt {i} is empty: there is nothing to evaluate", param="prompt")
    return ids


def _run(llama: LlamaCpp, ids: list[int], budget: int, sampling: Sampling, stops: list[str] | None,
         rows: bool, gone: threading.Event) -> Choice:
    """Decode up to `budget` tokens after `ids` (cut at a stop string) on `llama`; with `rows`, copy out the
    logits of every position (the scoring context keeps them all). Text is decoded from a fresh evaluation of
    the prompt, as chat is; scoring keeps the KV cache of the prefix shared with the request before: lm-eval
    sends each option of a question with the whole prompt, and the shared prompt is then evaluated once (rows
    of a kept prefix match a fresh evaluation's within 1e-4, tests/unit/test_serve_tools.py)."""
    import numpy as np

    gen: list[int] = []
    text, finish, cut = "", "length", False
    if budget == 0:
        if rows:
            llama.evaluate(ids, reuse_prefix=True)
    else:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scanner = StopScanner(stops)
        for token in llama.stream(ids, budget, sampling, reuse_prefix=rows):
            if gone.is_set():  # nobody is waiting for the rest
                break
            gen.append(token)
            text += scanner.feed(decoder.decode(llama.llm.detokenize([token])))
            if scanner.stopped:
                finish, cut = "stop", True
                break
        else:
            finish = "length" if len(gen) >= budget else "stop"
        if not scanner.stopped:
            text += scanner.feed(decoder.decode(b"", final=True)) + scanner.flush()
    # row j of llama.cpp's scores predicts token j + 1; the last token decoded is never evaluated
    logits = np.array(llama.llm.scores[: len(ids) + len(gen) - 1], dtype=np.float64) if rows else None
    return Choice(ids, gen, text, finish, cut, logits)


def _choice_body(llama: LlamaCpp, index: int, c: Choice, req: CompletionRequest) -> dict[str, Any]:
    prompt_text = "".join(_pieces(llama, c.ids))
    body: dict[str, Any] = {"index": index, "text": (prompt_text if req.echo else "") + c.text,
                            "logprobs": None, "finish_reason": c.finish}
    if req.logprobs is not None:
        body["logprobs"] = _logprobs(llama, c, req.echo, req.logprobs, len(prompt_text))
    return body


def _pieces(llama: LlamaCpp, ids: list[int]) -> list[str]:
    """Each token's text as it adds to the decoded whole (a character split over tokens lands on the last)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [decoder.decode(llama.llm.detokenize([t], special=True)) for t in ids]
    if out:
        out[-1] += decoder.decode(b"", final=True)
    return out


def _logprobs(llama: LlamaCpp, c: Choice, echo: bool, top: int, prompt_chars: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs object over the prompt's tokens (with `echo`) and the completion's: each
    token's log-probability and the `top` most likely at its position; the first prompt token has none."""
    import numpy as np

    gen_pieces = _pieces(llama, c.gen)
    keep, at = len(c.gen), 0
    if c.cut:  # the completion tokens whose text starts before the stop string
        keep = 0
        while keep < len(c.gen) and at < len(c.text):
            at += len(gen_pieces[keep])
            keep += 1
    tokens = c.ids + c.gen[:keep]
    start = 0 if echo else len(c.ids)
    rows = c.rows
    lse = None
    if rows is not None and len(rows):
        m = rows.max(axis=-1, keepdims=True)
        lse = (m + np.log(np.exp(rows - m).sum(axis=-1, keepdims=True)))[:, 0]
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0 if echo else prompt_chars
    pieces = (_pieces(llama, c.ids) if echo else []) + gen_pieces[:keep]
    for j, piece in zip(range(start, len(tokens)), pieces, strict=True):
        out["tokens"].append(_token_text(llama, tokens[j]))
        out["text_offset"].append(offset)
        offset += len(piece)
        if j == 0 or lse is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        row, norm = rows[j - 1], lse[j - 1]
        out["token_logprobs"].append(float(row[tokens[j]] - norm))
        best = np.argpartition(-row, top)[:top] if 0 < top < len(row) else np.arange(len(row))[: top]
        best = best[np.argsort(-row[best], kind="stable")]
        out["top_logprobs"].append({_token_text(llama, int(t)): float(row[t] - norm) for t in best})
    return out


def _token_text(llama: LlamaCpp, token: int) -> str:
    return llama.llm.detokenize([token], special=True).decode("utf-8", errors="replace")
