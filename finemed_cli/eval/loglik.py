"""Option scoring without generation, and held-out bits per token.

`option_logliks`: the log-likelihood of each option's text as the start of the assistant's reply to the
question (chat template, options listed as `finemed answer` shows them), as lm-eval-harness scores
multiple choice: `acc` picks the highest sum, `acc_norm` the highest sum per character of option text. The
prompt runs once with every option continuing it in the same pass (tree attention), so a question costs
about one prompt forward; several questions are packed into one pass, and the prompt start they all share
(the system prompt) is run once per model (`shared_prefix`).

`response_nll`: nats over the reference response (Thought + Summarization) of a corpus record given its
question, the quantity TTT-NN reports as bits per byte/token, with and without TTT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from finemed_cli.data.records import CorpusRecord, QuestionRecord
from finemed_cli.modeling.prompts import SYSTEM_PROMPT, prompt_ids, question_messages, render_chat


@dataclass(frozen=True)
class OptionScore:
    logprob: float  # sum over the option's tokens
    tokens: int
    chars: int  # characters of the option text: lm-eval-harness's acc_norm divides by len(choice)

    @property
    def per_char(self) -> float:
        return self.logprob / max(1, self.chars)


@dataclass
class SharedPrefix:
    """The tokens every question's prompt starts with (chat preamble and system prompt), run once: per
    decoder layer its keys and values."""

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def shared_prefix(model: Any, tokenizer: Any, system: str | None = SYSTEM_PROMPT) -> SharedPrefix | None:
    """Run the prompt prefix that every question shares (None if there is none, or the model cannot take
    it). With finemed's system prompt it is 87 of a MedQA prompt's ~311 tokens on the embedded model."""
    if not packable(model):
        return None
    a, b = (prompt_ids(tokenizer, question_messages(QuestionRecord(id=x, question=x), system))
            for x in ("Alpha?", "Beta?"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    ids = a[: max(0, n - 1)]  # the last shared token could merge with a question's first word
    if len(ids) < 8 or not packable(model, len(ids) + 1):  # a sliding-window cache would keep only its tail
        return None
    device = next(model.parameters()).device
    cache = model.get_decoder()(input_ids=torch.tensor([ids], device=device), use_cache=True).past_key_values
    return SharedPrefix(ids, [(layer.keys, layer.values) for layer in cache.layers])


def packable(model: Any, longest: int = 0) -> bool:
    """Whether the tree-masked packed pass is exact for `model`: a plain-head decoder whose attention goes
    through transformers' attention interface (`supports_fast_path`), and no sliding window shorter than
    `longest` tokens (SDPA here does not apply one). Others take the KV-cached pass, one question at a time.
    """
    from finemed_cli.modeling.loss import supports_fast_path

    if not supports_fast_path(model):
        return False
    window = getattr(model.config, "sliding_window", None)
    return not (window and getattr(model.config, "use_sliding_window", True) and window <= longest)


def _encode(tokenizer: Any, q: QuestionRecord, system: str | None,
            examples: Sequence[CorpusRecord] = ()) -> tuple[list[int], list[list[int]]]:
    """The question's prompt ids (after any worked examples) and each option's continuation ids."""
    if not q.options:
        raise ValueError(f"{q.id}: loglik scoring needs options")
    prompt_text = render_chat(tokenizer, question_messages(q, system, examples), add_generation_prompt=True)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    conts = []
    for text in q.options.values():
        # As lm-eval-harness: encode prompt + option together and take what follows the prompt's tokens
        # (the chat prompt ends in a newline, which byte-level BPEs never merge with the next word); if the
        # prefix did change, the option is encoded on its own.
        whole = tokenizer(prompt_text + text.strip(), add_special_tokens=False)["input_ids"]
        tail = whole[len(prompt):] if whole[: len(prompt)] == prompt else []
        conts.append(tail or tokenizer(text.strip(), add_special_tokens=False)["input_ids"])
    return prompt, conts


def option_logliks(model: Any, tokenizer: Any, q: QuestionRecord) -> dict[str, OptionScore]:
    """Log-likelihood of each option's text after the question's chat prompt."""
    return option_logliks_batch(model, tokenizer, [q])[0]


@dataclass
class _Trees:
    """Questions packed as trees in one row (see `option_logliks_batch`)."""

    row: list[int]
    positions: list[int]
    masks: list[Any]
    lengths: list[int]
    wanted: list[tuple[int, int]]  # (row index whose logits predict, token)
    owners: list[tuple[int, int, int]]  # (question, option, how many `wanted` entries)


def _pack_trees(encoded: list[tuple[list[int], list[list[int]]]], prefix: SharedPrefix | None, device: Any) -> _Trees:
    """Each question's prompt (after the shared prefix) then its options, every option attending to the prompt
    and to itself only, at the positions it would have after the prompt."""
    p = len(prefix.ids) if prefix else 0
    row: list[int] = []
    positions: list[int] = []
    masks: list[Any] = []
    lengths: list[int] = []
    wanted: list[tuple[int, int]] = []
    owners: list[tuple[int, int, int]] = []
    for qi, (prompt, conts) in enumerate(encoded):
        skip = p if prefix and len(prompt) > p and prompt[:p] == prefix.ids else 0
        body = prompt[skip:]
        r, base = len(body), len(row)
        length = r + sum(len(c) for c in conts)
        mask = torch.zeros(length, p + length, dtype=torch.bool)
        if skip:
            mask[:, :skip] = True
        mask[:r, p : p + r] = torch.ones(r, r, dtype=torch.bool).tril()
        mask[r:, p : p + r] = True
        row += body
        positions += range(skip, skip + r)
        off = r
        for oi, c in enumerate(conts):
            mask[off : off + len(c), p + off : p + off + len(c)] = torch.ones(len(c), len(c), dtype=torch.bool).tril()
            row += c
            positions += range(skip + r, skip + r + len(c))
            # the prompt's last token predicts c[0]; the option's token j-1 predicts c[j]
            wanted += [(base + r - 1, c[0])] + [(base + off + j - 1, c[j]) for j in range(1, len(c))]
            owners.append((qi, oi, len(c)))
            off += len(c)
        masks.append(mask.to(device))
        lengths.append(length)
    return _Trees(row, positions, masks, lengths, wanted, owners)


@torch.no_grad()
def option_logliks_batch(model: Any, tokenizer: Any, qs: list[QuestionRecord],
                         prefix: SharedPrefix | None = None, adapter: Any = None,
                         system: str | None = SYSTEM_PROMPT,
                         examples: Sequence[Sequence[CorpusRecord]] | None = None) -> list[dict[str, OptionScore]]:
    """`option_logliks` of several questions in one forward pass.

    Each question is one packed sequence, a tree: its prompt, then every option continuing it, each option
    attending to the prompt and to itself only (`varlen` masks) at the positions it would have after the
    prompt. With `prefix`, the shared prompt start is not run again: its keys and values are attended to.
    With `adapter` (a `BatchedLoRAAdapter` with one adapter per question, batched TTT) question i is scored
    through adapter i. `examples[i]`: worked examples shown before question i (the in-context variants; the
    shared prefix still applies, as they follow the system prompt). Models the packed pass is not exact for
    (`packable`) are scored one question at a time with the prompt's KV cache repeated for the options.
    Measured on the embedded model (80 MedQA questions, bf16, 2 cores; bench/eval.py): one question per pass
    2.84 questions/s, 8 per pass with the prefix 4.11, each option's own full forward 0.54.
    """
    from finemed_cli.modeling.varlen import LENGTHS_KWARG, MASKS_KWARG, PREFIX_KWARG, packed_attention

    encoded = [_encode(tokenizer, q, system, ex) for q, ex in zip(qs, examples or [()] * len(qs), strict=True)]
    longest = max(len(prompt) + sum(len(c) for c in conts) for prompt, conts in encoded)
    if not packable(model, longest + (len(prefix.ids) if prefix else 0)):
        out = []
        for i, (q, (prompt, conts)) in enumerate(zip(qs, encoded, strict=True)):
            if adapter is not None:
                adapter.select(i)
            out.append(_option_logliks_kv(model, q, prompt, conts))
        return out
    device = next(model.parameters()).device
    tree = _pack_trees(encoded, prefix, device)
    row, positions, masks, lengths, wanted, owners = (tree.row, tree.positions, tree.masks, tree.lengths,
                                                       tree.wanted, tree.owners)
    if adapter is not None:
        adapter.set_segments(tuple(lengths))
    ids = torch.tensor([row], device=device)
    pos = torch.tensor([positions], device=device)
    extra = {LENGTHS_KWARG: tuple(lengths), MASKS_KWARG: masks}
    if prefix:
        extra[PREFIX_KWARG] = prefix.kv
    rows = torch.tensor([w[0] for w in wanted], device=device)
    targets = torch.tensor([w[1] for w in wanted], device=device)
    with packed_attention(model):
        hidden = model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False, **extra).last_hidden_state
    # The head on the needed rows only, as a 2-D matmul: through `logits_to_keep` the tied 49k x 576 head went
    # through a batched matmul that copied the weight each call (56 ms a question, bf16).
    logits = F.linear(hidden[0, rows], model.get_output_embeddings().weight)
    logp = logits.float().log_softmax(-1).gather(1, targets[:, None])[:, 0].tolist()
    out: list[dict[str, OptionScore]] = [{} for _ in qs]
    at = 0
    for qi, oi, n in owners:
        letter, text = list(qs[qi].options.items())[oi]
        out[qi][letter] = OptionScore(sum(logp[at : at + n]), n, len(text.strip()))
        at += n
    return out


def _option_logliks_kv(model: Any, q: QuestionRecord, prompt: list[int],
                       conts: list[list[int]]) -> dict[str, OptionScore]:
    """One question through the model's own forward: the prompt once, its KV cache repeated for the options
    (one padded batch of a few tokens each)."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    first = out.logits[0, -1].float().log_softmax(-1)  # predicts each option's first token
    n, width = len(conts), max(len(c) for c in conts)
    ids = torch.zeros((n, width), dtype=torch.long, device=device)
    mask = torch.zeros((n, len(prompt) + width), dtype=torch.long, device=device)
    mask[:, : len(prompt)] = 1
    for i, c in enumerate(conts):
        ids[i, : len(c)] = torch.tensor(c, device=device)
        mask[i, len(prompt) : len(prompt) + len(c)] = 1
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    positions = torch.arange(len(prompt), len(prompt) + width, device=device)[None].expand(n, -1)
    logp = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                 use_cache=False).logits.float().log_softmax(-1)
    scores = {}
    for i, (letter, text) in enumerate(q.options.items()):
        c = conts[i]
        total = float(first[c[0]]) + sum(float(logp[i, j - 1, c[j]]) for j in range(1, len(c)))
        scores[letter] = OptionScore(total, len(c), len(text.strip()))
    return scores


