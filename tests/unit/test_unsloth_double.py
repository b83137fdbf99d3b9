"""finemed's unsloth wiring (`train/unsloth_backend.py` and the recipe around it) on CPU, through a TEST DOUBLE.

This is not unsloth. A fake `unsloth` module is put in `sys.modules`; it records every call finemed makes and
binds its arguments against the parameter names of unsloth's real functions, copied below from the published
source (unsloth and unsloth_zoo 2026.10.9), so a misspelt or unknown keyword fails here as it would there. It
then does what unsloth's CPU backend does (unsloth_zoo/cpu/loader.py, stock transformers + peft): loads the
checkpoint with transformers and adds a peft LoRA adapter. Its attention stands in for unsloth's patched one:
a forward from an `unsloth.*` module that reads sequence boundaries from `packed_seq_lengths` only.

What it checks: the arguments of every unsloth call, packed rows reaching unsloth's attention argument, SFT
then DPO through finemed's own loop, the adapter saved and merged into the 16-bit base. What it cannot
check: unsloth's kernels, its 4-bit loading, or that its patched attention computes what this one does; those
run only on a CUDA GPU (`test_unsloth_trains_the_curriculum_on_a_gpu`, `make bench-gpu`).

Our own reading of the 2026.10.9 source: `import unsloth` does not raise without a GPU. With no accelerator
(or UNSLOTH_FORCE_CPU=1) it selects a CPU backend whose FastLanguageModel is unsloth_zoo's FastCPUModel
(transformers + peft, bitsandbytes 4-bit only where its CPU kernels run) and `unsloth.DEVICE_TYPE` is "cpu".
finemed still refuses `backend: unsloth` without CUDA (`backend.pick_backend`): none of unsloth's speed comes
with that fallback. Rerun `python -m tests.unit.test_unsloth_double DIR` on an unpacked newer wheel
(`pip download unsloth unsloth_zoo --no-deps`, then unzip both into DIR) to refresh the table.
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from finemed_cli.config.train import load_train_config
from finemed_cli.errors import ConfigError
from tests.unit import test_train
from tests.unit.test_train import _metrics, tokenizer_of

tiny_run = test_train.tiny_run  # the saved tiny model and SFT+DPO config, as a fixture here too

UNSLOTH_VERSION = "2026.10.9"
# (file, class or None, function) in the unpacked wheels -> its named parameters; "=" marks a default, "*" a
# keyword-only one. The functions' *args/**kwargs are left out on purpose: unsloth hands unknown keywords on
# to transformers, where a typo is ignored or fails late; the double refuses them.
SOURCES = {
    "FastLanguageModel.from_pretrained": ("unsloth/models/loader.py", "FastLanguageModel", "from_pretrained"),
    # FastLanguageModel.get_peft_model(model, *args, **kwargs) is functools.wraps of this one and calls it.
    "FastLanguageModel.get_peft_model": ("unsloth/models/llama.py", "FastLlamaModel", "get_peft_model"),
    "FastCPUModel.from_pretrained": ("unsloth_zoo/cpu/loader.py", "FastCPUModel", "from_pretrained"),
    "FastCPUModel.get_peft_model": ("unsloth_zoo/cpu/loader.py", "FastCPUModel", "get_peft_model"),
    "save_pretrained_merged": ("unsloth/save.py", None, "unsloth_save_pretrained_merged"),
}
SIGNATURES = {
    "FastLanguageModel.from_pretrained": (
        "model_name=", "max_seq_length=", "dtype=", "load_in_4bit=", "load_in_8bit=", "load_in_16bit=",
        "full_finetuning=", "token=", "device_map=", "device_map_planner_kwargs=", "rope_scaling=",
        "fix_tokenizer=", "trust_remote_code=", "use_gradient_checkpointing=", "resize_model_vocab=", "revision=",
        "use_exact_model_name=", "offload_embedding=", "float32_mixed_precision=", "fast_inference=",
        "gpu_memory_utilization=", "float8_kv_cache=", "random_state=", "max_lora_rank=", "disable_log_stats=",
        "qat_scheme=", "load_in_fp8=", "unsloth_tiled_mlp=", "text_only=", "*on_model_resolved="),
    "FastLanguageModel.get_peft_model": (
        "model", "r=", "target_modules=", "lora_alpha=", "lora_dropout=", "bias=", "layers_to_transform=",
        "layers_pattern=", "finetune_last_n_layers=", "use_gradient_checkpointing=", "random_state=",
        "max_seq_length=", "use_rslora=", "modules_to_save=", "init_lora_weights=", "loftq_config=",
        "temporary_location=", "qat_scheme=", "target_parameters=", "ensure_weight_tying=", "offload_layers=",
        "checkpoint_skip_layers="),
    "FastCPUModel.from_pretrained": (
        "model_name=", "max_seq_length=", "dtype=", "load_in_4bit=", "load_in_8bit=", "load_in_16bit=",
        "full_finetuning=", "token=", "device_map=", "trust_remote_code=", "revision=", "fast_inference=",
        "use_gradient_checkpointing=", "attn_implementation="),
    "FastCPUModel.get_peft_model": (
        "model", "r=", "target_modules=", "lora_alpha=", "lora_dropout=", "bias=", "layers_to_transform=",
        "layers_pattern=", "use_gradient_checkpointing=", "random_state=", "max_seq_length=", "use_rslora=",
        "modules_to_save=", "init_lora_weights=", "loftq_config="),
    "save_pretrained_merged": (
        "self", "save_directory", "tokenizer=", "save_method=", "push_to_hub=", "token=", "is_main_process=",
        "state_dict=", "save_function=", "max_shard_size=", "safe_serialization=", "variant=", "save_peft_format=",
        "tags=", "temporary_location=", "maximum_memory_usage=", "datasets=", "calibration_dataset=",
        "num_calibration_samples=", "max_seq_length=", "install_missing_dependencies="),
}
# The CPU backend's FastCPUModel.from_pretrained drops these from **kwargs itself (unsloth_zoo/cpu/loader.py),
# so passing them is valid on both backends.
CPU_DROPPED = ("random_state", "max_lora_rank", "use_exact_model_name", "fix_tokenizer", "unsloth_tiled_mlp",
               "gpu_memory_utilization", "float8_kv_cache", "offload_embedding")


def extract_signatures(root: Path) -> dict[str, tuple[str, ...]]:
    """SIGNATURES read with `ast` from unsloth's source unpacked under `root` (how the table was made)."""
    out = {}
    for key, (file, cls, name) in SOURCES.items():
        tree = ast.parse((root / file).read_text())
        scope = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls).body \
            if cls else tree.body
        fn = next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)
        a = fn.args
        pos = [p.arg for p in a.posonlyargs + a.args]
        first_default = len(pos) - len(a.defaults)
        out[key] = (*(p + ("=" if i >= first_default else "") for i, p in enumerate(pos)),
                    *("*" + k.arg + ("=" if d is not None else "") for k, d in zip(a.kwonlyargs, a.kw_defaults,
                                                                                   strict=True)))
    return out


