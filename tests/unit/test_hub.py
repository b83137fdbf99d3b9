"""Hub ids: a fake HF cache on disk is used with no network call; a miss is refused fast and clearly when
offline, when the hub cannot be reached, or when it hangs; the hub's 404/401 answers are named."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from finemed_cli import hub
from finemed_cli.errors import ModelError
from finemed_cli.hub import HubRef, parse_hub_ref, pick_gguf


def fake_hf_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes], kind: str = "models") -> Path:
    """Lay `files` out as huggingface_hub caches a download: blobs, a snapshot of links, refs/main."""
    repo = cache / (f"{kind}--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).symlink_to(blob)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def dir_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}


@pytest.fixture()
def online(monkeypatch, tmp_path):
    """A machine that would go online: HF_HUB_OFFLINE unset, an empty cache of its own."""
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network call attempted: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_references_parse():
    assert parse_hub_ref("BAAI/bge-large-en-v1.5") == HubRef("BAAI/bge-large-en-v1.5")
    assert parse_hub_ref("unsloth/gemma-3-270m-it-GGUF:Q4_K_M") == HubRef("unsloth/gemma-3-270m-it-GGUF", "Q4_K_M")
    for not_a_ref in ("./model", "a/b/c", "../x/y", "model", "org/na me", "org/x:../../etc", "C:\\models\\x"):
        assert parse_hub_ref(not_a_ref) is None, not_a_ref


def test_quant_tags_pick_one_gguf():
    files = ["m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m-Q8_0.gguf", "README.md"]
    assert pick_gguf(HubRef("o/m", "q4_k_m"), files) == "m-Q4_K_M.gguf"
    assert pick_gguf(HubRef("o/m", "m-Q8_0.gguf"), files) == "m-Q8_0.gguf"
    with pytest.raises(ModelError, match="several GGUF files match"):
        pick_gguf(HubRef("o/m"), files)
    with pytest.raises(ModelError, match="no GGUF file matches"):
        pick_gguf(HubRef("o/m", "Q2_K"), files)


def test_a_cached_model_loads_with_no_network_call(online, no_network, tmp_path, tiny_tokenizer):
    from finemed_cli.checkpoints.loading import load_model
    from tests.conftest import make_tiny_llama

    saved = tmp_path / "saved"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(saved)
    tiny_tokenizer.save_pretrained(saved)
    snap = fake_hf_cache(online, "someorg/tiny-llama", dir_files(saved))
    loaded = load_model("someorg/tiny-llama", device="cpu")
    assert loaded.name == "someorg/tiny-llama" and Path(loaded.source) == snap
    assert loaded.model.config.hidden_size == 32


def test_a_cached_embedder_loads_with_no_network_call(online, no_network):
    from finemed_cli.checkpoints.embedded import embedded_embedder_dir
    from finemed_cli.retrieval.embed import load_embedder

    fake_hf_cache(online, "BAAI/bge-large-en-v1.5", dir_files(embedded_embedder_dir()))
    embedder = load_embedder("BAAI/bge-large-en-v1.5", device="cpu")
    assert embedder.name == "BAAI/bge-large-en-v1.5"
    assert embedder.encode(["thyroid storm"]).shape == (1, 384)


def test_a_cached_gguf_is_found_by_quant_tag(online, no_network):
    fake_hf_cache(online, "someorg/m-GGUF", {"m-Q4_K_M.gguf": b"GGUF-a", "m-Q8_0.gguf": b"GGUF-b"})
    from finemed_cli.checkpoints.loading import resolve_gguf

    assert resolve_gguf("someorg/m-GGUF:Q8_0").read_bytes() == b"GGUF-b"


def _fails_fast(call, match: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelError, match=match):
        call()
    assert time.perf_counter() - start < 5.0


def test_a_miss_offline_is_refused_at_once_with_how_to_fetch(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    from finemed_cli.retrieval.embed import load_embedder

    _fails_fast(lambda: load_embedder("BAAI/bge-large-en-v1.5"),
                r"'BAAI/bge-large-en-v1.5' is not in the local HF cache .* HF_HUB_OFFLINE is set; .*hf download")


def test_a_miss_with_the_hub_unreachable_is_refused_fast(online, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    from finemed_cli.checkpoints.loading import load_model

    _fails_fast(lambda: load_model("meta-llama/Llama-3.2-1B"), "cannot be reached .*hf download meta-llama")


def test_a_miss_with_a_hanging_hub_is_refused_in_under_5_s(online, monkeypatch):
    server = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        _fails_fast(lambda: hub.hub_snapshot(HubRef("BAAI/bge-large-en-v1.5"), "embedder"), "cannot be reached")
    finally:
        server.close()


@pytest.mark.parametrize(("status", "match"), [(404, "no such repository"), (401, "gated or private")])
def test_the_hubs_refusals_are_named(online, monkeypatch, status, match):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        _fails_fast(lambda: hub.hub_snapshot(HubRef("someorg/private-model")), match)
    finally:
        server.shutdown()


def test_a_gguf_only_repository_asks_for_a_file(online, no_network, monkeypatch):
    fake_hf_cache(online, "someorg/only-GGUF", {"m-Q4_K_M.gguf": b"GGUF", "README.md": b"x"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from finemed_cli.checkpoints.loading import resolve_model_source

    with pytest.raises(ModelError, match=r"only GGUF files; name one, e.g. someorg/only-GGUF:m-Q4_K_M.gguf"):
        resolve_model_source("someorg/only-GGUF")


def test_a_missing_model_file_is_a_missing_path_not_a_hub_id(online, no_network) -> None:
    from finemed_cli.checkpoints.loading import resolve_model_source

    for value in ("models/x.gguf", "runs/model.safetensors"):
        with pytest.raises(ModelError, match="no such model directory or file"):
            resolve_model_source(value)


def test_a_missing_folder_under_a_local_one_is_a_path_not_a_hub_id(online, no_network, tmp_path, monkeypatch) -> None:
    """`--model runs/final` with `runs/` here but no `final/` in it: online it was read as the hub id
    `runs/final` and would have downloaded whatever that repository holds (issue 31)."""
    from finemed_cli.checkpoints.loading import resolve_gguf, resolve_model_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelError, match="runs/final: no such model directory or file"):
        resolve_model_source("runs/final")
    with pytest.raises(ModelError, match="runs/final: no such file"):
        resolve_gguf("runs/final")
