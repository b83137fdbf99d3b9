"""`finemed serve --lora` on a tiny exported model: every request is answered with the adapter applied,
exactly as llama.cpp answers with that adapter set by hand."""

from __future__ import annotations

import pytest

from finemed_cli.config.serve import ServeConfig
from finemed_cli.export.gguf import export_gguf, read_config
from finemed_cli.export.lora_gguf import export_lora_gguf
from finemed_cli.generate.llamacpp import LlamaCpp
from tests.export.conftest import load_hf, random_adapter

pytest.importorskip("fastapi")
MESSAGES = [{"role": "user", "content": "The patient has hyperthyroidism"}]


def _served(config: ServeConfig) -> str:
    from fastapi.testclient import TestClient

    from finemed_cli.serve.app import create_app
    from finemed_cli.serve.engine import ServeEngine

    engine = ServeEngine(config)
    try:
        with TestClient(create_app(engine)) as client:
            r = client.post("/v1/chat/completions", json={"model": "t", "messages": MESSAGES, "max_tokens": 12})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]
    finally:
        engine.close()


def test_served_lora_is_the_adapter_applied(tiny_untied_dir, tmp_path) -> None:
    base = export_gguf(tiny_untied_dir, tmp_path / "m.gguf", "f32").path
    model = load_hf(tiny_untied_dir)
    adapter = random_adapter(model, seed=7)
    lora = export_lora_gguf(adapter, read_config(tiny_untied_dir), tmp_path / "a.gguf", "f32")
    adapter.detach()
    common = {"name": "t", "system_prompt": "model", "n_ctx": 256, "max_tokens": 12}
    plain = _served(ServeConfig(str(base), **common))
    with_lora = _served(ServeConfig(str(base), lora=lora, **common))
    with LlamaCpp(base, n_ctx=256) as llama, llama.adapter_applied(lora):
        ids = llama.tokenize(llama.render(MESSAGES))
        want = llama.complete_text(ids, 12)
    assert with_lora == want and with_lora != plain
