"""Test-time training: adapt the model to a question's retrieved neighbours, answer, then undo it.

`ttt_session` is a context manager: inside it the model is adapted; on exit it is exactly the model it was
(LoRA: the adapter is detached and the base weights were never written; paper: the weights are restored
from a copy taken before the update).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from finemed_cli.config.answer import TTTConfig
from finemed_cli.data.records import CorpusRecord
from finemed_cli.modeling.examples import TrainingExample, lora_examples, pack_examples, paper_examples
from finemed_cli.modeling.loss import (
    LossScaler,
    compute_prefix,
    example_nll,
    hf_loss,
    needs_loss_scaling,
    num_layers,
    rows_nll,
    supports_fast_path,
)
from finemed_cli.modeling.prompts import SYSTEM_PROMPT
from finemed_cli.modeling.varlen import packed_attention
from finemed_cli.runtime import release_memory
from finemed_cli.ttt.lora import BatchedLoRAAdapter, LoRAAdapter, attach_lora, attach_lora_batched

logger = logging.getLogger(__name__)


@dataclass
class TTTResult:
    mode: str
    steps: int
    loss_before: float | None  # mean token NLL on the neighbours before the first update
    loss_after: float | None  # the same after the last update
    seconds: float
    tokens: int  # labelled tokens per step
    adapter: LoRAAdapter | None = None

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "steps": self.steps, "loss_before": self.loss_before,
                "loss_after": self.loss_after, "seconds": round(self.seconds, 4), "tokens": self.tokens}


def _accumulate(model: Any, examples: list[TrainingExample], loss_fn: Any, scaler: LossScaler | None) -> float:
    """One pass over the examples, gradients accumulated token-weighted (backward only with a `scaler`);
    returns the mean token NLL."""
    total_tokens = sum(e.target_tokens for e in examples)
    total = 0.0
    for e in examples:
        nll, _ = loss_fn(model, e)
        if scaler is not None:
            scaler.scale(nll / total_tokens).backward()
        total += float(nll.detach())
    return total / total_tokens


def _train(optimizer: torch.optim.Optimizer, model: Any, examples: list[TrainingExample], steps: int,
           loss_fn: Any, eval_examples: list[TrainingExample] | None = None) -> tuple[float, float]:
    """`steps` optimizer steps; the loss before is the first step's, the loss after one more pass (on
    `eval_examples` when given: the paper mode measures it unpadded, so the baseline is not charged for
    padding it would not do). An fp16 model's loss is scaled (`LossScaler`); an overflowing step is skipped."""
    loss_before = 0.0
    scaler = LossScaler(needs_loss_scaling(model))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = _accumulate(model, examples, loss_fn, scaler)
        if step == 0:
            loss_before = loss
        if scaler.unscale(params):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss_after = _accumulate(model, eval_examples or examples, loss_fn, None)
    return loss_before, loss_after


@contextlib.contextmanager
def _working_copy(model: Any) -> Iterator[list[torch.nn.Parameter]]:
    """Every parameter swapped for a trainable fp32 copy, and floating buffers for fp32 copies, for the block;
    on exit the original tensors themselves are put back. Nothing is cast back, so the model after is the model
    before, bit for bit and dtype for dtype, non-persistent buffers (rotary `inv_freq`) included: casting the
    whole model to fp32 and back once left those in bf16 and every later answer drifted."""
    params = list(model.parameters())  # a tied weight is one Parameter, so it is copied once
    originals = [p.data for p in params]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items()
               if b is not None and b.is_floating_point()]
    try:
        for p in params:
            p.data = p.data.to(torch.float32, copy=True)
            p.requires_grad_(True)
        for m, name, b in buffers:
            m._buffers[name] = b.to(torch.float32)  # the original object is kept in `buffers`
        yield params
    finally:
        for p, data in zip(params, originals, strict=True):
            p.requires_grad_(False)
            p.grad = None
            p.data = data
        for m, name, b in buffers:
            m._buffers[name] = b


