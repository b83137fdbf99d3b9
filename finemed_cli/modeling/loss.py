"""Mean next-token loss over the labelled tokens of one example, cheaply.

Two savings, both exact:
- The LM head is applied only to positions that carry a label (prompt tokens are masked, so their
  vocabulary-wide logits are never computed), in chunks, so the full (T × vocab) logits, their softmax and
  its gradient never exist at once. A frozen head (TTT, LoRA training) computes the hidden states' gradient
  in the same pass (`FrozenHeadNLL`); a trained one is checkpointed per chunk.
- When LoRA sits only on the top decoder layers, the frozen bottom layers' output does not change during
  TTT: it is computed once per example (`compute_prefix`) and every training step and the loss-after pass
  run only the adapted top layers from it. Measured on the embedded model (794-token neighbour, 2 cores):
  forward 1.55 s, forward+backward 4.5 s for all 30 layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from finemed_cli.modeling.examples import IGNORE, TrainingExample
from finemed_cli.modeling.varlen import LENGTHS_KWARG

# Architectures whose logits are exactly lm_head(norm(last hidden state)): no soft-capping or logit scaling.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"}


class _StopForward(Exception):
    pass


@dataclass
class PrefixCache:
    """Input of decoder layer `start` for one example, with the arguments the decoder passed it."""

    start: int
    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def supports_fast_path(model: Any) -> bool:
    if getattr(model.config, "model_type", None) not in _PLAIN_HEAD:
        return False
    decoder = model.get_decoder()
    return hasattr(decoder, "layers") and hasattr(decoder, "norm") and model.get_output_embeddings() is not None


def num_layers(model: Any) -> int:
    return len(model.get_decoder().layers)


def _inputs(model: Any, example: TrainingExample) -> tuple[torch.Tensor, dict[str, Any]]:
    """The example's input ids on the model's device, and the other decoder arguments it needs."""
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {}
    if example.attention_mask is not None:
        kwargs["attention_mask"] = example.attention_mask.to(device)
    if example.lengths is not None:  # packed: see `varlen`
        kwargs["position_ids"] = example.position_ids.to(device)
        # A model whose attention forward is not transformers' own (unsloth's) names its packed-lengths argument.
        other = getattr(model, "finemed_packed_kwarg", None)
        if other:
            kwargs[other] = torch.tensor(example.lengths, dtype=torch.int32)
        else:
            kwargs[LENGTHS_KWARG] = example.lengths
    return example.input_ids.to(device), kwargs


@torch.no_grad()
def compute_prefix(model: Any, example: TrainingExample, start: int) -> PrefixCache:
    """Run the decoder up to layer `start` (exclusive) and capture that layer's inputs."""
    layer = model.get_decoder().layers[start]
    captured: dict[str, Any] = {}

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            captured["hidden"], captured["args"] = args[0], args[1:]
        else:
            captured["hidden"], captured["args"] = kwargs.pop("hidden_states"), ()
        captured["kwargs"] = dict(kwargs)
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    input_ids, kwargs = _inputs(model, example)
    try:
        model.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return PrefixCache(start, captured["hidden"].detach(), captured["args"], captured["kwargs"])


