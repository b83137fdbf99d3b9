"""The step stream of a training stage: shuffled micro-batches per epoch, grouped into optimizer steps (and
shared out over processes), and the learning-rate schedule."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

from finemed_cli.config.train import StageSettings


def micro_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def planned_steps(stage: StageSettings, n_items: int, world: int = 1) -> int:
    """Optimizer steps of a stage; with `world` processes each step takes `grad_accum` micro-batches on
    each of them."""
    micro = math.ceil(n_items / stage.batch_size)
    if stage.max_steps:
        return stage.max_steps
    return max(1, math.ceil(stage.epochs * micro / (stage.grad_accum * world)))


def warmup_steps(stage: StageSettings, total: int) -> int:
    """The optimizer steps of a stage's linear warm-up."""
    return int(stage.warmup_ratio * total)


def lr_schedule(stage: StageSettings, total: int) -> Callable[[int], float]:
    """The LambdaLR factor per step: linear warm-up, then constant, linear or cosine decay."""
    warm = warmup_steps(stage, total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if stage.scheduler == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return max(0.0, 1 - progress) if stage.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def step_stream(stage: StageSettings, n_items: int, seed: int, total: int,
                 world: int = 1) -> Iterator[list[list[int]]]:
    """The micro-batches of each optimizer step in order (`grad_accum × world` of them; rank r takes
    every world-th): epochs reshuffled with their own seed. The stream depends on `world` only through the
    step size, so 2 processes at grad_accum 1 see exactly the steps of 1 process at grad_accum 2."""
    per_step = stage.grad_accum * world
    epoch = 0
    pending: list[list[int]] = []
    produced = 0
    while produced < total:
        pending += micro_batches(n_items, stage.batch_size, seed * 1009 + epoch)
        epoch += 1
        while len(pending) >= per_step and produced < total:
            yield pending[:per_step]
            pending = pending[per_step:]
            produced += 1
        if pending and produced < total and epoch >= math.ceil(stage.epochs) and not stage.max_steps:
            yield pending  # the last, short accumulation of the final epoch
            produced += 1
            pending = []