@contextlib.contextmanager
def ttt_session(model: Any, tokenizer: Any, neighbours: list[CorpusRecord], config: TTTConfig,
                seed: int = 0, *, system: str | None = SYSTEM_PROMPT) -> Iterator[TTTResult]:
    """Adapt `model` to `neighbours` (under the run's system prompt `system`) for the body of the `with`
    block (`lora_session` or `paper_session` by `config.mode`); restore it on exit. TTT off, or no
    neighbours: the model as it is."""
    if config.mode == "off" or not neighbours:
        yield TTTResult("off", 0, None, None, 0.0, 0)
        return
    if config.mode not in ("lora", "paper"):  # validated earlier; kept for direct library callers
        raise ValueError(f"unknown TTT mode {config.mode!r}")
    session = lora_session if config.mode == "lora" else paper_session
    with session(model, tokenizer, neighbours, config, seed, system=system) as result:
        yield result


@contextlib.contextmanager
def _frozen_for_ttt(model: Any, seed: int) -> Iterator[None]:
    """What every TTT session does around its work: eval mode (no dropout: a deterministic update), the
    session's seed, and on exit the training flag put back and freed memory returned to the OS."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        model.train(was_training)
        release_memory()


def _adapted_layers(model: Any, config: TTTConfig) -> tuple[bool, int]:
    """(whether the frozen-prefix fast path applies, the first decoder layer given LoRA)."""
    fast = supports_fast_path(model)
    if not fast:
        return False, 0
    total = num_layers(model)
    return True, total - config.resolved_layers(total)


@contextlib.contextmanager
def lora_session(model: Any, tokenizer: Any, neighbours: list[CorpusRecord], config: TTTConfig,
                 seed: int = 0, *, system: str | None = SYSTEM_PROMPT) -> Iterator[TTTResult]:
    """finemed's TTT: a fresh LoRA adapter on the top layers, `steps` AdamW steps on the neighbours'
    reasoning and answer tokens; the base weights are never written, and the adapter is detached on exit."""
    start = time.perf_counter()
    steps, lr = config.resolved_steps(), config.resolved_lr()
    with _frozen_for_ttt(model, seed):
        examples = lora_examples(tokenizer, neighbours, config.max_length, system, config.loss_on)
        fast, first_layer = _adapted_layers(model, config)
        adapter = attach_lora(model, config.rank, config.alpha, config.targets, seed=seed, first_layer=first_layer)
        try:
            before = after = None
            if examples:
                optimizer = torch.optim.AdamW(list(adapter.parameters()), lr=lr, weight_decay=0.0)
                # The layers below the adapter are frozen and unchanged by TTT: run them once.
                prefixes = {id(e): compute_prefix(model, e, first_layer) for e in examples} if fast else {}
                before, after = _train(optimizer, model, examples, steps,
                                       lambda m, e: example_nll(m, e, config.loss_chunk, prefixes.get(id(e))))
                del optimizer, prefixes
            yield TTTResult("lora", steps, before, after, time.perf_counter() - start,
                            sum(e.target_tokens for e in examples), adapter)
        finally:
            adapter.detach()


@contextlib.contextmanager
def paper_session(model: Any, tokenizer: Any, neighbours: list[CorpusRecord], config: TTTConfig,
                  seed: int = 0, *, system: str | None = SYSTEM_PROMPT) -> Iterator[TTTResult]:
    """The paper's reference procedure, the baseline: every parameter, a fresh Adam, `steps` steps on the
    retrieved text padded to `pad_to`; the original weights are put back on exit. A bf16/fp16 model is updated
    (and answers) in fp32 for the session: one Adam step at 1e-6 is lost in bf16 rounding (DESIGN.md)."""
    start = time.perf_counter()
    steps, lr = config.resolved_steps(), config.resolved_lr()
    with _frozen_for_ttt(model, seed):
        examples = paper_examples(tokenizer, neighbours, config.pad_to, system)
        with _working_copy(model) as params:
            optimizer = torch.optim.Adam(params, lr=lr)
            before, after = _train(optimizer, model, examples, steps, hf_loss,
                                   eval_examples=paper_examples(tokenizer, neighbours, 0, system))
            del optimizer
            for p in params:  # no autograd graph while generating
                p.requires_grad_(False)
                p.grad = None
            yield TTTResult("paper", steps, before, after, time.perf_counter() - start,
                            sum(e.target_tokens for e in examples))


@dataclass
class BatchTTT:
    """The questions of one batched TTT session: per question its result; `select(i)` makes question i's
    adapter the live one (for the transformers generator)."""

    results: list[TTTResult]
    adapter: BatchedLoRAAdapter | None

    def select(self, i: int) -> None:
        if self.adapter is not None:
            self.adapter.select(i)


@dataclass(frozen=True)
class _BatchPlan:
    """How a batched session trains: its steps and learning rate, the frozen-prefix fast path and the first
    decoder layer given LoRA, and when it started (the time is shared out over its questions)."""

    steps: int
    lr: float
    fast: bool
    first_layer: int
    start: float


@contextlib.contextmanager
def ttt_batch_session(model: Any, tokenizer: Any, neighbours: list[list[CorpusRecord]], config: TTTConfig,
                      seed: int = 0, *, system: str | None = SYSTEM_PROMPT) -> Iterator[BatchTTT]:
    """LoRA TTT for several questions in one forward/backward per step: every question's neighbours are
    packed into one row (no padding; attention per sequence, `varlen`), and question i's tokens use adapter
    i (`attach_lora_batched`). Each adapter starts, steps and is measured exactly as in its own
    `ttt_session` (Adam is elementwise and the losses are summed per question, so the gradients never mix);
    the batched matmuls change only the rounding.
    """
    if config.mode != "lora":
        raise ValueError("batched TTT is LoRA TTT; run the paper mode one question at a time")
    n = len(neighbours)
    start = time.perf_counter()
    steps, lr = config.resolved_steps(), config.resolved_lr()
    with _frozen_for_ttt(model, seed):
        per_q = [lora_examples(tokenizer, recs, config.max_length, system, config.loss_on) for recs in neighbours]
        plan = _BatchPlan(steps, lr, *_adapted_layers(model, config), start)
        adapter = attach_lora_batched(model, n, config.rank, config.alpha, config.targets, seed=seed,
                                      first_layer=plan.first_layer)
        try:
            yield _train_batch(model, adapter, per_q, config, plan)
        finally:
            adapter.detach()


def _train_batch(model: Any, adapter: BatchedLoRAAdapter, per_q: list[list[TrainingExample]], config: TTTConfig,
                 plan: _BatchPlan) -> BatchTTT:
    """The batched session's training: every question's examples packed in one row, adapter q owning
    question q's tokens; one loss per question, so the gradients never mix."""
    steps = plan.steps
    n = len(per_q)
    examples = [e for ex in per_q for e in ex]
    owner = [q for q, ex in enumerate(per_q) for _ in ex]
    tokens = [sum(e.target_tokens for e in ex) for ex in per_q]
    before = [None] * n
    after = [None] * n
    if examples:
        device = next(model.parameters()).device
        batch = pack_examples(examples)
        # Question q's examples are consecutive in the packed row: adapter q owns their tokens.
        adapter.set_segments(tuple(sum(e.input_ids.shape[1] for e in ex) for ex in per_q))
        owner_t = torch.tensor(owner, device=device)
        weights = torch.tensor([1.0 / tokens[q] for q in owner], device=device)

        def per_question(sums: torch.Tensor) -> list[float]:
            out = torch.zeros(n, device=sums.device).index_add(0, owner_t, sums.detach())
            return [float(out[q]) / tokens[q] if tokens[q] else None for q in range(n)]

        with packed_attention(model):
            prefix = compute_prefix(model, batch, plan.first_layer) if plan.fast else None
            params = list(adapter.parameters())
            optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
            scaler = LossScaler(needs_loss_scaling(model))
            for step in range(steps):
                optimizer.zero_grad(set_to_none=True)
                sums = rows_nll(model, batch, config.loss_chunk, prefix)
                scaler.scale((sums * weights).sum()).backward()  # Σ_q (question q's token-mean NLL)
                if step == 0:
                    before = per_question(sums)
                if scaler.unscale(params):
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                after = per_question(rows_nll(model, batch, config.loss_chunk, prefix))
            del optimizer, prefix
    adapter.select(None)
    share = (time.perf_counter() - plan.start) / max(n, 1)
    results = [TTTResult("lora", steps, before[q], after[q], share, tokens[q],
                         adapter.view(q) if per_q[q] else None) for q in range(n)]
    return BatchTTT(results, adapter)
