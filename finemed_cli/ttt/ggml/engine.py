"""TTT with no torch: a fresh LoRA adapter trained by ggml's own graph, backward pass and AdamW on a Llama
GGUF, then written as the LoRA GGUF llama.cpp swaps in (prototype of issue 36).

Same procedure as `ttt.update.lora_session`: A kaiming-uniform and B zero, LoRA on the targets of the top
`resolved_layers` decoder layers, loss the mean NLL of the labelled tokens over all examples, `steps` AdamW
steps (torch's defaults: betas 0.9/0.999, eps 1e-8, no weight decay). The layers below the adapter are run
once (their output does not change), as the torch engine's frozen-prefix path does. The examples are packed
into one row (positions restart per example, a block-diagonal causal mask), so one graph trains on all of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finemed_cli.config.answer import TTTConfig
from finemed_cli.errors import ConfigError
from finemed_cli.ttt.ggml.bindings import GGML_TYPE_F32, GGML_TYPE_I32, InitParams, load_ggml, tensor
from finemed_cli.ttt.ggml.model import GGUF_TARGETS, GGUFWeights, LlamaGraph, LoRATensors

logger = logging.getLogger(__name__)

IGNORE = -100  # the label of a token with no loss (as modeling/examples.py)
GRAPH_SIZE = 1 << 16  # nodes: ~150 per adapted layer forward+backward, ~40 per frozen one


@dataclass
class GgmlTTTResult:
    """One question's adapter: per GGUF weight name, A (r, in) and B (out, r) in float32, in the GGUF's
    own row order (q/k permuted as llama.cpp stores them)."""

    steps: int
    loss_before: float | None
    loss_after: float | None
    seconds: float
    tokens: int
    rank: int
    alpha: float
    adapter: dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class PackedTokens:
    """The examples in one row: ids, positions (restarting per example), the block-diagonal causal mask,
    and per labelled token its row and its target id."""

    ids: np.ndarray
    pos: np.ndarray
    mask: np.ndarray
    rows: np.ndarray
    targets: np.ndarray


def pack_tokens(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> PackedTokens:
    """Pack (input ids, labels) pairs, labels `IGNORE` where no loss: row t predicts labels[t + 1]."""
    ids, pos, rows, targets, spans, start = [], [], [], [], [], 0
    for toks, labels in examples:
        n = len(toks)
        ids.extend(toks)
        pos.extend(range(n))
        for t in range(n - 1):
            if labels[t + 1] != IGNORE:
                rows.append(start + t)
                targets.append(labels[t + 1])
        spans.append((start, n))
        start += n
    mask = np.full((start, start), -np.inf, dtype=np.float32)  # [query, key]
    for s, n in spans:
        mask[s:s + n, s:s + n] = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    return PackedTokens(np.array(ids, np.int32), np.array(pos, np.int32), mask, np.array(rows, np.int32),
                        np.array(targets, np.int64))


def init_adapter(weights: GGUFWeights, config: TTTConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fresh (A, B) per adapted GGUF weight: A ~ U(±1/√in) as peft's kaiming-uniform(a=√5), B = 0. Drawn from
    numpy's generator, so not the torch engine's numbers; `train` takes the torch engine's A to compare."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in adapted_weights(weights, config):
        n_in, n_out = weights.out_shape(name)
        bound = 1.0 / np.sqrt(n_in)
        out[name] = (rng.uniform(-bound, bound, (config.rank, n_in)).astype(np.float32),
                     np.zeros((n_out, config.rank), np.float32))
    return out


def adapted_weights(weights: GGUFWeights, config: TTTConfig) -> list[str]:
    """The GGUF weight names that get an adapter: the targets of the top `resolved_layers` blocks."""
    unknown = [t for t in config.targets if t not in GGUF_TARGETS]
    if unknown:
        raise ConfigError(f"ttt.targets {unknown} have no Llama GGUF tensor; use {', '.join(GGUF_TARGETS)}")
    total = weights.shape.n_layer
    first = total - config.resolved_layers(total)
    return [f"blk.{i}.{GGUF_TARGETS[t]}.weight" for i in range(first, total) for t in config.targets]


class _Graph:
    """Two ggml contexts: `static` (inputs, the adapter and its momenta: one buffer, kept for the session) and
    `ctx` (the graph's intermediates, placed by ggml's graph allocator, which reuses a tensor's memory once its
    last reader has run). Allocating every intermediate its own memory instead measured 1385 MB peak RSS on
    the embedded model, the same as torch's fp32 copy (bench/ttt_engine.py, 2 cores)."""

    def __init__(self, backend: int, n_tensors: int = GRAPH_SIZE) -> None:
        self.g, self.backend, self.buffer, self.galloc = load_ggml(), backend, None, None
        size = n_tensors * self.g.ggml_tensor_overhead() + 3 * self.g.ggml_graph_overhead_custom(GRAPH_SIZE, True)
        self.ctx = self.g.ggml_init(InitParams(size, None, True))
        self.static = self.g.ggml_init(InitParams(4096 * self.g.ggml_tensor_overhead(), None, True))

    def new(self, type_: int, *ne: int) -> int:
        """A tensor in the static context (an input or a parameter: its memory is never reused)."""
        fn = self.g.ggml_new_tensor_1d if len(ne) == 1 else self.g.ggml_new_tensor_2d
        return fn(self.static, type_, *ne)

    def allocate(self, graph: int) -> None:
        self.buffer = self.g.ggml_backend_alloc_ctx_tensors(self.static, self.backend)
        self.galloc = self.g.ggml_gallocr_new(self.g.ggml_backend_cpu_buffer_type())
        if not self.g.ggml_gallocr_alloc_graph(self.galloc, graph):
            raise MemoryError("ggml could not allocate the TTT graph")

    def set(self, t: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        assert a.nbytes == self.g.ggml_nbytes(t), (a.shape, self.g.ggml_nbytes(t))
        self.g.ggml_backend_tensor_set(t, a.ctypes.data, 0, a.nbytes)

    def get(self, t: int, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty(shape, np.float32)
        self.g.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
        return out

    def compute(self, graph: int) -> None:
        status = self.g.ggml_backend_graph_compute(self.backend, graph)
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed with status {status}")

    def free(self) -> None:
        if self.galloc:
            self.g.ggml_gallocr_free(self.galloc)
        if self.buffer:
            self.g.ggml_backend_buffer_free(self.buffer)
        self.g.ggml_free(self.ctx)
        self.g.ggml_free(self.static)


class GgmlTTT:
    """The engine for one GGUF: `train(examples)` per question; `close()` when done."""

    def __init__(self, weights: GGUFWeights, config: TTTConfig, n_threads: int | None = None) -> None:
        import os

        self.g, self.w, self.config = load_ggml(), weights, config
        self.backend = self.g.ggml_backend_cpu_init()
        self.g.ggml_backend_cpu_set_n_threads(self.backend, n_threads or os.cpu_count() or 1)
        self.names = adapted_weights(weights, config)
        self.first_layer = int(self.names[0].split(".")[1])

    def close(self) -> None:
        self.g.ggml_backend_free(self.backend)

    def _prefix(self, packed: PackedTokens) -> np.ndarray:
        """Hidden states entering the first adapted layer, [T, n_embd]: the frozen layers run once."""
        hp, n = self.w.shape, len(packed.ids)
        gr = _Graph(self.backend)
        try:
            ids, pos = gr.new(GGML_TYPE_I32, n), gr.new(GGML_TYPE_I32, n)
            mask = gr.new(GGML_TYPE_F32, n, n)
            model = LlamaGraph(self.w, gr.ctx, {})
            x = model.embed(ids)
            for i in range(self.first_layer):
                x = model.layer(i, x, pos, mask, n)
            self.g.ggml_set_output(x)
            graph = self.g.ggml_new_graph_custom(gr.ctx, GRAPH_SIZE, False)
            self.g.ggml_build_forward_expand(graph, x)
            gr.allocate(graph)
            gr.set(ids, packed.ids)
            gr.set(pos, packed.pos)
            gr.set(mask, packed.mask)
            gr.compute(graph)
            return gr.get(x, (n, hp.n_embd))
        finally:
            gr.free()

    def train(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]], seed: int = 0,
              init: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> GgmlTTTResult:
        """Train a fresh adapter on `examples` ((ids, labels) pairs); `init` overrides the starting (A, B)."""
        start = time.perf_counter()
        steps, lr = self.config.resolved_steps(), self.config.resolved_lr()
        state = init or init_adapter(self.w, self.config, seed)
        packed = pack_tokens(examples)
        if not len(packed.rows):
            return GgmlTTTResult(steps, None, None, 0.0, 0, self.config.rank, self.config.alpha, {})
        hidden = self._prefix(packed)
        gr = _Graph(self.backend)
        try:
            run = _TrainGraph(self, gr, packed, state)
            before = after = None
            for step in range(steps):
                gr.set(run.adamw, _adamw_params(lr, step + 1))
                if step == 0:
                    run.start(hidden, packed)
                run.seed_loss_gradient()
                gr.compute(run.backward)
                loss = float(gr.get(run.loss, (1,))[0])
                before = loss if step == 0 else before
            gr.compute(run.forward)
            after = float(gr.get(run.loss, (1,))[0])
            adapter = {name: (gr.get(lt.a, state[name][0].shape), gr.get(lt.b, state[name][1].shape))
                       for name, lt in run.lora.items()}
        finally:
            gr.free()
        return GgmlTTTResult(steps, before, after, time.perf_counter() - start, len(packed.rows),
                             self.config.rank, self.config.alpha, adapter)


def _adamw_params(lr: float, t: int, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> np.ndarray:
    """ggml_opt_step_adamw's 7 parameters at step t (torch.optim.AdamW's defaults, weight decay 0)."""
    return np.array([lr, beta1, beta2, eps, 0.0, 1.0 / (1.0 - beta1 ** t), 1.0 / (1.0 - beta2 ** t)], np.float32)


class _TrainGraph:
    """The adapted layers, the loss, its backward and one AdamW step per adapter tensor, in one context."""

    def __init__(self, engine: GgmlTTT, gr: _Graph, packed: PackedTokens,
                 state: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        g, hp, cfg = engine.g, engine.w.shape, engine.config
        n, n_rows = len(packed.ids), len(packed.rows)
        self.gr, self.state = gr, state
        self.hidden, self.pos = gr.new(GGML_TYPE_F32, hp.n_embd, n), gr.new(GGML_TYPE_I32, n)
        self.mask, self.rows = gr.new(GGML_TYPE_F32, n, n), gr.new(GGML_TYPE_I32, n_rows)
        head = engine.w.get("output.weight") or engine.w.weight("token_embd.weight")
        self.n_vocab = int(tensor(head).ne[1])
        self.labels = gr.new(GGML_TYPE_F32, self.n_vocab, n_rows)
        self.adamw = gr.new(GGML_TYPE_F32, 7)
        self.lora, moments = {}, []
        for name in engine.names:
            a, b = (gr.new(GGML_TYPE_F32, *reversed(x.shape)) for x in state[name])
            for p in (a, b):
                g.ggml_set_param(p)
                moments.append((p, gr.new(GGML_TYPE_F32, *tensor(p).ne[:2]), gr.new(GGML_TYPE_F32, *tensor(p).ne[:2])))
            self.lora[name] = LoRATensors(a, b, cfg.alpha / cfg.rank)
        model = LlamaGraph(engine.w, gr.ctx, self.lora)
        x = self.hidden
        for i in range(engine.first_layer, hp.n_layer):
            x = model.layer(i, x, self.pos, self.mask, n)
        logits = model.logits(g.ggml_get_rows(gr.ctx, x, self.rows))
        self.loss = g.ggml_cross_entropy_loss(gr.ctx, logits, self.labels)
        g.ggml_set_loss(self.loss)
        self.forward = g.ggml_new_graph_custom(gr.ctx, GRAPH_SIZE, True)
        g.ggml_build_forward_expand(self.forward, self.loss)
        self.backward = g.ggml_graph_dup(gr.ctx, self.forward, True)
        g.ggml_build_backward_expand(gr.ctx, self.backward, None)
        for p, m, v in moments:
            grad = g.ggml_graph_get_grad(self.backward, p)
            g.ggml_build_forward_expand(self.backward, g.ggml_opt_step_adamw(gr.ctx, p, grad, m, v, self.adamw))
        self.loss_grad = g.ggml_graph_get_grad(self.backward, self.loss)
        self.moments = [t for _, m, v in moments for t in (m, v)]
        g.ggml_set_output(self.loss)
        gr.allocate(self.backward)

    def start(self, hidden: np.ndarray, packed: PackedTokens) -> None:
        """Inputs and the adapter's first values in; momenta zeroed and the loss gradient set to 1."""
        gr = self.gr
        gr.set(self.hidden, hidden)
        gr.set(self.pos, packed.pos)
        gr.set(self.mask, packed.mask)
        gr.set(self.rows, packed.rows)
        onehot = np.zeros((len(packed.rows), self.n_vocab), np.float32)
        onehot[np.arange(len(packed.rows)), packed.targets] = 1.0
        gr.set(self.labels, onehot)
        for name, lt in self.lora.items():
            gr.set(lt.a, self.state[name][0])
            gr.set(lt.b, self.state[name][1])
        for t in self.moments:
            gr.set(t, np.zeros(tuple(reversed(tensor(t).ne[:2])), np.float32))

    def seed_loss_gradient(self) -> None:
        """d loss / d loss = 1, set before every backward pass: the graph allocator may reuse its memory
        (so `ggml_graph_reset`, which also zeroes the momenta, cannot be called once for all steps)."""
        self.gr.set(self.loss_grad, np.ones(1, np.float32))


def write_lora_gguf(result: GgmlTTTResult, output: str | Path) -> Path:
    """The adapter as llama.cpp's LoRA GGUF (`adapter.type = lora`, `<weight>.lora_a/.lora_b`), as
    `export.lora_gguf.export_lora_gguf` writes a torch adapter; the names are already GGUF names and the q/k rows
    already in GGUF order, so nothing is permuted."""
    import gguf

    from finemed_cli.export.writer import gguf_writer

    output = Path(output)
    with gguf_writer(output, "llama") as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name("finemed LoRA (ggml TTT)")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(result.alpha))
        for name, (a, b) in sorted(result.adapter.items()):
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, np.float32))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return output