def _signature(key: str) -> inspect.Signature:
    params = []
    for spec in SIGNATURES[key]:
        kind = inspect.Parameter.KEYWORD_ONLY if spec.startswith("*") else inspect.Parameter.POSITIONAL_OR_KEYWORD
        name = spec.strip("*=")
        params.append(inspect.Parameter(name, kind, default=None if spec.endswith("=") else inspect.Parameter.empty))
    return inspect.Signature(params)


def _bind(calls: list, key: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind a call against unsloth's GPU and CPU signatures (TypeError on a wrong argument) and record it."""
    bound = _signature(key).bind(*args, **kwargs)
    cpu_key = key.replace("FastLanguageModel", "FastCPUModel")
    if cpu_key in SIGNATURES:
        _signature(cpu_key).bind(*args, **{k: v for k, v in kwargs.items() if k not in CPU_DROPPED})
    calls.append((key, dict(bound.arguments)))
    return dict(bound.arguments)


def _fast_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                            past_key_values=None, **kwargs):
    """unsloth's attention as finemed relies on it: packed sequences separated by `packed_seq_lengths` alone."""
    lengths = kwargs.pop("packed_seq_lengths", None)
    own = super(type(self), self).forward
    if lengths is None:
        return own(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
    assert isinstance(lengths, torch.Tensor) and lengths.dtype == torch.int32, lengths
    assert hidden_states.shape[0] == 1 and int(lengths.sum()) == hidden_states.shape[1]
    type(self).packed_calls.append(tuple(lengths.tolist()))
    kwargs.pop("position_ids", None)
    cos, sin = position_embeddings
    outs, start = [], 0
    for n in lengths.tolist():
        s = slice(start, start + n)
        outs.append(own(hidden_states[:, s], (cos[:, s], sin[:, s]), None, None, **kwargs)[0])
        start += n
    return torch.cat(outs, 1), None


_fast_attention_forward.__module__ = "unsloth.models.llama"  # where unsloth's own lives: what finemed tests for


class FakeUnsloth(types.ModuleType):
    """The double: `unsloth` with FastLanguageModel.from_pretrained / get_peft_model (see the module docstring)."""

    def __init__(self, device_type: str = "cuda", fast_attention: bool = True) -> None:
        super().__init__("unsloth")
        self.__version__ = UNSLOTH_VERSION
        self.DEVICE_TYPE = device_type
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.packed_calls: list[tuple[int, ...]] = []
        double = self

        class FastLanguageModel:
            @staticmethod
            def from_pretrained(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
                a = _bind(double.calls, "FastLanguageModel.from_pretrained", args, kwargs)
                from transformers import AutoModelForCausalLM, AutoTokenizer

                model = AutoModelForCausalLM.from_pretrained(a["model_name"], dtype=a["dtype"])
                if fast_attention:
                    base = type(model.get_decoder().layers[0].self_attn)
                    fast = type(base.__name__, (base,), {"forward": _fast_attention_forward,
                                                         "packed_calls": double.packed_calls})
                    for layer in model.get_decoder().layers:
                        layer.self_attn.__class__ = fast
                return model, AutoTokenizer.from_pretrained(a["model_name"])

            @staticmethod
            def get_peft_model(*args: Any, **kwargs: Any) -> Any:
                a = _bind(double.calls, "FastLanguageModel.get_peft_model", args, kwargs)
                from peft import LoraConfig, get_peft_model

                torch.manual_seed(a["random_state"])  # as unsloth does before making the adapter
                peft_model = get_peft_model(a["model"], LoraConfig(
                    r=a["r"], lora_alpha=a["lora_alpha"], lora_dropout=a["lora_dropout"], bias=a["bias"],
                    target_modules=a["target_modules"], task_type="CAUSAL_LM"))

                def save_pretrained_merged(*args: Any, **kwargs: Any) -> None:
                    _bind(double.calls, "save_pretrained_merged", (peft_model, *args), kwargs)

                peft_model.save_pretrained_merged = save_pretrained_merged
                return peft_model

        self.FastLanguageModel = FastLanguageModel

    def called(self, key: str) -> list[dict[str, Any]]:
        return [a for k, a in self.calls if k == key]


@pytest.fixture()
def fake_unsloth(monkeypatch) -> FakeUnsloth:
    double = FakeUnsloth()
    monkeypatch.setitem(sys.modules, "unsloth", double)
    return double


def test_the_double_refuses_what_unsloth_would_refuse(fake_unsloth) -> None:
    flm = fake_unsloth.FastLanguageModel
    with pytest.raises(TypeError, match="lora_rank"):
        flm.get_peft_model(object(), lora_rank=8)  # unsloth's name is r
    with pytest.raises(TypeError, match="missing a required argument: 'model'"):
        flm.get_peft_model(r=8)
    with pytest.raises(TypeError, match="attn_implementation"):  # the CPU loader's only: fails on a GPU
        flm.from_pretrained(model_name="x", attn_implementation="sdpa")
    with pytest.raises(TypeError, match="finetune_last_n_layers"):  # the GPU one's only: fails on CPU
        flm.get_peft_model(object(), finetune_last_n_layers=2)
    assert not fake_unsloth.calls


@pytest.mark.parametrize(("method", "four_bit"), [("qlora", True), ("lora", False), ("full", False)])
def test_load_and_add_lora_call_unsloth_as_documented(tiny_run, fake_unsloth, method, four_bit) -> None:
    from finemed_cli.train import unsloth_backend

    path, model_dir = tiny_run
    cfg = load_train_config(path, [f"model.method={method}", "model.gradient_checkpointing=true",
                                   "stages.1.max_length=300"])
    model = unsloth_backend.load(cfg, torch.float32)
    (load,) = fake_unsloth.called("FastLanguageModel.from_pretrained")
    assert load == {"model_name": str(model_dir), "max_seq_length": 300, "dtype": torch.float32,
                    "load_in_4bit": four_bit, "full_finetuning": method == "full",
                    "use_gradient_checkpointing": "unsloth", "random_state": cfg.seed}
    assert model.finemed_packed_kwarg == "packed_seq_lengths"
    assert any(p.requires_grad for p in model.parameters()) == (method == "full")
    if method == "full":
        return
    peft_model = unsloth_backend.add_lora(model, cfg, seed=5)
    (lora,) = fake_unsloth.called("FastLanguageModel.get_peft_model")
    assert lora == {"model": model, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                    "target_modules": list(cfg.model.lora.targets), "bias": "none",
                    "use_gradient_checkpointing": "unsloth", "random_state": 5}
    assert peft_model.finemed_packed_kwarg == "packed_seq_lengths"


def test_an_attention_unsloth_does_not_patch_is_refused_on_a_gpu(tiny_run, monkeypatch) -> None:
    from finemed_cli.train import unsloth_backend

    cfg = load_train_config(tiny_run[0])
    monkeypatch.setitem(sys.modules, "unsloth", FakeUnsloth("cuda", fast_attention=False))
    with pytest.raises(ConfigError, match="leaves this architecture's attention to transformers"):
        unsloth_backend.load(cfg, torch.float32)
    # unsloth's CPU backend is transformers + peft: finemed's own varlen attention packs there.
    monkeypatch.setitem(sys.modules, "unsloth", FakeUnsloth("cpu", fast_attention=False))
    assert not hasattr(unsloth_backend.load(cfg, torch.float32), "finemed_packed_kwarg")


def test_packed_rows_reach_unsloth_attention_by_its_argument(tiny_run, fake_unsloth) -> None:
    from finemed_cli.modeling.varlen import packed_attention
    from finemed_cli.train import unsloth_backend
    from finemed_cli.train.data import prepare_stage_data
    from finemed_cli.train.losses import sequence_nll

    path, model_dir = tiny_run
    cfg = load_train_config(path)
    model = unsloth_backend.add_lora(unsloth_backend.load(cfg, torch.float32), cfg, seed=0)
    for name, p in model.named_parameters():  # B is zero at init: make the adapter count
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    data = prepare_stage_data(cfg, cfg.stages[0], tokenizer_of(model_dir))
    with torch.no_grad(), packed_attention(model):
        packed = sequence_nll(model, data.train[:4])
        assert fake_unsloth.packed_calls, "packed rows never reached unsloth's attention argument"
        alone = torch.cat([sequence_nll(model, [s]) for s in data.train[:4]])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_sft_then_dpo_on_the_unsloth_backend_double(tiny_run, fake_unsloth, monkeypatch) -> None:
    """The cuda test's run on CPU through the double: one continued adapter, saved per stage, and final/ the
    16-bit base loaded afresh with it merged (not unsloth's save_pretrained_merged)."""
    from transformers import AutoModelForCausalLM

    from finemed_cli.train import backend, recipe

    path, model_dir = tiny_run
    cfg = load_train_config(path, ["name=unsloth-double", "model.backend=unsloth", "model.method=qlora"])
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert backend.pick_backend(cfg) == "unsloth"  # imports `unsloth`: the double
    monkeypatch.setattr(recipe, "pick_backend", lambda cfg, forced=None: "unsloth")  # no CUDA here
    run = recipe.run_train(cfg, progress=False)

    assert [k for k, _ in fake_unsloth.calls] == ["FastLanguageModel.from_pretrained",
                                                   "FastLanguageModel.get_peft_model"]
    assert fake_unsloth.packed_calls
    losses = [m["loss"] for m in _metrics(run / "stage-1-sft")]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    dpo = _metrics(run / "stage-2-dpo")
    assert dpo[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and dpo[-1]["loss"] < dpo[0]["loss"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["backend"] == "unsloth" and manifest["between_stages"] == "continue"
    assert (run / "stage-1-sft" / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    final = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    changed = {n for n, p in final.items() if not torch.equal(p, base[n])}
    assert changed and all(any(t in n for t in cfg.model.lora.targets) for n in changed)


if __name__ == "__main__":
    table = extract_signatures(Path(sys.argv[1]))
    print(json.dumps(table, indent=1))
    print("matches SIGNATURES" if table == SIGNATURES else "differs from SIGNATURES: update the table")
