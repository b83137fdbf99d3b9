"""Option scoring without generation, and held-out bits per token.

`option_logliks`: the log-likelihood of each option's text as the start of the assistant's reply to the
question (chat template, options listed as `finemed answer` shows them), as lm-eval-harness scores
multiple choice: `acc` picks the highest sum, `acc_norm` the highest sum per byte of option text. The
prompt runs once; its KV cache is repeated for the options, which run together in one padded batch (a few
tokens each), so a question costs about one prompt forward.

`response_nll`: nats over the reference response (Thought + Summarization) of a corpus record given its
question, the quantity TTT-NN reports as bits per byte/token, with and without TTT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from finemed_cli.data.records import CorpusRecord, QuestionRecord
from finemed_cli.generate.prompts import question_messages, render_chat


@dataclass(frozen=True)
class OptionScore:
    logprob: float  # sum over the option's tokens
    tokens: int
    chars: int  # UTF-8 bytes of the option text (lm-eval-harness's acc_norm denominator)

    @property
    def per_byte(self) -> float:
        return self.logprob / max(1, self.chars)


@torch.no_grad()
def option_logliks(model: Any, tokenizer: Any, q: QuestionRecord) -> dict[str, OptionScore]:
    """Log-likelihood of each option's text after the question's chat prompt."""
    if not q.options:
        raise ValueError(f"{q.id}: loglik scoring needs options")
    prompt_text = render_chat(tokenizer, question_messages(q), add_generation_prompt=True)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    conts = []
    for text in q.options.values():
        # As lm-eval-harness: encode prompt + option together and take what follows the prompt's tokens
        # (the chat prompt ends in a newline, which byte-level BPEs never merge with the next word); if the
        # prefix did change, the option is encoded on its own.
        whole = tokenizer(prompt_text + text.strip(), add_special_tokens=False)["input_ids"]
        tail = whole[len(prompt):] if whole[: len(prompt)] == prompt else []
        conts.append(tail or tokenizer(text.strip(), add_special_tokens=False)["input_ids"])
    device = next(model.parameters()).device
    # Only the last position's logits are needed from the prompt: 49k-wide logits for every prompt token
    # were 18% of a MedQA question's time (0.79 s -> 0.64 s for a 368-token prompt, 2 cores, fp32).
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    first = out.logits[0, -1].float().log_softmax(-1)  # predicts each option's first token
    n, width = len(conts), max(len(c) for c in conts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((n, width), pad, dtype=torch.long, device=device)
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
        scores[letter] = OptionScore(total, len(c), len(text.strip().encode()))
    return scores


def loglik_record(q: QuestionRecord, scores: dict[str, OptionScore], variant: str) -> dict[str, Any]:
    """The per-item record kept in the variant's loglik file (resumable like an answer file)."""
    acc = max(scores, key=lambda k: scores[k].logprob)
    norm = max(scores, key=lambda k: scores[k].per_byte)
    rec: dict[str, Any] = {"id": q.id, "variant": variant, "prediction": acc, "prediction_norm": norm,
                           "scores": {k: [round(s.logprob, 5), s.tokens, s.chars] for k, s in scores.items()}}
    if q.answer is not None:
        rec.update(answer=q.answer, correct=acc == q.answer, correct_norm=norm == q.answer)
    return rec


def response_example(tokenizer: Any, r: CorpusRecord, max_length: int) -> Any:
    """The record as a training example (loss on the response only), as TTT trains on neighbours."""
    from finemed_cli.ttt.examples import lora_examples

    examples = lora_examples(tokenizer, [r], max_length)
    return examples[0] if examples else None


@torch.no_grad()
def response_nll(model: Any, example: Any) -> tuple[float, int]:
    """(nats, tokens) of the response given its question."""
    from finemed_cli.ttt.loss import rows_nll

    return float(rows_nll(model, example).sum()), example.target_tokens


def bits(nats: float, tokens: int) -> float:
    return nats / max(1, tokens) / math.log(2)