def loglik_record(q: QuestionRecord, scores: dict[str, OptionScore], variant: str) -> dict[str, Any]:
    """The per-item record kept in the variant's loglik file (resumable like an answer file)."""
    acc = max(scores, key=lambda k: scores[k].logprob)
    norm = max(scores, key=lambda k: scores[k].per_char)
    rec: dict[str, Any] = {"id": q.id, "variant": variant, "prediction": acc, "prediction_norm": norm,
                           "scores": {k: {"logprob": round(s.logprob, 5), "tokens": s.tokens, "chars": s.chars}
                                      for k, s in scores.items()}}
    if q.answer is not None:
        rec.update(answer=q.answer, correct=acc == q.answer, correct_norm=norm == q.answer)
    return rec


def option_scores(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A loglik record's per-option scores, letter -> {logprob, tokens, chars}; files written before the scores
    were labelled hold [logprob, tokens, chars] and still resume."""
    return {k: v if isinstance(v, dict) else dict(zip(("logprob", "tokens", "chars"), v, strict=True))
            for k, v in rec.get("scores", {}).items()}


def response_example(tokenizer: Any, r: CorpusRecord, max_length: int, system: str | None = SYSTEM_PROMPT,
                     context: Sequence[CorpusRecord] = ()) -> Any:
    """The record as a training example (loss on the response only), as TTT trains on neighbours; `context`:
    worked examples shown before it."""
    from finemed_cli.modeling.examples import lora_examples

    examples = lora_examples(tokenizer, [r], max_length, system, context=context)
    return examples[0] if examples else None


@torch.no_grad()
def response_nll(model: Any, example: Any) -> tuple[float, int]:
    """(nats, tokens) of the response given its question."""
    from finemed_cli.modeling.loss import rows_nll

    return float(rows_nll(model, example).sum()), example.target_tokens


def bits(nats: float, tokens: int) -> float:
    return nats / max(1, tokens) / math.log(2)