def _top_hidden(model: Any, prefix: PrefixCache) -> torch.Tensor:
    decoder = model.get_decoder()
    h = prefix.hidden
    for layer in decoder.layers[prefix.start:]:
        out = layer(h, *prefix.args, **prefix.kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return decoder.norm(h)


def example_nll(model: Any, example: TrainingExample, chunk: int = 256,
                prefix: PrefixCache | None = None) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over labelled tokens, and their count. Differentiable.

    With `prefix`, only the decoder layers from `prefix.start` on are run.
    """
    return rows_nll(model, example, chunk, prefix).sum(), example.target_tokens


def hf_loss(model: Any, example: TrainingExample) -> tuple[torch.Tensor, int]:
    """The reference code's loss: `model(**inputs, labels=labels).loss` (full logits), as a token sum."""
    input_ids, kwargs = _inputs(model, example)
    out = model(input_ids=input_ids, labels=example.labels.to(input_ids.device), use_cache=False, **kwargs)
    n = example.target_tokens
    return out.loss * n, n


def _chunk_token_nll(hidden: torch.Tensor, targets: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, head_weight).float()
    return F.cross_entropy(logits, targets, reduction="none")


class FrozenHeadNLL(torch.autograd.Function):
    """Per-token NLL through a frozen LM head, chunk by chunk, with the gradient for the hidden states worked
    out in the same pass: `(softmax − onehot) · W` while a chunk's logits exist. Only that (T × hidden)
    gradient is kept, so the backward is a multiply: two head matmuls a chunk where checkpointing takes three
    (forward, recomputation, backward), and one chunk's logits alive at a time instead of logits, log-softmax
    and their gradients. Measured on the embedded model (fp32, 2 cores, TTT on a 272-labelled-token
    neighbour, the 49k x 576 head): forward+backward 0.57 s with checkpointed chunks, 0.30 s fused; bf16
    0.30 s and 0.14 s (exp is taken once). A chunk's float logits are what it holds: 256 x 49k x 4 B = 50 MB.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        need = ctx.needs_input_grad[0]
        losses = []
        grad = hidden.new_empty(hidden.shape) if need else None  # filled chunk by chunk, no concatenation
        for i in range(0, targets.shape[0], chunk):
            h, t = hidden[i : i + chunk], targets[i : i + chunk]
            if not need:
                losses.append(_chunk_token_nll(h, t, weight))
                continue
            logits = F.linear(h, weight).float()
            # softmax in place of the logits, exp taken once: log Σ exp(l) = max + log Σ exp(l − max)
            picked = logits.gather(1, t[:, None])[:, 0]
            top = logits.amax(dim=-1, keepdim=True)
            total = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
            losses.append((top + total.log() - picked[:, None])[:, 0])
            p = logits.div_(total)
            p[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            torch.mm(p.to(h.dtype), weight, out=grad[i : i + chunk])
        if need:
            ctx.save_for_backward(grad)
        return torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: no second derivative through it
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (grad_hidden,) = ctx.saved_tensors
        # scaled in at least fp32: a 1/N token weight can underflow in fp16
        acc = torch.promote_types(grad_hidden.dtype, torch.float32)
        return (grad_hidden.to(acc) * grad_losses[:, None].to(acc)).to(grad_hidden.dtype), None, None, None


def rows_nll(model: Any, batch: TrainingExample, chunk: int = 256,
             prefix: PrefixCache | None = None) -> torch.Tensor:
    """Per-sequence sums of next-token NLL over the labelled tokens. Differentiable.

    The sequences are the rows of `batch`, or the packed sequences of a packed batch (`batch.lengths`;
    run it under `varlen.packed_attention`). The same savings as `example_nll` (prefix, head only on
    labelled tokens, checkpointed chunks), with each token's loss added to its sequence's sum.
    """
    input_ids, kwargs = _inputs(model, batch)
    device = input_ids.device
    targets = batch.labels.to(device)[:, 1:]
    keep = targets != IGNORE
    if batch.lengths is not None:
        count = len(batch.lengths)
        seq = torch.repeat_interleave(torch.arange(count), torch.tensor(batch.lengths)).to(device)[None, 1:]
    else:
        count = input_ids.shape[0]
        seq = torch.arange(count, device=device)[:, None].expand_as(targets)
    seq_of = seq[keep]
    sums = torch.zeros(count, device=device, dtype=torch.float32)
    if getattr(model, "finemed_fsdp", False):  # sharded (train.fsdp): only the model's forward gathers the head
        if input_ids.shape[0] != 1:
            raise ValueError("a sharded model takes one packed row")
        rows = keep[0].nonzero().squeeze(1)  # position t predicts token t + 1
        out = model(input_ids=input_ids, use_cache=False, logits_to_keep=rows, **kwargs)
        losses = F.cross_entropy(out.logits[0].float(), targets[0, rows], reduction="none")
        return sums.index_add(0, seq_of, losses)
    if not supports_fast_path(model):
        out = model(input_ids=input_ids, use_cache=False, **kwargs)
        losses = F.cross_entropy(out.logits[:, :-1][keep].float(), targets[keep], reduction="none")
        return sums.index_add(0, seq_of, losses)
    if prefix is not None:
        hidden = _top_hidden(model, prefix)
    else:
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
    hidden = hidden[:, :-1][keep]
    y = targets[keep]
    weight = model.get_output_embeddings().weight
    if not weight.requires_grad:  # TTT, LoRA training: the head is frozen
        # detached under no_grad: the Function would otherwise work out a gradient nobody asks for
        h = hidden if torch.is_grad_enabled() else hidden.detach()
        return sums.index_add(0, seq_of, FrozenHeadNLL.apply(h, weight, y, chunk))
    for i in range(0, y.shape[0], chunk):
        h, t = hidden[i : i + chunk], y[i : i + chunk]
        if torch.is_grad_enabled() and hidden.requires_grad:
            losses = checkpoint(_chunk_token_nll, h, t, weight, use_reentrant=False)
        else:
            losses = _chunk_token_nll(h, t, weight)
        sums = sums.index_add(0, seq_of[i : i + chunk], losses)
    return sums


class LossScaler:
    """Dynamic loss scaling for fp16 compute (the scheme of `torch.amp.GradScaler`, on any device and with
    gradients summed across processes before the check): the loss is multiplied by `factor` before backward so
    small gradients survive fp16, the gradients divided back before clipping; a step whose gradients overflowed
    is skipped and the factor halved, and after `growth_interval` good steps it doubles. bf16 and fp32 need none
    (`enabled` False: every method is the identity)."""

    def __init__(self, enabled: bool, factor: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled, self.factor, self.growth_interval = enabled, factor, growth_interval
        self._good = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.factor if self.enabled else loss

    def unscale(self, params: list[torch.Tensor], all_finite: Any = None) -> bool:
        """Divide the gradients back; False (skip this step) when any is inf or NaN. `all_finite`: a function
        combining this process's verdict with the others' (distributed training)."""
        if not self.enabled:
            return True
        grads = [p.grad for p in params if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if all_finite is not None:
            finite = all_finite(finite)
        if not finite:
            self.factor /= 2
            self._good = 0
            return False
        for g in grads:
            g.div_(self.factor)
        self._good += 1
        if self._good % self.growth_interval == 0:
            self.factor *= 2
        return True


def needs_loss_scaling(model: Any) -> bool:
    """True when the model computes in fp16 (older GPUs: `checkpoints.loading.pick_dtype`)."""
    return any(p.dtype == torch.float16 for p in model.parameters())
